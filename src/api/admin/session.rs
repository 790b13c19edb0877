//! Login and operator accounts.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::authorized_json;
use crate::app::App;
use crate::audit::{self, Actor};
use crate::auth::admin::{hash_password, verify_password, Need, Role};
use crate::error::ApiError;
use crate::http::query::rfc3339;
use crate::http::{response, Body, Ctx};

/// Failed logins allowed per username and client address within `LOGIN_LOCKOUT_SECS`
/// before that pair is refused outright (whatever the password) until the window ends.
/// Per address, so nobody can lock the real operator out by failing from elsewhere.
const LOGIN_FAILURES_MAX: i64 = 5;
const LOGIN_LOCKOUT_SECS: i64 = 900;
const PASSWORD_MIN_CHARS: usize = 8;
const PASSWORD_MAX_BYTES: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

pub async fn login(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let login: Login = super::json(app, &parts, body).await?;
    if !valid_username(&login.username) || login.password.len() > PASSWORD_MAX_BYTES {
        return Err(ApiError::Unauthenticated("invalid username or password"));
    }
    let ip = ctx.client_ip(app, &parts.headers);
    let key = app.keys.login_failures(&login.username, ip);
    let mut redis = app.redis();
    // With Redis away the count is skipped, not the login: operators must be able to sign
    // in to look at the outage (Argon2 still makes each guess slow).
    let counted: redis::RedisResult<(Option<i64>, i64)> =
        redis::pipe().get(&key).ttl(&key).query_async(&mut redis).await;
    match counted {
        Ok((Some(failures), ttl)) if failures >= LOGIN_FAILURES_MAX => {
            return Err(ApiError::RateLimited {
                retry_after_secs: ttl.max(1) as u64,
            })
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "login failures not counted: redis unavailable"),
    }

    let client = app.pg.get().await?;
    let row = client
        .query_opt(
            "SELECT password_hash, disabled FROM admins WHERE username = $1",
            &[&login.username],
        )
        .await?;
    let stored: Option<String> = row.as_ref().map(|r| r.get(0));
    let disabled = row.as_ref().is_some_and(|r| r.get::<_, bool>(1));
    let password = login.password;
    // Argon2 is deliberately slow: keep it off the async workers.
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, stored.as_deref()))
        .await
        .map_err(ApiError::internal)?;
    let actor = Actor::admin(&login.username, ip);
    if !ok || disabled {
        let counted = redis::pipe()
            .incr(&key, 1)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(LOGIN_LOCKOUT_SECS)
            .arg("NX")
            .ignore()
            .query_async::<()>(&mut redis)
            .await;
        if let Err(e) = counted {
            tracing::warn!(error = %e, "login failure not counted: redis unavailable");
        }
        audit::record(&client, &actor, "login.failed", Some(&login.username), None, json!({})).await?;
        return Err(ApiError::Unauthenticated("invalid username or password"));
    }
    if let Err(e) = redis::cmd("DEL").arg(&key).query_async::<()>(&mut redis).await {
        tracing::warn!(error = %e, "login failures not cleared: redis unavailable");
    }
    let (token, exp) = app.tokens.issue(&login.username)?;
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
    let password = new.password;
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(ApiError::internal)??;
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
            Some(
                tokio::task::spawn_blocking(move || hash_password(&p))
                    .await
                    .map_err(ApiError::internal)??,
            )
        }
        None => None,
    };
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    // Serialise account changes so two concurrent patches cannot both remove "the other" admin.
    tx.execute("LOCK TABLE admins IN SHARE ROW EXCLUSIVE MODE", &[]).await?;
    let row = tx
        .query_opt(
            "UPDATE admins SET role = coalesce($2, role), disabled = coalesce($3, disabled),
                    password_hash = coalesce($4, password_hash), updated_at = now()
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
