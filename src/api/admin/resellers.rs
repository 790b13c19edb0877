//! Resellers, their API keys and balances: the requests parsed and checked here, the
//! work done by `crate::resellers` (accounts, keys, webhook secrets) and
//! `crate::balance` (adjustments, which `crate::hot_balance` makes spendable).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::{authorize, authorized_head, authorized_json, authorized_optional_json, check_name, json as read_json};
use crate::app::App;
use crate::auth::admin::Need;
use crate::auth::keys::KeySettings;
use crate::auth::scopes::{Scope, Scopes};
use crate::balance::{self, Adjustment, ADJUSTMENT_MAX_ABS};
use crate::callbacks::target;
use crate::config::parse_cidr;
use crate::error::ApiError;
use crate::http::query::{self, rfc3339};
use crate::http::{response, Body, Ctx};
use crate::money;
use crate::orders;
use crate::resellers::{self, NewReseller, ResellerPatch};

const ALLOWLIST_MAX: usize = 100;
const LABEL_MAX_CHARS: usize = 200;
const URL_MAX_BYTES: usize = 2048;

fn check_tier(app: &App, tier: &str) -> Result<(), ApiError> {
    if !app.config.tiers.contains_key(tier) {
        return Err(ApiError::invalid(format!("tier: unknown tier {tier:?}")));
    }
    Ok(())
}

/// Normalised CIDRs (a bare address becomes a /32 or /128).
fn check_allowlist(list: &[String]) -> Result<Vec<String>, ApiError> {
    if list.len() > ALLOWLIST_MAX {
        return Err(ApiError::invalid(format!(
            "ip_allowlist holds at most {ALLOWLIST_MAX} entries"
        )));
    }
    list.iter()
        .map(|c| {
            parse_cidr(c)
                .map(|n| n.to_string())
                .ok_or_else(|| ApiError::invalid(format!("ip_allowlist: {c:?} is not an IP address or CIDR")))
        })
        .collect()
}

fn check_url(url: &str) -> Result<(), ApiError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() <= URL_MAX_BYTES
        && url.parse::<hyper::Uri>().is_ok_and(|u| u.host().is_some())
        // The dispatcher's parser, which also reads numeric hosts (`2130706433`) as IPv4.
        && reqwest::Url::parse(url).is_ok_and(|u| u.host_str().is_some());
    if !ok {
        return Err(ApiError::invalid("callback_url must be an http(s) URL"));
    }
    Ok(())
}

/// A callback URL must lead to a public address (see `callbacks::target`), unless
/// `callbacks.allow_private_targets` is set. A name that does not resolve now is taken:
/// DNS may not be set up yet, and every delivery checks again where it connects.
async fn check_url_target(app: &App, url: &str) -> Result<(), ApiError> {
    if app.config.callbacks.allow_private_targets {
        return Ok(());
    }
    let refused =
        |why: String| ApiError::invalid(format!("callback_url: {why}; callbacks go to public addresses only"));
    let parsed = reqwest::Url::parse(url).map_err(|_| ApiError::invalid("callback_url must be an http(s) URL"))?;
    let Some(name) = target::check_host(&parsed).map_err(|r| refused(r.0))? else {
        return Ok(());
    };
    let port = parsed.port_or_known_default().unwrap_or(0);
    match tokio::time::timeout(target::SET_TIME_LOOKUP_TIMEOUT, target::resolve_public(&name, port)).await {
        Ok(Err(target::LookupError::Refused(r))) => Err(refused(r.0)),
        Ok(Ok(_)) | Ok(Err(target::LookupError::Failed(_))) | Err(_) => Ok(()),
    }
}

async fn check_callback_url(app: &App, url: &str) -> Result<(), ApiError> {
    check_url(url)?;
    check_url_target(app, url).await
}

fn check_threshold(t: i64) -> Result<(), ApiError> {
    money::check_non_negative("low_balance_threshold", t)
}

