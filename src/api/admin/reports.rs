//! Operator reports (docs/api.md §4, "Reports"): reseller loyalty and product sales over a range
//! `[from, to)` (worked out by `crate::reports`), as JSON or, with `Accept: text/csv`, as CSV.

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::authorized_head;
use crate::app::App;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::query::{rfc3339, Query};
use crate::http::response::{self, CsvLine};
use crate::http::{Body, Ctx};
use crate::reports::{self, ProductLine, Range, ResellerLine};

/// What both reports start with: the operator's read right, a bulkhead slot (held until
/// the answer is built) and the range.
async fn open(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
) -> Result<(Parts, Range, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let (parts, _) = authorized_head(app, ctx, req, Need::Read).await?;
    let slot = app.bulkheads.reports.enter().await?;
    let range = Range::parse(&Query::parse(parts.uri.query())?, app.clock.now())?;
    Ok((parts, range, slot))
}

/// `GET /admin/v1/reports/resellers?from=&to=`
pub async fn resellers(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, range, _slot) = open(app, ctx, req).await?;
    let lines = reports::resellers(app, &range).await?;
    answer(&parts, &range, "resellers", lines, json!({}))
}

/// `GET /admin/v1/reports/products?from=&to=`
pub async fn products(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, range, _slot) = open(app, ctx, req).await?;
    let (lines, days) = reports::products(app, &range).await?;
    answer(&parts, &range, "products", lines, json!({"days": days}))
}

impl CsvLine for ResellerLine {
    fn text_cells(&mut self) -> Vec<&mut String> {
        vec![&mut self.reseller_id, &mut self.name, &mut self.tier]
    }
}

impl CsvLine for ProductLine {
    fn text_cells(&mut self) -> Vec<&mut String> {
        vec![&mut self.sku, &mut self.name, &mut self.status]
    }
}

/// JSON `{"from","to",<key>: [...], ...extra}`, or CSV (one header row, then the lines)
/// when the caller accepts `text/csv` and not JSON first.
fn answer<T: CsvLine>(
    parts: &Parts,
    range: &Range,
    key: &str,
    lines: Vec<T>,
    extra: serde_json::Value,
) -> Result<Response<Body>, ApiError> {
    if response::wants_csv(parts) {
        return response::csv(lines, &format!("{key}-report.csv"));
    }
    let mut body = json!({"from": rfc3339(range.from), "to": rfc3339(range.to), key: lines});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    response::json(StatusCode::OK, &body)
}
