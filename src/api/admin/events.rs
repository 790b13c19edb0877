//! Merchant callback events: a reseller's recent ones with their delivery attempts, and
//! redelivery of one.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::authorize;
use crate::app::App;
use crate::audit;
use crate::auth::admin::Need;
use crate::callbacks::{event_json, EVENT_COLUMNS};
use crate::error::ApiError;
use crate::http::query::{page, Query};
use crate::http::{response, Body, Ctx};

/// `GET /admin/v1/resellers/{id}/events?limit=&cursor=`: newest first.
pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>, reseller_id: &str) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    authorize(app, ctx, &parts, Need::Read).await?;
    let q = Query::parse(parts.uri.query())?;
    let limit = q.page_limit()?;
    let cursor = q.int("cursor")?;
    let client = app.pg.get().await?;
    let pk: i64 = client
        .query_opt("SELECT id FROM resellers WHERE reseller_id = $1", &[&reseller_id])
        .await?
        .ok_or_else(|| ApiError::not_found("no such reseller"))?
        .get(0);
    let mut rows = client
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events e
                  WHERE e.reseller_id = $1 AND ($2::bigint IS NULL OR e.id < $2)
                  ORDER BY e.id DESC LIMIT $3"
            ),
            &[&pk, &cursor, &(limit + 1)],
        )
        .await?;
    let more = page(&mut rows, limit);
    let events: Vec<_> = rows.iter().map(event_json).collect();
    let next_cursor = more
        .then(|| rows.last().map(|r| r.get::<_, i64>(8).to_string()))
        .flatten();
    response::json(StatusCode::OK, &json!({"events": events, "next_cursor": next_cursor}))
}

/// `POST /admin/v1/events/{id}/redeliver`: due now, with a fresh 24-hour retry window,
/// whatever its state (a receiver may have lost an event it acknowledged).
pub async fn redeliver(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    event_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    let client = app.pg.get().await?;
    let n = client
        .execute(
            "UPDATE events SET status = 'pending', next_attempt_at = now(), retry_until = now() + interval '24 hours',
                    delivered_at = NULL
              WHERE event_id = $1",
            &[&event_id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("no such event"));
    }
    audit::record(&client, &actor, "event.redeliver", Some(event_id), None, json!({})).await?;
    let row = client
        .query_one(
            &format!("SELECT {EVENT_COLUMNS} FROM events e WHERE e.event_id = $1"),
            &[&event_id],
        )
        .await?;
    response::json(StatusCode::ACCEPTED, &event_json(&row))
}
