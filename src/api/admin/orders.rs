//! `GET /admin/v1/orders` (search, newest first, paged by cursor: `orders::search`),
//! `POST /admin/v1/orders/{order_id}/refund` (`orders::refund`) and
//! `GET /admin/v1/reconcile` (`reconcile`).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{authorized_head, authorized_optional_json};
use crate::app::App;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::query::Query;
use crate::http::{response, Body, Ctx};
use crate::orders::search::{self, Search};

const REASON_MAX: usize = 500;

pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, _) = authorized_head(app, ctx, req, Need::Read).await?;
    let _slot = app.bulkheads.reports.enter().await?;
    let q = Query::parse(parts.uri.query())?;
    let window = q.window()?;
    let status = q.get("status");
    if status.is_some_and(|s| !matches!(s, "fulfilled" | "refunded" | "processing" | "failed")) {
        return Err(ApiError::invalid(
            "status must be fulfilled, refunded, processing or failed",
        ));
    }
    let search = Search {
        reseller_id: q.get("reseller_id"),
        sku: q.get("sku"),
        status,
        window,
    };
    let found = search::search(app, &search).await?;
    response::json(
        StatusCode::OK,
        &json!({"orders": found.items, "next_cursor": found.next_cursor}),
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    reason: Option<String>,
}

pub async fn refund(app: &App, ctx: &Ctx, req: Request<Incoming>, order_id: &str) -> Result<Response<Body>, ApiError> {
    // The reason is optional, so the body is too.
    let (actor, body) = authorized_optional_json::<RefundBody>(app, ctx, req, Need::Write).await?;
    let body = body.unwrap_or_default();
    if body.reason.as_ref().is_some_and(|r| r.len() > REASON_MAX) {
        return Err(ApiError::invalid(format!("reason: at most {REASON_MAX} bytes")));
    }
    let refunded = crate::orders::refund::refund(app, &actor, order_id, body.reason.as_deref()).await?;
    let mut resp = response::json(StatusCode::OK, &refunded)?;
    if refunded.replayed {
        response::mark_replayed(&mut resp);
    }
    Ok(resp)
}

/// The reconciliation report; `200` either way, with `"ok": false` and the problems
/// listed when anything disagrees.
pub async fn reconcile(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    authorized_head(app, ctx, req, Need::Read).await?;
    let _slot = app.bulkheads.reports.enter().await?;
    let report = crate::reconcile::run(app).await.map_err(ApiError::store)?;
    if !report.ok {
        tracing::error!(problems = ?report.problems, "reconciliation found differences");
        metrics::counter!("cardgate_reconcile_failures_total").increment(1);
    }
    response::json(StatusCode::OK, &report)
}
