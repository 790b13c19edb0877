//! Merchant callback events: a reseller's recent ones with their delivery attempts, and
//! redelivery of one (`callbacks::events`).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::authorized_head;
use crate::app::App;
use crate::auth::admin::Need;
use crate::callbacks::events;
use crate::error::ApiError;
use crate::http::query::Query;
use crate::http::{response, Body, Ctx};

/// `GET /admin/v1/resellers/{id}/events?limit=&cursor=`: newest first.
pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>, reseller_id: &str) -> Result<Response<Body>, ApiError> {
    let (parts, _) = authorized_head(app, ctx, req, Need::Read).await?;
    let q = Query::parse(parts.uri.query())?;
    let limit = q.page_limit()?;
    let cursor = q.int("cursor")?;
    let found = events::list(app, reseller_id, cursor, limit).await?;
    response::json(
        StatusCode::OK,
        &json!({"events": found.items, "next_cursor": found.next_cursor}),
    )
}

/// `POST /admin/v1/events/{id}/redeliver`: due now, with a fresh 24-hour retry window.
pub async fn redeliver(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    event_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (_, actor) = authorized_head(app, ctx, req, Need::Write).await?;
    let event = events::redeliver(app, &actor, event_id).await?;
    response::json(StatusCode::ACCEPTED, &event)
}
