//! Resellers, their API keys and balances.

use deadpool_postgres::GenericClient;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::Row;

use super::{authorize, authorized_json, check_name, nullable};
use crate::app::App;
use crate::audit;
use crate::auth::admin::Need;
use crate::balance::{self, ADJUSTMENT_MAX_ABS};
use crate::callbacks::target;
use crate::config::parse_cidr;
use crate::crypto::Purpose;
use crate::error::ApiError;
use crate::http::query::rfc3339;
use crate::http::{response, Body, Ctx};
use crate::ids;
use crate::money;

const ALLOWLIST_MAX: usize = 100;
const URL_MAX_BYTES: usize = 2048;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewReseller {
    name: String,
    tier: String,
    #[serde(default)]
    ip_allowlist: Vec<String>,
    callback_url: Option<String>,
    #[serde(default)]
    low_balance_threshold: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResellerPatch {
    name: Option<String>,
    tier: Option<String>,
    status: Option<String>,
    ip_allowlist: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    callback_url: Option<Option<String>>,
    low_balance_threshold: Option<i64>,
}

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

const RESELLER_COLUMNS: &str = "r.id, r.reseller_id, r.name, r.tier, r.status, r.ip_allowlist, r.callback_url,
     r.low_balance_threshold, r.created_at, r.updated_at, b.balance";

fn reseller_json(r: &Row, currency: &str) -> Value {
    json!({
        "reseller_id": r.get::<_, &str>(1), "name": r.get::<_, &str>(2), "tier": r.get::<_, &str>(3),
        "status": r.get::<_, &str>(4), "ip_allowlist": r.get::<_, Vec<String>>(5),
        "callback_url": r.get::<_, Option<&str>>(6), "low_balance_threshold": r.get::<_, i64>(7),
        "balance": r.get::<_, i64>(10), "currency": currency,
        "created_at": rfc3339(r.get(8)), "updated_at": rfc3339(r.get(9)),
    })
}

async fn load<C: GenericClient>(client: &C, reseller_id: &str) -> Result<Row, ApiError> {
    let sql = format!(
        "SELECT {RESELLER_COLUMNS} FROM resellers r JOIN balances b ON b.reseller_id = r.id WHERE r.reseller_id = $1"
    );
    client
        .query_opt(&sql, &[&reseller_id])
        .await?
        .ok_or_else(|| ApiError::not_found("no such reseller"))
}

pub async fn create(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (actor, new): (_, NewReseller) = authorized_json(app, ctx, req, Need::Write).await?;
    check_name(&new.name)?;
    check_tier(app, &new.tier)?;
    let allowlist = check_allowlist(&new.ip_allowlist)?;
    if let Some(u) = &new.callback_url {
        check_callback_url(app, u).await?;
    }
    check_threshold(new.low_balance_threshold)?;

    let reseller_id = ids::reseller_id();
    let webhook_secret = ids::webhook_secret();
    let sealed = app.crypto.encrypt(
        Purpose::WebhookSecret {
            reseller_id: &reseller_id,
        },
        webhook_secret.as_bytes(),
    );
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    crate::rebuild::fence(&tx).await?;
    let pk: i64 = tx
        .query_one(
            "INSERT INTO resellers (reseller_id, name, tier, ip_allowlist, callback_url, low_balance_threshold, webhook_secret_enc)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[&reseller_id, &new.name, &new.tier, &allowlist, &new.callback_url, &new.low_balance_threshold, &sealed],
        )
        .await?
        .get(0);
    tx.execute("INSERT INTO balances (reseller_id) VALUES ($1)", &[&pk])
        .await?;
    audit::record(
        &tx,
        &actor,
        "reseller.create",
        Some(&reseller_id),
        None,
        json!({"tier": new.tier}),
    )
    .await?;
    // The hot balance starts at zero, set inside the fence so that no rebuild comes
    // between (NX: one that ran first has set it already).
    let mut redis = app.redis();
    redis::cmd("SET")
        .arg(app.keys.balance(pk))
        .arg(0)
        .arg("NX")
        .query_async::<()>(&mut redis)
        .await?;
    tx.commit().await?;

    let row = load(&client, &reseller_id).await?;
    let mut body = reseller_json(&row, &app.config.currency);
    body["webhook_secret"] = Value::String(webhook_secret);
    response::secret_json(StatusCode::CREATED, &body)
}

pub async fn patch(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (actor, p): (_, ResellerPatch) = authorized_json(app, ctx, req, Need::Write).await?;
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
    let allowlist = p.ip_allowlist.as_deref().map(check_allowlist).transpose()?;
    if let Some(Some(u)) = &p.callback_url {
        check_callback_url(app, u).await?;
    }
    if let Some(t) = p.low_balance_threshold {
        check_threshold(t)?;
    }
    let (set_url, url) = match &p.callback_url {
        Some(u) => (true, u.clone()),
        None => (false, None),
    };
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let (pk, old_tier): (i64, String) = tx
        .query_opt(
            "SELECT id, tier FROM resellers WHERE reseller_id = $1 FOR UPDATE",
            &[&reseller_id],
        )
        .await?
        .map(|r| (r.get(0), r.get(1)))
        .ok_or_else(|| ApiError::not_found("no such reseller"))?;
    tx.execute(
        "UPDATE resellers SET name = coalesce($2, name), tier = coalesce($3, tier), status = coalesce($4, status),
                ip_allowlist = coalesce($5, ip_allowlist),
                callback_url = CASE WHEN $6 THEN $7 ELSE callback_url END,
                low_balance_threshold = coalesce($8, low_balance_threshold), updated_at = now()
         WHERE id = $1",
        &[
            &pk,
            &p.name,
            &p.tier,
            &p.status,
            &allowlist,
            &set_url,
            &url,
            &p.low_balance_threshold,
        ],
    )
    .await?;
    // A new tier is a new price list: each product on sale whose price for this reseller
    // moved is announced, as a product's own price change is.
    if let Some(new_tier) = p.tier.as_deref().filter(|t| *t != old_tier) {
        tx.execute(
            "INSERT INTO events (reseller_id, type, data)
             SELECT r.id, 'product.price_changed',
                    jsonb_build_object('sku', p.sku, 'name', p.name, 'price', coalesce(np.price, p.base_price),
                                       'previous_price', coalesce(op.price, p.base_price), 'currency', $4::text)
               FROM resellers r CROSS JOIN products p
               LEFT JOIN product_tier_prices op ON op.product_id = p.id AND op.tier = $2
               LEFT JOIN product_tier_prices np ON np.product_id = p.id AND np.tier = $3
              WHERE r.id = $1 AND r.callback_url IS NOT NULL AND r.status = 'active' AND p.status = 'on_sale'
                AND coalesce(np.price, p.base_price) <> coalesce(op.price, p.base_price)
              ORDER BY p.sku",
            &[&pk, &old_tier, &new_tier, &app.config.currency],
        )
        .await?;
    }
    audit::record(
        &tx,
        &actor,
        "reseller.update",
        Some(reseller_id),
        None,
        json!({"tier": p.tier, "status": p.status, "ip_allowlist": allowlist, "callback_url_changed": set_url}),
    )
    .await?;
    tx.commit().await?;
    crate::sync::changed(app).await;
    let row = load(&client, reseller_id).await?;
    response::json(StatusCode::OK, &reseller_json(&row, &app.config.currency))
}

pub async fn get(app: &App, ctx: &Ctx, req: Request<Incoming>, reseller_id: &str) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    authorize(app, ctx, &parts, Need::Read).await?;
    let client = app.pg.get().await?;
    let row = load(&client, reseller_id).await?;
    response::json(StatusCode::OK, &reseller_json(&row, &app.config.currency))
}

pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    authorize(app, ctx, &parts, Need::Read).await?;
    let client = app.pg.get().await?;
    let sql =
        format!("SELECT {RESELLER_COLUMNS} FROM resellers r JOIN balances b ON b.reseller_id = r.id ORDER BY r.id");
    let rows = client.query(&sql, &[]).await?;
    let list: Vec<Value> = rows.iter().map(|r| reseller_json(r, &app.config.currency)).collect();
    response::json(StatusCode::OK, &json!({"resellers": list}))
}

pub async fn create_key(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    let mut client = app.pg.get().await?;
    // The key and its audit row commit together: a key whose creation could not be
    // audited would exist with its secret already lost to a failed answer.
    let tx = client.transaction().await?;
    let pk: i64 = load(&tx, reseller_id).await?.get(0);
    let key_id = ids::key_id();
    let secret = ids::api_secret();
    let sealed = app
        .crypto
        .encrypt(Purpose::ApiSecret { key_id: &key_id }, secret.as_bytes());
    let created_at: time::OffsetDateTime = tx
        .query_one(
            "INSERT INTO api_keys (key_id, reseller_id, secret_enc) VALUES ($1, $2, $3) RETURNING created_at",
            &[&key_id, &pk, &sealed],
        )
        .await?
        .get(0);
    audit::record(
        &tx,
        &actor,
        "key.create",
        Some(&key_id),
        None,
        json!({"reseller_id": reseller_id}),
    )
    .await?;
    tx.commit().await?;
    crate::sync::changed(app).await;
    response::secret_json(
        StatusCode::CREATED,
        &json!({"key_id": key_id, "secret": secret, "reseller_id": reseller_id, "created_at": rfc3339(created_at)}),
    )
}

/// `POST /admin/v1/resellers/{id}/webhook_secret`: a new secret, shown only in this
/// answer; every callback sent from now on is signed with it alone.
pub async fn rotate_webhook_secret(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    let secret = ids::webhook_secret();
    let sealed = app
        .crypto
        .encrypt(Purpose::WebhookSecret { reseller_id }, secret.as_bytes());
    let mut client = app.pg.get().await?;
    // With its audit row or not at all: a rotation that went through unanswered would
    // leave the merchant unable to verify anything.
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "UPDATE resellers SET webhook_secret_enc = $2, updated_at = now() WHERE reseller_id = $1",
            &[&reseller_id, &sealed],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("no such reseller"));
    }
    audit::record(
        &tx,
        &actor,
        "reseller.webhook_secret.rotate",
        Some(reseller_id),
        None,
        json!({}),
    )
    .await?;
    tx.commit().await?;
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
    let (parts, _) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    let client = app.pg.get().await?;
    let row = client
        .query_opt(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 RETURNING revoked_at",
            &[&key_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("no such key"))?;
    audit::record(&client, &actor, "key.revoke", Some(key_id), None, json!({})).await?;
    crate::sync::changed(app).await;
    let revoked_at: time::OffsetDateTime = row.get(0);
    response::json(
        StatusCode::OK,
        &json!({"key_id": key_id, "revoked": true, "revoked_at": rfc3339(revoked_at)}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Adjustment {
    amount: i64,
    reference: String,
    note: Option<String>,
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
    let client = app.pg.get().await?;
    let pk: i64 = load(&client, reseller_id).await?.get(0);
    drop(client);
    let adjusted = balance::adjust(app, &actor, pk, reseller_id, a.amount, &a.reference, a.note.as_deref()).await?;
    let mut resp = response::json(StatusCode::OK, &adjusted)?;
    if adjusted.replayed {
        response::mark_replayed(&mut resp);
    }
    Ok(resp)
}
