//! Reading request bodies: content type, size and time limits enforced while streaming.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::config::HttpConfig;
use crate::error::ApiError;

/// Whether the request declares a body at all (a length, or chunked transfer).
fn has_body(parts: &Parts) -> bool {
    match parts.headers.get(CONTENT_LENGTH) {
        Some(len) => len.to_str().ok().and_then(|l| l.trim().parse::<u64>().ok()) != Some(0),
        None => parts.headers.contains_key(hyper::header::TRANSFER_ENCODING),
    }
}

/// Whether the declared content type is `want` (parameters such as `charset` allowed).
pub fn content_type_is(parts: &Parts, want: &str) -> bool {
    parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
}

/// Reads a JSON route's body: `application/json` or nothing, at most `limit` bytes, all of
/// it within `timeout`. The size is checked against `Content-Length` first and then again
/// on every frame, so a lying or chunked client is cut off as soon as it passes the limit.
pub async fn read_json_body(parts: &Parts, body: Incoming, http: &HttpConfig) -> Result<Bytes, ApiError> {
    read_json_body_up_to(parts, body, http, http.json_body_max_bytes).await
}

/// As [`read_json_body`], for the one route whose body may be larger than the usual limit.
pub async fn read_json_body_up_to(
    parts: &Parts,
    body: Incoming,
    http: &HttpConfig,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let timeout = Duration::from_millis(http.body_read_timeout_ms);
    if !has_body(parts) {
        return Ok(Bytes::new());
    }
    if !content_type_is(parts, "application/json") {
        return Err(ApiError::UnsupportedMediaType("Content-Type must be application/json"));
    }
    read_limited(parts, body, limit, timeout).await
}

/// `payload_too_large` when the client declared a body longer than `limit`: refused
/// before any of it is read.
pub fn refuse_declared_over(parts: &Parts, limit: u64) -> Result<(), ApiError> {
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(len) if len > limit => Err(ApiError::PayloadTooLarge),
        _ => Ok(()),
    }
}

async fn read_limited(parts: &Parts, body: Incoming, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    refuse_declared_over(parts, limit as u64)?;
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ApiError::SlowBody),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::PayloadTooLarge),
        Ok(Err(_)) => Err(ApiError::invalid("request body could not be read")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Parses a JSON body. Broken JSON is `invalid_json`; well-formed JSON of the wrong shape
/// is `invalid_request` naming the offending field (docs/api.md §2): serde's own message
/// names a missing or unknown field but not one of the wrong type, so the path to it is
/// found by parsing again, on the error's path only.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::InvalidJson("request body is empty".into()));
    }
    let value = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid(with_path::<T>(bytes).unwrap_or_else(|| e.to_string())),
        _ => ApiError::InvalidJson(e.to_string()),
    })?;
    if has_escaped_nul(bytes) {
        return Err(ApiError::invalid("strings may not contain NUL (\\u0000)"));
    }
    Ok(value)
}

/// serde's message for a body of the wrong shape, led by the path to the offending value
/// (`amount`, `sources[0].priority`) when it is inside the top-level object.
fn with_path<T: DeserializeOwned>(bytes: &[u8]) -> Option<String> {
    let e = serde_path_to_error::deserialize::<_, T>(&mut serde_json::Deserializer::from_slice(bytes)).err()?;
    let path = e.path().to_string();
    Some(if path == "." {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    })
}

/// Whether a JSON text holds a `\u0000` escape. Postgres text cannot store NUL, so a
/// string with one would fail deep inside a handler instead of being refused here. A
/// backslash occurs only inside strings and always starts an escape, so skipping the
/// escaped character keeps `\\u0000` (a backslash, then "u0000") apart.
fn has_escaped_nul(b: &[u8]) -> bool {
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'u') && b.get(i + 2..i + 6) == Some(b"0000".as_slice()) {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// For PATCH fields that may be set to `null`: absent is `None`, `null` is `Some(None)`.
pub fn nullable<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_escaped_nul_is_found_and_an_escaped_backslash_is_not_one() {
        assert!(has_escaped_nul(br#"{"name":"a\u0000b"}"#));
        assert!(has_escaped_nul(br#"{"name":"\\\u0000"}"#));
        assert!(!has_escaped_nul(br#"{"name":"a\\u0000b"}"#));
        assert!(!has_escaped_nul(br#"{"name":"\u00e9\u0001"}"#));
        assert!(matches!(
            parse_json::<serde_json::Value>(br#"{"name":"a\u0000"}"#),
            Err(ApiError::InvalidRequest(_))
        ));
    }

    #[test]
    fn a_value_of_the_wrong_type_is_refused_naming_its_field() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Source {
            priority: i32,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Body {
            amount: i64,
            sources: Vec<Source>,
        }
        let message = |body: &[u8]| match parse_json::<Body>(body) {
            Err(ApiError::InvalidRequest(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(message(br#"{"amount":"500","sources":[]}"#).starts_with("amount: invalid type: string"));
        assert!(message(br#"{"amount":null,"sources":[]}"#).starts_with("amount: "));
        assert!(message(br#"{"amount":1,"sources":[{"priority":3000000000}]}"#).starts_with("sources[0].priority: "));
        // Those serde names already are not named twice.
        assert_eq!(
            message(br#"{"sources":[]}"#),
            "missing field `amount` at line 1 column 14"
        );
        assert!(matches!(
            parse_json::<Body>(br#"{"amount":"#),
            Err(ApiError::InvalidJson(_))
        ));
    }
}
