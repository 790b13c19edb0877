//! Login and operator accounts; the accounts and the count of failed logins are
//! `auth::accounts`.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::authorized_json;
use crate::app::App;
use crate::audit::Actor;
use crate::auth::accounts;
use crate::auth::admin::{Need, Role};
use crate::error::ApiError;
use crate::http::query::rfc3339;
use crate::http::{response, Body, Ctx};

const PASSWORD_MIN_CHARS: usize = 8;
const PASSWORD_MAX_BYTES: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

/// How long a login refused by the per-address limit waits before its answer.
const LOGIN_REFUSAL_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The order of the steps is the point: the per-address limit before the body is read
/// (every attempt takes a token there; a sign-in gives its token back at the end); the
/// attempt counted before the password is checked; no Postgres connection held while
/// Argon2 runs; Argon2 on its own bounded pool (`App::passwords`).
pub async fn login(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let ip = ctx.client_ip(app, &parts.headers);
    if let Err(retry_after_secs) = app.login_limiter.check(ip) {
        metrics::counter!("cardgate_login_rate_limited_total").increment(1);
        // A tarpit: a guesser's connection waits before each refusal, so a flood of them
        // costs connections (capped per address) instead of the CPU orders need.
        tokio::time::sleep(LOGIN_REFUSAL_DELAY).await;
        return Err(ApiError::RateLimited { retry_after_secs });
    }
    let login: Login = super::json(app, &parts, body).await?;
    if !valid_username(&login.username) || login.password.len() > PASSWORD_MAX_BYTES {
        return Err(ApiError::Unauthenticated("invalid username or password"));
    }
    accounts::count_login_attempt(app, &login.username, ip).await?;
    let account = accounts::for_login(app, &login.username).await?;
    let ok = app.passwords.verify(login.password, account.password_hash).await?;
    let actor = Actor::admin(&login.username, ip);
    if !ok || account.disabled {
        accounts::audit_login(app, &actor, &login.username, false).await?;
        return Err(ApiError::Unauthenticated("invalid username or password"));
    }
    accounts::clear_login_attempts(app, &login.username, ip).await;
    app.login_limiter.signed_in(ip);
    let (token, exp) = app
        .tokens
        .issue(&login.username, u64::try_from(account.iat).unwrap_or(0))?;
    accounts::audit_login(app, &actor, &login.username, true).await?;
    let expires_at = time::OffsetDateTime::from_unix_timestamp(exp as i64).map_err(ApiError::internal)?;
    response::json(
        StatusCode::OK,
        &json!({"token": token, "expires_at": rfc3339(expires_at)}),
    )
}

fn valid_username(u: &str) -> bool {
    (1..=64).contains(&u.len()) && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}

fn check_password(p: &str) -> Result<(), ApiError> {
    if p.chars().count() < PASSWORD_MIN_CHARS || p.len() > PASSWORD_MAX_BYTES {
        return Err(ApiError::invalid(format!(
            "password must be {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_BYTES} bytes long"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAdmin {
    username: String,
    password: String,
    role: String,
}

pub async fn create_admin(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (actor, new): (_, NewAdmin) = authorized_json(app, ctx, req, Need::ManageAdmins).await?;
    if !valid_username(&new.username) {
        return Err(ApiError::invalid(
            "username must be 1 to 64 characters of [A-Za-z0-9_.@-]",
        ));
    }
    let role = Role::parse(&new.role).ok_or_else(|| ApiError::invalid("role must be admin, operator or auditor"))?;
    check_password(&new.password)?;
    let hash = app.passwords.hash(new.password).await?;
    let created_at = accounts::create(app, &actor, &new.username, &hash, role).await?;
    response::json(
        StatusCode::CREATED,
        &json!({"username": new.username, "role": role.as_str(), "disabled": false, "created_at": rfc3339(created_at)}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminPatch {
    role: Option<String>,
    disabled: Option<bool>,
    password: Option<String>,
}

pub async fn patch_admin(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    username: &str,
) -> Result<Response<Body>, ApiError> {
    let (actor, patch): (_, AdminPatch) = authorized_json(app, ctx, req, Need::ManageAdmins).await?;
    let role = patch
        .role
        .as_deref()
        .map(|r| Role::parse(r).ok_or_else(|| ApiError::invalid("role must be admin, operator or auditor")))
        .transpose()?;
    let hash = match patch.password {
        Some(p) => {
            check_password(&p)?;
            Some(app.passwords.hash(p).await?)
        }
        None => None,
    };
    let account = accounts::update(app, &actor, username, role, patch.disabled, hash.as_deref()).await?;
    response::json(
        StatusCode::OK,
        &json!({"username": username, "role": account.role, "disabled": account.disabled,
                "created_at": rfc3339(account.created_at)}),
    )
}
