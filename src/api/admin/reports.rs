//! Operator reports (docs/api.md §4, "Reports"): reseller loyalty and product sales over a range
//! `[from, to)` (worked out by `crate::reports`), as JSON or, with `Accept: text/csv`, as CSV.

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use super::authorized_head;
use crate::app::App;
use crate::auth::admin::Need;
use crate::error::ApiError;
use crate::http::query::{rfc3339, Query};
use crate::http::{response, Body, Ctx};
use crate::reports::{self, ProductLine, Range, ResellerLine};

/// What both reports start with: the operator's read right, a bulkhead slot (held until
/// the answer is built) and the range.
async fn open(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
) -> Result<(Parts, Range, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let (parts, _) = authorized_head(app, ctx, req, Need::Read).await?;
    let slot = app.bulkheads.reports.enter()?;
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

/// A report line's text cells, which a spreadsheet would run as a formula when one
/// starts with `=`, `+`, `-`, `@`, tab or CR: in CSV those get a leading `'` (OWASP's
/// advice), so an operator-given name or SKU cannot become a formula on a desk.
trait CsvLine: Serialize + Default {
    fn text_cells(&mut self) -> Vec<&mut String>;
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

fn defuse(cell: &mut String) {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        cell.insert(0, '\'');
    }
}

/// The CSV: one header row (even with no lines), then the lines.
fn csv_of<T: CsvLine>(mut lines: Vec<T>) -> Result<Vec<u8>, ApiError> {
    let fail = |e: &dyn std::fmt::Display| ApiError::internal(anyhow::anyhow!("csv: {e}"));
    let mut w = csv::Writer::from_writer(Vec::new());
    if lines.is_empty() {
        // csv writes the header with the first record: write a blank one, keep the header.
        w.serialize(T::default()).map_err(|e| fail(&e))?;
        let mut body = w.into_inner().map_err(|e| fail(&e))?;
        let end = body.iter().position(|&b| b == b'\n').map_or(body.len(), |i| i + 1);
        body.truncate(end);
        return Ok(body);
    }
    for line in &mut lines {
        line.text_cells().into_iter().for_each(defuse);
        w.serialize(&*line).map_err(|e| fail(&e))?;
    }
    w.into_inner().map_err(|e| fail(&e))
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
    if wants_csv(parts) {
        let body = csv_of(lines)?;
        let mut resp = response::bytes(
            StatusCode::OK,
            HeaderValue::from_static("text/csv; charset=utf-8"),
            body,
        );
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{key}-report.csv\"")) {
            resp.headers_mut().insert(hyper::header::CONTENT_DISPOSITION, v);
        }
        return Ok(resp);
    }
    let mut body = json!({"from": rfc3339(range.from), "to": rfc3339(range.to), key: lines});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    response::json(StatusCode::OK, &body)
}

/// CSV when `text/csv` comes before any JSON type in `Accept` (order, not q-values:
/// clients asking for CSV name it alone).
fn wants_csv(parts: &Parts) -> bool {
    let accept = parts
        .headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let types = accept
        .split(',')
        .map(|t| t.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    for t in types {
        match t.as_str() {
            "text/csv" => return true,
            "application/json" | "*/*" | "application/*" => return false,
            _ => {}
        }
    }
    false
}