pub async fn create(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (actor, mut new): (_, NewReseller) = authorized_json(app, ctx, req, Need::Write).await?;
    check_name(&new.name)?;
    check_tier(app, &new.tier)?;
    new.ip_allowlist = check_allowlist(&new.ip_allowlist)?;
    if let Some(u) = &new.callback_url {
        check_callback_url(app, u).await?;
    }
    check_threshold(new.low_balance_threshold)?;
    let (reseller, webhook_secret) = resellers::create(app, &actor, &new).await?;
    let mut body = serde_json::to_value(reseller).map_err(ApiError::internal)?;
    body["webhook_secret"] = Value::String(webhook_secret);
    response::secret_json(StatusCode::CREATED, &body)
}

pub async fn patch(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let (admin, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    let mut p: ResellerPatch = read_json(app, &parts, body).await?;
    if let Some(c) = p.credit_limit {
        if !admin.role.may(Need::Credit) {
            return Err(ApiError::Forbidden);
        }
        money::check_non_negative("credit_limit", c)?;
    }
    if let Some(n) = &p.name {
        check_name(n)?;
    }
    if let Some(t) = &p.tier {
        check_tier(app, t)?;
    }
    if let Some(s) = &p.status {
        if s != "active" && s != "suspended" {
            return Err(ApiError::invalid("status must be active or suspended"));
        }
    }
    p.ip_allowlist = p.ip_allowlist.as_deref().map(check_allowlist).transpose()?;
    if let Some(Some(u)) = &p.callback_url {
        check_callback_url(app, u).await?;
    }
    if let Some(t) = p.low_balance_threshold {
        check_threshold(t)?;
    }
    if let Some(Some(l)) = p.daily_spend_limit {
        money::check_non_negative("daily_spend_limit", l)?;
    }
    let reseller = resellers::update(app, &actor, reseller_id, &p).await?;
    response::json(StatusCode::OK, &reseller)
}

pub async fn get(app: &App, ctx: &Ctx, req: Request<Incoming>, reseller_id: &str) -> Result<Response<Body>, ApiError> {
    authorized_head(app, ctx, req, Need::Read).await?;
    response::json(StatusCode::OK, &resellers::get(app, reseller_id).await?)
}

pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    authorized_head(app, ctx, req, Need::Read).await?;
    let list = resellers::list(app).await?;
    response::json(StatusCode::OK, &json!({"resellers": list}))
}

/// `POST /admin/v1/resellers/{id}/keys`: the body is optional, every field of it too.
pub async fn create_key(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (actor, v) = authorized_optional_json::<Value>(app, ctx, req, Need::Write).await?;
    let (settings, expires_at) = match v {
        None => (KeySettings::default(), None),
        Some(v) => key_request(app, &v)?,
    };
    let key = resellers::create_key(app, &actor, reseller_id, &settings, expires_at).await?;
    response::secret_json(StatusCode::CREATED, &key)
}

/// A new key's `{"scopes", "expires_at", "label", "daily_spend_limit"}`, each optional.
fn key_request(app: &App, v: &Value) -> Result<(KeySettings, Option<OffsetDateTime>), ApiError> {
    let o = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("the body must be a JSON object"))?;
    orders::refuse_unknown(o, &["scopes", "expires_at", "label", "daily_spend_limit"])?;
    let every = || Scope::ALL.map(Scope::name).join(", ");
    let scopes = match o.get("scopes") {
        None | Some(Value::Null) => Scopes::ALL,
        Some(Value::Array(names)) => {
            let names: Vec<&str> = names
                .iter()
                .map(Value::as_str)
                .collect::<Option<_>>()
                .ok_or_else(|| ApiError::invalid(format!("scopes: an array of scope names ({})", every())))?;
            let scopes = Scopes::parse(&names).map_err(|unknown| {
                let unknown: String = unknown.chars().take(64).collect();
                ApiError::invalid(format!("scopes: unknown scope {unknown:?}; the scopes are {}", every()))
            })?;
            if scopes.is_empty() {
                return Err(ApiError::invalid("scopes: at least one scope"));
            }
            scopes
        }
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "scopes: an array of scope names ({})",
                every()
            )))
        }
    };
    let label = match o.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::String(l)) if !l.trim().is_empty() && l.chars().count() <= LABEL_MAX_CHARS => Some(l.clone()),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "label: 1 to {LABEL_MAX_CHARS} characters, not blank"
            )))
        }
    };
    let expires_at = match o.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => {
            let t = query::time_value("expires_at", t)?;
            // Whole seconds, as the API shows it: the expiry kept is the one shown.
            let t = t.replace_nanosecond(0).unwrap_or(t);
            if t <= app.clock.now() {
                return Err(ApiError::invalid("expires_at must be in the future"));
            }
            Some(t)
        }
        Some(_) => return Err(ApiError::invalid("expires_at must be an RFC 3339 time")),
    };
    let daily_spend_limit = match o.get("daily_spend_limit") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let l = v
                .as_i64()
                .ok_or_else(|| ApiError::invalid("daily_spend_limit: an integer in minor units"))?;
            money::check_non_negative("daily_spend_limit", l)?;
            Some(l)
        }
    };
    Ok((
        KeySettings {
            scopes,
            label,
            daily_spend_limit,
        },
        expires_at,
    ))
}

