//! Operator API (API.md §4): JWT-authenticated, role-checked, every change audited.

pub mod audit;
pub mod codes;
pub mod products;
pub mod resellers;
pub mod session;

use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::http::request::Parts;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::app::App;
use crate::audit::Actor;
use crate::auth::admin::{bearer, Admin, Need, Role};
use crate::error::ApiError;
use crate::http::{body, Ctx};

/// Authenticates the bearer token and checks that the account, as it is in Postgres
/// now, may do `need`. Runs before the body is read, so an unauthenticated caller never
/// gets the server to read a large body.
pub async fn authorize(app: &App, ctx: &Ctx, parts: &Parts, need: Need) -> Result<(Admin, Actor), ApiError> {
    let claims = app.tokens.verify(bearer(parts)?)?;
    let client = app.pg.get().await?;
    let stmt = client
        .prepare_cached("SELECT role, disabled FROM admins WHERE username = $1")
        .await?;
    let row = client
        .query_opt(&stmt, &[&claims.sub])
        .await?
        .ok_or(ApiError::Unauthenticated("missing, expired or invalid token"))?;
    if row.get::<_, bool>(1) {
        return Err(ApiError::Unauthenticated("account disabled"));
    }
    let role = Role::parse(row.get(0)).ok_or_else(|| ApiError::internal(anyhow::anyhow!("unknown role in admins")))?;
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

pub async fn read_body(app: &App, parts: &Parts, body: Incoming) -> Result<Bytes, ApiError> {
    body::read_json_body(
        parts,
        body,
        app.config.http.json_body_max_bytes,
        Duration::from_millis(app.config.http.body_read_timeout_ms),
    )
    .await
}

pub async fn json<T: DeserializeOwned>(app: &App, parts: &Parts, body: Incoming) -> Result<T, ApiError> {
    body::parse_json(&read_body(app, parts, body).await?)
}

/// For PATCH fields that may be set to `null`: absent is `None`, `null` is `Some(None)`.
pub fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}
