//! Operator accounts as Postgres records them, and the count of failed logins in Redis:
//! what a token's holder may do now, what a login checks, and the admin's changes to
//! accounts (audited with them).

use std::net::IpAddr;
use std::sync::LazyLock;

use redis::Script;
use serde_json::json;

use super::admin::Role;
use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::error::ApiError;

/// Login attempts allowed per username and client address within `LOGIN_LOCKOUT_SECS`
/// before that pair is refused outright (whatever the password) until the window ends.
/// Per address, so nobody can lock the real operator out by failing from elsewhere.
const LOGIN_ATTEMPTS_MAX: i64 = 5;
const LOGIN_LOCKOUT_SECS: i64 = 900;

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

/// An account as `authorize` weighs it on every call.
pub struct Standing {
    pub role: String,
    pub disabled: bool,
    /// The last password change, rounded up to a whole second.
    pub password_changed: Option<i64>,
}

pub async fn standing(app: &App, username: &str) -> Result<Option<Standing>, ApiError> {
    let client = app.pg.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT role, disabled, ceil(extract(epoch FROM password_changed_at))::bigint
             FROM admins WHERE username = $1",
        )
        .await?;
    Ok(client.query_opt(&stmt, &[&username]).await?.map(|row| Standing {
        role: row.get(0),
        disabled: row.get(1),
        password_changed: row.get(2),
    }))
}

/// Counts a login attempt for the pair before its password is checked; past the limit
/// it is `429` until the window ends. With Redis away the attempt is not counted, and the
/// login not refused: operators must be able to sign in to look at the outage (the
/// per-address limit still holds).
pub async fn count_login_attempt(app: &App, username: &str, ip: IpAddr) -> Result<(), ApiError> {
    let mut redis = app.redis();
    match COUNT_ATTEMPT
        .key(app.keys.login_failures(username, ip))
        .arg(LOGIN_LOCKOUT_SECS)
        .invoke_async::<(i64, i64)>(&mut redis)
        .await
    {
        Ok((attempts, ttl)) if attempts > LOGIN_ATTEMPTS_MAX => Err(ApiError::RateLimited {
            retry_after_secs: ttl.max(1) as u64,
        }),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "login attempt not counted: redis unavailable");
            Ok(())
        }
    }
}

/// A successful login clears the pair's count.
pub async fn clear_login_attempts(app: &App, username: &str, ip: IpAddr) {
    let mut redis = app.redis();
    if let Err(e) = redis::cmd("DEL")
        .arg(app.keys.login_failures(username, ip))
        .query_async::<()>(&mut redis)
        .await
    {
        tracing::warn!(error = %e, "login attempts not cleared: redis unavailable");
    }
}

/// What a login checks its password against. The connection is let go before the
/// answer, so none is held while Argon2 runs.
pub struct ForLogin {
    pub password_hash: Option<String>,
    pub disabled: bool,
    /// The token's `iat`: the database's clock when the account was read, and never
    /// before the last password change (see [`update`]).
    pub iat: i64,
}

pub async fn for_login(app: &App, username: &str) -> Result<ForLogin, ApiError> {
    let row = app
        .pg
        .get()
        .await?
        .query_opt(
            "SELECT password_hash, disabled, floor(extract(epoch FROM clock_timestamp()))::bigint,
                    ceil(extract(epoch FROM password_changed_at))::bigint
             FROM admins WHERE username = $1",
            &[&username],
        )
        .await?;
    Ok(ForLogin {
        password_hash: row.as_ref().map(|r| r.get(0)),
        disabled: row.as_ref().is_some_and(|r| r.get::<_, bool>(1)),
        iat: row
            .as_ref()
            .map(|r| r.get::<_, i64>(2).max(r.get::<_, Option<i64>>(3).unwrap_or(0)))
            .unwrap_or(0),
    })
}

/// `login` or `login.failed`: changes nothing else, so recorded on its own.
pub async fn audit_login(app: &App, actor: &Actor, username: &str, ok: bool) -> Result<(), ApiError> {
    let client = app.pg.get().await?;
    let action = if ok { "login" } else { "login.failed" };
    crate::audit::record(&client, actor, action, Some(username), None, json!({})).await?;
    Ok(())
}

/// A new account (`409` if the username is taken); answers when it was created.
pub async fn create(
    app: &App,
    actor: &Actor,
    username: &str,
    password_hash: &str,
    role: Role,
) -> Result<time::OffsetDateTime, ApiError> {
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "admin.create", username).await?;
    let row = tx
        .query_opt(
            "INSERT INTO admins (username, password_hash, role) VALUES ($1, $2, $3)
             ON CONFLICT (username) DO NOTHING RETURNING created_at",
            &[&username, &password_hash, &role.as_str()],
        )
        .await?
        .ok_or_else(|| ApiError::Conflict("an account with this username exists".into()))?;
    tx.commit(json!({"role": role.as_str()})).await?;
    Ok(row.get(0))
}

/// An account after a change.
pub struct Account {
    pub role: String,
    pub disabled: bool,
    pub created_at: time::OffsetDateTime,
}

/// Changes an account; the last active admin cannot be disabled or demoted (`409`).
pub async fn update(
    app: &App,
    actor: &Actor,
    username: &str,
    role: Option<Role>,
    disabled: Option<bool>,
    password_hash: Option<&str>,
) -> Result<Account, ApiError> {
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "admin.update", username).await?;
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
            &[&username, &role.map(Role::as_str), &disabled, &password_hash],
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
    tx.commit(json!({"role": role.map(Role::as_str), "disabled": disabled,
                     "password_changed": password_hash.is_some()}))
        .await?;
    Ok(Account {
        role: row.get(0),
        disabled: row.get(1),
        created_at: row.get(2),
    })
}
