//! `GET /admin/v1/orders` (search, newest first, paged by cursor),
//! `POST /admin/v1/orders/{order_id}/refund` and `GET /admin/v1/reconcile`.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::authorize;
use crate::app::App;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::query::{page, rfc3339, Query};
use crate::http::{response, Body, Ctx};

const REASON_MAX: usize = 500;

pub async fn list(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, _) = req.into_parts();
    authorize(app, ctx, &parts, Need::Read).await?;
    let _slot = app.bulkheads.reports.enter()?;
    let q = Query::parse(parts.uri.query())?;
    let limit = q.page_limit()?;
    let (from, to) = (q.time("from")?, q.time("to")?);
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            return Err(ApiError::invalid("from must be before to"));
        }
    }
    let status = q.get("status");
    if status.is_some_and(|s| s != "fulfilled" && s != "refunded") {
        return Err(ApiError::invalid("status must be fulfilled or refunded"));
    }
    let client = app.pg.get().await?;
    let mut rows = client
        .query(
            "SELECT o.id, o.order_id, r.reseller_id, o.merchant_order_no, o.sku, o.quantity, o.unit_price, o.amount,
                    o.currency, o.status, o.created_at, o.refunded_at, o.refund_reason
               FROM orders o JOIN resellers r ON r.id = o.reseller_id
              WHERE ($1::text IS NULL OR r.reseller_id = $1) AND ($2::text IS NULL OR o.sku = $2)
                AND ($3::timestamptz IS NULL OR o.created_at >= $3) AND ($4::timestamptz IS NULL OR o.created_at < $4)
                AND ($5::text IS NULL OR o.status = $5) AND ($6::bigint IS NULL OR o.id < $6)
              ORDER BY o.id DESC LIMIT $7",
            &[
                &q.get("reseller_id"),
                &q.get("sku"),
                &from,
                &to,
                &status,
                &q.int("cursor")?,
                &(limit + 1),
            ],
        )
        .await?;
    let more = page(&mut rows, limit);
    let orders: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({"order_id": r.get::<_, &str>(1), "reseller_id": r.get::<_, &str>(2),
                   "merchant_order_no": r.get::<_, &str>(3), "sku": r.get::<_, &str>(4),
                   "quantity": r.get::<_, i32>(5), "unit_price": r.get::<_, i64>(6), "amount": r.get::<_, i64>(7),
                   "currency": r.get::<_, &str>(8), "status": r.get::<_, &str>(9),
                   "created_at": rfc3339(r.get(10)),
                   "refunded_at": r.get::<_, Option<time::OffsetDateTime>>(11).map(rfc3339),
                   "refund_reason": r.get::<_, Option<&str>>(12)})
        })
        .collect();
    let next_cursor = more
        .then(|| rows.last().map(|r| r.get::<_, i64>(0).to_string()))
        .flatten();
    response::json(StatusCode::OK, &json!({"orders": orders, "next_cursor": next_cursor}))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    reason: Option<String>,
}

pub async fn refund(app: &App, ctx: &Ctx, req: Request<Incoming>, order_id: &str) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let (_, actor) = authorize(app, ctx, &parts, Need::Write).await?;
    // The reason is optional, so the body is too.
    let bytes = crate::http::body::read_json_body(&parts, body, &app.config.http).await?;
    let body: RefundBody = if bytes.is_empty() {
        RefundBody::default()
    } else {
        crate::http::body::parse_json(&bytes)?
    };
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
    let (parts, _) = req.into_parts();
    authorize(app, ctx, &parts, Need::Read).await?;
    let _slot = app.bulkheads.reports.enter()?;
    let report = crate::reconcile::run(app).await.map_err(ApiError::store)?;
    if !report.ok {
        tracing::error!(problems = ?report.problems, "reconciliation found differences");
        metrics::counter!("cardgate_reconcile_failures_total").increment(1);
    }
    response::json(StatusCode::OK, &report)
}
