//! Operator API (docs/api.md §4): JWT-authenticated, role-checked, every change audited.
//!
//! The handlers are thin: each authorizes, parses and checks the request, calls the
//! domain module that owns the work, and renders its answer. The domains:
//! `catalogue::products` (products, prices), `stock` (imports, voids), `resellers`
//! (accounts, keys, webhook secrets), `balance` then `hot_balance` (adjustments),
//! `orders` (refunds, search), `reports`, `rebates` (monthly rebates), `callbacks::events`
//! (events, redelivery), `auth::accounts` (operator accounts, logins), `audit` (the log;
//! every write commits with its row through `audit::Audited`).

pub mod audit;
pub mod codes;
pub mod events;
pub mod orders;
pub mod products;
pub mod rebates;
pub mod reports;
pub mod resellers;
pub mod risk;
pub mod session;
pub mod suppliers;

use hyper::body::Incoming;
use hyper::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::app::App;
use crate::audit::Actor;
use crate::auth::accounts;
use crate::auth::admin::{bearer, Admin, Need, Role};
use crate::error::ApiError;
use crate::http::{body, Ctx};

/// Authenticates the bearer token and checks that the account, as it is in Postgres
/// now, may do `need`. Runs before the body is read, so an unauthenticated caller never
/// gets the server to read a large body.
pub async fn authorize(app: &App, ctx: &Ctx, parts: &Parts, need: Need) -> Result<(Admin, Actor), ApiError> {
    let claims = app.tokens.verify(bearer(parts)?, app.clock.now_unix_secs())?;
    let account = accounts::standing(app, &claims.sub)
        .await?
        .ok_or(ApiError::Unauthenticated("missing, expired or invalid token"))?;
    if account.disabled {
        return Err(ApiError::Unauthenticated("account disabled"));
    }
    // A token issued before the account's last password change is over. `iat` is whole
    // seconds, so the change is rounded up to one; `accounts::update` stamps it a second
    // ahead and `session::login` issues no token before it, so neither a token from the
    // same second nor a fresh login is misjudged.
    if account
        .password_changed
        .is_some_and(|changed| i64::try_from(claims.iat).map_or(true, |iat| iat < changed))
    {
        return Err(ApiError::Unauthenticated(
            "token issued before the last password change",
        ));
    }
    let role =
        Role::parse(&account.role).ok_or_else(|| ApiError::internal(anyhow::anyhow!("unknown role in admins")))?;
    if !role.may(need) {
        return Err(ApiError::Forbidden);
    }
    let actor = Actor::admin(&claims.sub, ctx.client_ip(app, &parts.headers));
    Ok((
        Admin {
            username: claims.sub,
            role,
        },
        actor,
    ))
}

/// The preamble of every admin route without a body: the request's head, authorized.
pub async fn authorized_head(
    app: &App,
    ctx: &Ctx,
    req: hyper::Request<Incoming>,
    need: Need,
) -> Result<(Parts, Actor), ApiError> {
    let (parts, _) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, need).await?;
    Ok((parts, actor))
}

/// Reads and parses a JSON body within the configured size and time limits.
pub async fn json<T: DeserializeOwned>(app: &App, parts: &Parts, body: Incoming) -> Result<T, ApiError> {
    let bytes = body::read_json_body(parts, body, &app.config.http).await?;
    body::parse_json(&bytes)
}

/// The preamble of every admin route with a JSON body: authorize first (so nobody
/// unauthenticated makes us read a body), then read and parse the body.
pub async fn authorized_json<T: DeserializeOwned>(
    app: &App,
    ctx: &Ctx,
    req: hyper::Request<Incoming>,
    need: Need,
) -> Result<(Actor, T), ApiError> {
    let (parts, body) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, need).await?;
    Ok((actor, json(app, &parts, body).await?))
}

/// As [`authorized_json`], for a route whose body may be left out (`None`).
pub async fn authorized_optional_json<T: DeserializeOwned>(
    app: &App,
    ctx: &Ctx,
    req: hyper::Request<Incoming>,
    need: Need,
) -> Result<(Actor, Option<T>), ApiError> {
    let (parts, body) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, need).await?;
    let bytes = body::read_json_body(&parts, body, &app.config.http).await?;
    let v = if bytes.is_empty() {
        None
    } else {
        Some(body::parse_json(&bytes)?)
    };
    Ok((actor, v))
}

/// Display names of products and resellers.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name must be 1 to 200 characters"));
    }
    Ok(())
}
