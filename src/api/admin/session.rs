//! Login and operator accounts.

use std::sync::LazyLock;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use redis::Script;
use serde::Deserialize;
use serde_json::json;

use super::authorized_json;
use crate::app::App;
use crate::audit::{self, Actor};
use crate::auth::admin::{Need, Role};
use crate::error::ApiError;
use crate::http::query::rfc3339;
use crate::http::{response, Body, Ctx};

/// Login attempts allowed per username and client address within `LOGIN_LOCKOUT_SECS`
/// before that pair is refused outright (whatever the password) until the window ends.
/// Per address, so nobody can lock the real operator out by failing from elsewhere.
const LOGIN_ATTEMPTS_MAX: i64 = 5;
const LOGIN_LOCKOUT_SECS: i64 = 900;
const PASSWORD_MIN_CHARS: usize = 8;
const PASSWORD_MAX_BYTES: usize = 256;

/// Counts an attempt (KEYS[1]) and starts its window (ARGV[1] seconds) with the first;
/// answers the count with this one and the seconds left. One step, so that concurrent
/// guesses each get a count of their own: with a read before and a write after the
/// password check, they all read the same count and all went through.
static COUNT_ATTEMPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('TTL', KEYS[1])}",
    )
});

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

/// The order of the steps is the point: the per-address limit before the body is read;
/// the attempt counted before the password is checked; no Postgres connection held
/// while Argon2 runs; Argon2 on its own bounded pool (`App::passwords`).
/// How long a login refused by the per-address limit waits before its answer.
const LOGIN_REFUSAL_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

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
    let key = app.keys.login_failures(&login.username, ip);
    let mut redis = app.redis();
    // With Redis away the attempt is not counted, and the login not refused: operators
    // must be able to sign in to look at the outage (the per-address limit still holds).
    match COUNT_ATTEMPT
        .key(&key)
        .arg(LOGIN_LOCKOUT_SECS)
        .invoke_async::<(i64, i64)>(&mut redis)
        .await
    {
        Ok((attempts, ttl)) if attempts > LOGIN_ATTEMPTS_MAX => {
            return Err(ApiError::RateLimited {
                retry_after_secs: ttl.max(1) as u64,
            })
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "login attempt not counted: redis unavailable"),
    }

    // The token's `iat` is the database's clock when the account was read, and never
    // before the last password change (see `patch_admin`).
    let row = app
        .pg
        .get()
        .await?
        .query_opt(
            "SELECT password_hash, disabled, floor(extract(epoch FROM clock_timestamp()))::bigint,
                    ceil(extract(epoch FROM password_changed_at))::bigint
             FROM admins WHERE username = $1",
            &[&login.username],
        )
        .await?;
    let stored: Option<String> = row.as_ref().map(|r| r.get(0));
    let disabled = row.as_ref().is_some_and(|r| r.get::<_, bool>(1));
    let iat = row
        .as_ref()
        .map(|r| r.get::<_, i64>(2).max(r.get::<_, Option<i64>>(3).unwrap_or(0)))
        .unwrap_or(0);
    let ok = app.passwords.verify(login.password, stored).await?;
    let actor = Actor::admin(&login.username, ip);
    if !ok || disabled {
        let client = app.pg.get().await?;
        audit::record(&client, &actor, "login.failed", Some(&login.username), None, json!({})).await?;
        return Err(ApiError::Unauthenticated("invalid username or password"));
    }
    if let Err(e) = redis::cmd("DEL").arg(&key).query_async::<()>(&mut redis).await {
        tracing::warn!(error = %e, "login attempts not cleared: redis unavailable");
    }
    let (token, exp) = app.tokens.issue(&login.username, u64::try_from(iat).unwrap_or(0))?;
    let client = app.pg.get().await?;
    audit::record(&client, &actor, "login", Some(&login.username), None, json!({})).await?;
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
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "INSERT INTO admins (username, password_hash, role) VALUES ($1, $2, $3)
             ON CONFLICT (username) DO NOTHING RETURNING created_at",
            &[&new.username, &hash, &role.as_str()],
        )
        .await?
        .ok_or_else(|| ApiError::Conflict("an account with this username exists".into()))?;
    audit::record(
        &tx,
        &actor,
        "admin.create",
        Some(&new.username),
        None,
        json!({"role": role.as_str()}),
    )
    .await?;
    tx.commit().await?;
    let created_at: time::OffsetDateTime = row.get(0);
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
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    // Serialise account changes so two concurrent patches cannot both remove "the other" admin.
    tx.execute("LOCK TABLE admins IN SHARE ROW EXCLUSIVE MODE", &[]).await?;
    let row = tx
        .query_opt(
            // A new password ends the tokens issued before it (`authorize` compares their
            // `iat`). Stamped a second ahead: a login that read the old hash just before
            // this commits gets an `iat` before the stamp too, while logins after the
            // commit are issued no earlier than it.
            "UPDATE admins SET role = coalesce($2, role), disabled = coalesce($3, disabled),
                    password_hash = coalesce($4, password_hash),
                    password_changed_at = CASE WHEN $4::text IS NULL THEN password_changed_at
                                               ELSE clock_timestamp() + interval '1 second' END,
                    updated_at = now()
             WHERE username = $1 RETURNING role, disabled, created_at",
            &[&username, &role.map(Role::as_str), &patch.disabled, &hash],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("no such account"))?;
    let active_admins: i64 = tx
        .query_one("SELECT count(*) FROM admins WHERE role = 'admin' AND NOT disabled", &[])
        .await?
        .get(0);
    if active_admins == 0 {
        return Err(ApiError::Conflict(
            "the last active admin cannot be disabled or demoted".into(),
        ));
    }
    audit::record(
        &tx,
        &actor,
        "admin.update",
        Some(username),
        None,
        json!({"role": role.map(Role::as_str), "disabled": patch.disabled, "password_changed": hash.is_some()}),
    )
    .await?;
    tx.commit().await?;
    let created_at: time::OffsetDateTime = row.get(2);
    response::json(
        StatusCode::OK,
        &json!({"username": username, "role": row.get::<_, &str>(0), "disabled": row.get::<_, bool>(1),
                "created_at": rfc3339(created_at)}),
    )
}
