//! `GET /admin/v1/risk/events` and `POST /admin/v1/resellers/{id}/risk/release` (`risk`).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::authorized_head;
use crate::app::App;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::query::Query;
use crate::http::{response, Body, Ctx};
use crate::risk::{self, Search};

const RULES: [&str; 4] = ["new_address", "velocity", "failed_signatures", "refund_rate"];

pub async fn events(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, _) = authorized_head(app, ctx, req, Need::Read).await?;
    // A search over a table that grows with traffic: bounded like the other searches.
    let _slot = app.bulkheads.reports.enter().await?;
    let q = Query::parse(parts.uri.query())?;
    let window = q.window()?;
    let rule = q.get("rule");
    if rule.is_some_and(|r| !RULES.contains(&r)) {
        return Err(ApiError::invalid(format!("rule must be one of {}", RULES.join(", "))));
    }
    let search = Search {
        reseller_id: q.get("reseller_id"),
        rule,
        window,
    };
    let found = risk::events(app, &search).await?;
    response::json(
        StatusCode::OK,
        &json!({"events": found.items, "next_cursor": found.next_cursor}),
    )
}

/// Answers whether a hold was ended (`released_rule`: the rule that had held it), so a
/// repeat is harmless and says so.
pub async fn release(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    reseller_id: &str,
) -> Result<Response<Body>, ApiError> {
    let (_, actor) = authorized_head(app, ctx, req, Need::Write).await?;
    let released = risk::release(app, &actor, reseller_id).await?;
    response::json(
        StatusCode::OK,
        &json!({"reseller_id": reseller_id, "held": false, "released": released.is_some(), "rule": released}),
    )
}
