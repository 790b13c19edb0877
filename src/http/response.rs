//! Building answers: JSON and CSV bodies, the docs/api.md §2 error body, request ids.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ACCEPT, CONNECTION, CONTENT_DISPOSITION, CONTENT_TYPE, RETRY_AFTER};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use rand::Rng;
use serde::Serialize;

use crate::error::ApiError;

pub type Body = Full<Bytes>;

pub const JSON: HeaderValue = HeaderValue::from_static("application/json");

pub fn new_request_id() -> String {
    let bytes: [u8; 12] = rand::thread_rng().gen();
    let mut id = *b"req_000000000000000000000000";
    hex::encode_to_slice(bytes, &mut id[4..]).expect("24 hex digits fit");
    String::from_utf8_lossy(&id).into_owned()
}

pub fn set_request_id(resp: &mut Response<Body>, request_id: &str) {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
}

pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Result<Response<Body>, ApiError> {
    let body = serde_json::to_vec(value).map_err(ApiError::internal)?;
    Ok(bytes(status, JSON, body))
}

/// A JSON answer carrying a secret shown only this once: no cache may keep it.
pub fn secret_json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Result<Response<Body>, ApiError> {
    let mut resp = json(status, value)?;
    resp.headers_mut()
        .insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Marks the answer to an idempotent replay (`Idempotent-Replayed: true`).
pub fn mark_replayed(resp: &mut Response<Body>) {
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
}

/// A line of a CSV answer. Its text cells are those a spreadsheet would run as a formula
/// when one starts with `=`, `+`, `-`, `@`, tab or CR: in CSV those get a leading `'`
/// (OWASP's advice), so an operator-given name or reference cannot become a formula on a
/// desk.
pub trait CsvLine: Serialize + Default {
    fn text_cells(&mut self) -> Vec<&mut String>;
}

fn defuse(cell: &mut String) {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        cell.insert(0, '\'');
    }
}

/// A `200` CSV attachment named `filename`: one header row (even with no lines), then
/// the lines.
pub fn csv<T: CsvLine>(mut lines: Vec<T>, filename: &str) -> Result<Response<Body>, ApiError> {
    let fail = |e: &dyn std::fmt::Display| ApiError::internal(anyhow::anyhow!("csv: {e}"));
    let mut w = csv::Writer::from_writer(Vec::new());
    let body = if lines.is_empty() {
        // csv writes the header with the first record: write a blank one, keep the header.
        w.serialize(T::default()).map_err(|e| fail(&e))?;
        let mut body = w.into_inner().map_err(|e| fail(&e))?;
        let end = body.iter().position(|&b| b == b'\n').map_or(body.len(), |i| i + 1);
        body.truncate(end);
        body
    } else {
        for line in &mut lines {
            line.text_cells().into_iter().for_each(defuse);
            w.serialize(&*line).map_err(|e| fail(&e))?;
        }
        w.into_inner().map_err(|e| fail(&e))?
    };
    let mut resp = bytes(
        StatusCode::OK,
        HeaderValue::from_static("text/csv; charset=utf-8"),
        body,
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        resp.headers_mut().insert(CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// CSV when `text/csv` comes before any JSON type in `Accept` (order, not q-values:
/// clients asking for CSV name it alone).
pub fn wants_csv(parts: &Parts) -> bool {
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

pub fn bytes(status: StatusCode, content_type: HeaderValue, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, content_type);
    resp
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    request_id: &'a str,
}

pub fn error(e: &ApiError, request_id: &str) -> Response<Body> {
    let message = e.client_message();
    let body = ErrorBody {
        error: ErrorDetail {
            code: e.code(),
            message: &message,
            request_id,
        },
    };
    // Serialising three strings cannot fail; fall back to a fixed body all the same.
    let body = serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":{\"code\":\"internal_error\"}}".to_vec());
    let mut resp = bytes(e.status(), JSON, body);
    if let Some(secs) = e.retry_after_secs() {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if let ApiError::MethodNotAllowed { allow } = e {
        resp.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    }
    // RFC 9110 §11.6.1: a 401 names the scheme that would be accepted.
    let challenge = match e {
        ApiError::Unauthenticated(_) => Some("Bearer"),
        e if e.status() == StatusCode::UNAUTHORIZED => Some(crate::auth::signing::SCHEME),
        _ => None,
    };
    if let Some(scheme) = challenge {
        resp.headers_mut()
            .insert(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
    }
    if e.closes_connection() {
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