/// `POST /admin/v1/keys/{key_id}/rotate` `{"overlap_seconds"}`, the body optional.
pub async fn rotate_key(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    key_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (actor, v) = authorized_optional_json::<Value>(app, ctx, req, Need::Write).await?;
    let v = v.unwrap_or_else(|| json!({}));
    let o = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("the body must be a JSON object"))?;
    orders::refuse_unknown(o, &["overlap_seconds"])?;
    let max = resellers::ROTATION_OVERLAP_MAX_SECS;
    let overlap = match o.get("overlap_seconds") {
        None => resellers::ROTATION_OVERLAP_DEFAULT_SECS,
        Some(v) => v
            .as_i64()
            .filter(|s| (0..=max).contains(s))
            .ok_or_else(|| ApiError::invalid(format!("overlap_seconds: an integer from 0 to {max} (30 days)")))?,
    };
    let rotated = resellers::rotate_key(app, &actor, key_id, overlap).await?;
    response::secret_json(StatusCode::CREATED, &rotated)
}

/// `GET /admin/v1/resellers/{id}/keys`: never a secret.
pub async fn list_keys(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    authorized_head(app, ctx, req, Need::Read).await?;
    let keys = resellers::list_keys(app, reseller_id).await?;
    response::json(StatusCode::OK, &json!({"reseller_id": reseller_id, "keys": keys}))
}

/// `POST /admin/v1/resellers/{id}/webhook_secret`: a new secret, shown only in this
/// answer.
pub async fn rotate_webhook_secret(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (_, actor) = authorized_head(app, ctx, req, Need::Write).await?;
    let secret = resellers::rotate_webhook_secret(app, &actor, reseller_id).await?;
    response::secret_json(
        StatusCode::OK,
        &json!({"reseller_id": reseller_id, "webhook_secret": secret}),
    )
}

pub async fn revoke_key(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    key_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (_, actor) = authorized_head(app, ctx, req, Need::Write).await?;
    let revoked_at = resellers::revoke_key(app, &actor, key_id).await?;
    response::json(
        StatusCode::OK,
        &json!({"key_id": key_id, "revoked": true, "revoked_at": rfc3339(revoked_at)}),
    )
}

pub async fn adjust_balance(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (actor, a): (_, Adjustment) = authorized_json(app, ctx, req, Need::Write).await?;
    // unsigned_abs: i64::MIN has no positive counterpart, and abs() would overflow on it.
    if a.amount == 0 || a.amount.unsigned_abs() > ADJUSTMENT_MAX_ABS.unsigned_abs() {
        return Err(ApiError::invalid(format!(
            "amount must be non-zero and at most {ADJUSTMENT_MAX_ABS} in size"
        )));
    }
    if a.reference.trim().is_empty() || a.reference.len() > 128 {
        return Err(ApiError::invalid("reference must be 1 to 128 bytes"));
    }
    if a.note.as_ref().is_some_and(|n| n.len() > 1000) {
        return Err(ApiError::invalid("note must be at most 1000 bytes"));
    }
    let adjusted = balance::adjust(app, &actor, reseller_id, &a).await?;
    let mut resp = response::json(StatusCode::OK, &adjusted)?;
    if adjusted.replayed {
        response::mark_replayed(&mut resp);
    }
    Ok(resp)
}
