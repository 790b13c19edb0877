//! HTTP to the gateway: one signed `POST /v1/orders/batch`, and what its answer means.
//!
//! This layer never sleeps and never retries: it turns each answer into a [`BatchAnswer`]
//! that says what the caller may do next (use the results, wait as told, shrink the
//! batch, back off, or stop), so that every retry decision lives in [`crate::bulk`].

use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};

use crate::signing::{self, Credentials, Message};

const BATCH_PATH: &str = "v1/orders/batch";
/// A slow TCP handshake is a network problem, not a busy server: fail it early and retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer read: 100 orders of 100 codes is well under a megabyte; anything near
/// this is not the gateway talking.
const ANSWER_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct OrderBody<'a> {
    pub sku: &'a str,
    pub quantity: u32,
    pub merchant_order_no: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unit_price: Option<u64>,
}

#[derive(Serialize)]
struct BatchBody<'a> {
    orders: &'a [OrderBody<'a>],
}

/// docs/api.md §3's order object; only `order_id` and `codes` are required, the rest is
/// copied to the output when present.
#[derive(Debug, Clone, Deserialize)]
pub struct Order {
    pub order_id: String,
    #[serde(default)]
    pub merchant_order_no: Option<String>,
    #[serde(default)]
    pub sku: Option<String>,
    #[serde(default)]
    pub quantity: Option<u32>,
    #[serde(default)]
    pub amount: Option<u64>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    pub codes: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ItemResult {
    pub merchant_order_no: String,
    pub status: u16,
    #[serde(default)]
    pub order: Option<Order>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
}

/// What one result in a batch means for its order.
#[derive(Debug, Clone)]
pub enum ItemOutcome {
    /// 201 (new) or 200 (idempotent replay): the order and its codes.
    Done(Order),
    /// A refusal that took nothing and will not change by retrying.
    Failed { code: String, message: String },
    /// Not settled yet (in progress elsewhere, server busy): send again later.
    Retry(String),
}

pub fn item_outcome(r: &ItemResult) -> ItemOutcome {
    let code = r.error.as_ref().map_or("", |e| e.code.as_str());
    match r.status {
        200 | 201 => match &r.order {
            Some(o) => ItemOutcome::Done(o.clone()),
            // A success without its codes is resent: the replay will carry them.
            None => ItemOutcome::Retry(format!("status {} without an order", r.status)),
        },
        // The first request with this number is still being processed (maybe our own
        // earlier attempt): its result will come back as a replay.
        409 if code == "order_in_progress" => ItemOutcome::Retry("order_in_progress".into()),
        429 => ItemOutcome::Retry("rate_limited".into()),
        s if s >= 500 => ItemOutcome::Retry(if code.is_empty() {
            format!("status {s}")
        } else {
            code.into()
        }),
        s => {
            let e = r.error.clone().unwrap_or_default();
            ItemOutcome::Failed {
                code: if e.code.is_empty() { format!("http_{s}") } else { e.code },
                message: e.message,
            }
        }
    }
}

/// The `RateLimit-*` headers, when the answer had them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: Option<u32>,
    pub remaining: Option<u32>,
    pub reset: Option<Duration>,
}

#[derive(Debug)]
pub enum BatchAnswer {
    /// `200`: one result per order (in the order sent, but matched by number anyway).
    Results(Vec<ItemResult>),
    /// `429` or `503` with `Retry-After`: nothing in the batch was processed; the same
    /// orders go again after the pause.
    Throttled {
        status: u16,
        code: String,
        retry_after: Duration,
    },
    /// The batch as a whole is refused for its size (`400 invalid_request` naming the
    /// orders, or `413`): nothing was processed; smaller batches may pass.
    TooLarge { message: String },
    /// No usable answer (connection error, timeout, 5xx): the orders may or may not
    /// have been processed, which idempotency makes safe to resend.
    Transient(String),
    /// Retrying cannot help (authentication, a request the server cannot read).
    Fatal(String),
}

#[derive(Debug)]
pub struct Answer {
    pub batch: BatchAnswer,
    pub rate_limit: RateLimit,
}

pub struct Api {
    http: reqwest::Client,
    batch_url: Url,
    credentials: Credentials,
}

/// Parses `--base-url`; a path prefix (a gateway behind `/cardgate/`) is kept.
pub fn batch_url(base_url: &str) -> anyhow::Result<Url> {
    let mut base = Url::parse(base_url).with_context(|| format!("--base-url {base_url:?} is not a URL"))?;
    if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
        bail!("--base-url must be an http:// or https:// URL with a host");
    }
    if base.query().is_some() || base.fragment().is_some() {
        bail!("--base-url must not have a query or a fragment");
    }
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    Ok(base.join(BATCH_PATH)?)
}

impl Api {
    pub fn new(base_url: &str, credentials: Credentials, request_timeout: Duration) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder()
            // A redirect would change the signed path, and turn a POST into a GET.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(request_timeout)
            .user_agent(concat!("cardgate-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            batch_url: batch_url(base_url)?,
            credentials,
        })
    }

    pub fn batch_url(&self) -> &Url {
        &self.batch_url
    }

    /// One attempt: signs (with a fresh nonce) and sends the batch, then classifies.
    pub async fn post_batch(&self, orders: &[OrderBody<'_>]) -> Answer {
        let body = match serde_json::to_vec(&BatchBody { orders }) {
            Ok(b) => b,
            Err(e) => {
                return Answer {
                    batch: BatchAnswer::Fatal(format!("could not encode the batch: {e}")),
                    rate_limit: RateLimit::default(),
                }
            }
        };
        let nonce = signing::new_nonce();
        let timestamp = signing::now_unix_secs();
        // Signed from the URL actually requested, so the path and query are exactly
        // what goes on the request line.
        let authorization = signing::authorization(
            &self.credentials,
            &Message {
                timestamp,
                nonce: &nonce,
                method: "POST",
                path: self.batch_url.path(),
                query: self.batch_url.query().unwrap_or(""),
                body: &body,
            },
        );
        let sent = self
            .http
            .post(self.batch_url.clone())
            .header(AUTHORIZATION, authorization)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(body)
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                return Answer {
                    batch: BatchAnswer::Transient(describe(&e)),
                    rate_limit: RateLimit::default(),
                }
            }
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let rate_limit = rate_limit(&headers);
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) if bytes.len() + chunk.len() <= ANSWER_BYTES_MAX => bytes.extend_from_slice(&chunk),
                Ok(Some(_)) => {
                    return Answer {
                        batch: BatchAnswer::Transient(format!("answer larger than {ANSWER_BYTES_MAX} bytes")),
                        rate_limit,
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return Answer {
                        batch: BatchAnswer::Transient(format!("reading the answer: {}", describe(&e))),
                        rate_limit,
                    }
                }
            }
        }
        Answer {
            batch: classify(status, &headers, &bytes),
            rate_limit,
        }
    }
}

/// reqwest's top-level message hides the cause ("error sending request"); the chain
/// says what happened (refused, reset, timed out).
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

pub fn rate_limit(headers: &HeaderMap) -> RateLimit {
    RateLimit {
        limit: header_u64(headers, "ratelimit-limit").and_then(|v| u32::try_from(v).ok()),
        remaining: header_u64(headers, "ratelimit-remaining").and_then(|v| u32::try_from(v).ok()),
        reset: header_u64(headers, "ratelimit-reset").map(Duration::from_secs),
    }
}

/// docs/api.md §3 promises whole seconds; an HTTP date (or garbage) from a proxy reads as absent.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header_u64(headers, RETRY_AFTER.as_str()).map(Duration::from_secs)
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ResultsEnvelope {
    results: Vec<serde_json::Value>,
}

pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> BatchAnswer {
    let error = serde_json::from_slice::<ErrorEnvelope>(body).map(|e| e.error).ok();
    let code = error.as_ref().map_or("", |e| e.code.as_str()).to_owned();
    let request_id = error
        .as_ref()
        .and_then(|e| e.request_id.clone())
        .or_else(|| headers.get("x-request-id")?.to_str().ok().map(str::to_owned));
    let describe = || {
        let mut s = format!("HTTP {}", status.as_u16());
        if let Some(e) = &error {
            s.push_str(&format!(" {}: {}", e.code, e.message));
        }
        if let Some(id) = &request_id {
            s.push_str(&format!(" (request {id})"));
        }
        s
    };
    match status.as_u16() {
        200..=299 => match serde_json::from_slice::<ResultsEnvelope>(body) {
            // An item that does not parse is left out: its order gets no result, so it is
            // resent, and a replay settles it.
            Ok(r) => BatchAnswer::Results(
                r.results
                    .into_iter()
                    .filter_map(|v| serde_json::from_value::<ItemResult>(v).ok())
                    .collect(),
            ),
            Err(e) => BatchAnswer::Transient(format!("HTTP {} with an unreadable body: {e}", status.as_u16())),
        },
        400 if code == "invalid_request" => BatchAnswer::TooLarge {
            message: error.map(|e| e.message).unwrap_or_default(),
        },
        413 => BatchAnswer::TooLarge { message: describe() },
        429 => BatchAnswer::Throttled {
            status: 429,
            code,
            retry_after: retry_after(headers).unwrap_or(Duration::from_secs(1)),
        },
        503 => match retry_after(headers) {
            Some(retry_after) => BatchAnswer::Throttled {
                status: 503,
                code,
                retry_after,
            },
            None => BatchAnswer::Transient(describe()),
        },
        401 | 403 => BatchAnswer::Fatal(format!("authentication refused: {}{}", describe(), auth_hint(&code))),
        408 => BatchAnswer::Transient(describe()),
        s if s >= 500 => BatchAnswer::Transient(describe()),
        _ => BatchAnswer::Fatal(describe()),
    }
}

fn auth_hint(code: &str) -> &'static str {
    match code {
        "invalid_signature" => {
            "; check --key-id and the secret in the environment variable (unknown and revoked keys answer this too)"
        }
        "timestamp_out_of_window" => "; this machine's clock is more than 300 s away from the server's: fix it (NTP)",
        "missing_authorization" => "; the Authorization header did not reach the server intact (a proxy in between?)",
        "ip_not_allowed" => "; this machine's address is not in the key's IP allow-list",
        "account_suspended" => "; the reseller account is suspended",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn err(code: &str) -> Vec<u8> {
        format!(r#"{{"error":{{"code":"{code}","message":"m","request_id":"req_1"}}}}"#).into_bytes()
    }

    #[test]
    fn batch_urls_keep_a_path_prefix() {
        assert_eq!(
            batch_url("http://127.0.0.1:8080").unwrap().as_str(),
            "http://127.0.0.1:8080/v1/orders/batch"
        );
        assert_eq!(batch_url("https://h/gw").unwrap().path(), "/gw/v1/orders/batch");
        assert_eq!(batch_url("https://h/gw/").unwrap().path(), "/gw/v1/orders/batch");
        assert!(batch_url("ftp://h").is_err());
        assert!(batch_url("http://h/?x=1").is_err());
        assert!(batch_url("127.0.0.1:8080").is_err());
    }

    #[test]
    fn whole_batch_answers_are_classified() {
        let none = HeaderMap::new();
        let ok = br#"{"results":[{"merchant_order_no":"A","status":201,"order":{"order_id":"o","codes":["X"]}},
                                 {"bogus":true}]}"#;
        match classify(StatusCode::OK, &none, ok) {
            BatchAnswer::Results(r) => assert_eq!(r.len(), 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(StatusCode::OK, &none, b"{\"resu"),
            BatchAnswer::Transient(_)
        ));
        match classify(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "3")]),
            &err("rate_limited"),
        ) {
            BatchAnswer::Throttled { retry_after, .. } => assert_eq!(retry_after, Duration::from_secs(3)),
            other => panic!("{other:?}"),
        }
        match classify(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(&[("retry-after", "2")]),
            &err("overloaded"),
        ) {
            BatchAnswer::Throttled {
                status: 503,
                retry_after,
                ..
            } => assert_eq!(retry_after, Duration::from_secs(2)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &none, b"<html>"),
            BatchAnswer::Transient(_)
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, &none, b""),
            BatchAnswer::Transient(_)
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &none, &err("invalid_request")),
            BatchAnswer::TooLarge { .. }
        ));
        assert!(matches!(
            classify(StatusCode::PAYLOAD_TOO_LARGE, &none, b""),
            BatchAnswer::TooLarge { .. }
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &none, &err("invalid_json")),
            BatchAnswer::Fatal(_)
        ));
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, &none, &err("not_found")),
            BatchAnswer::Fatal(_)
        ));
        for (status, code) in [
            (401, "invalid_signature"),
            (401, "nonce_reused"),
            (403, "ip_not_allowed"),
        ] {
            match classify(StatusCode::from_u16(status).unwrap(), &none, &err(code)) {
                BatchAnswer::Fatal(m) => assert!(m.contains(code) && m.contains("req_1"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn item_results_are_classified() {
        let item = |status: u16, code: &str, order: bool| ItemResult {
            merchant_order_no: "A".into(),
            status,
            order: order.then(|| Order {
                order_id: "o".into(),
                merchant_order_no: None,
                sku: None,
                quantity: None,
                amount: None,
                currency: None,
                status: None,
                codes: vec![],
            }),
            error: (!code.is_empty()).then(|| ErrorBody {
                code: code.into(),
                message: "m".into(),
                request_id: None,
            }),
        };
        assert!(matches!(item_outcome(&item(201, "", true)), ItemOutcome::Done(_)));
        assert!(matches!(item_outcome(&item(200, "", true)), ItemOutcome::Done(_)));
        assert!(matches!(item_outcome(&item(200, "", false)), ItemOutcome::Retry(_)));
        assert!(matches!(
            item_outcome(&item(409, "order_in_progress", false)),
            ItemOutcome::Retry(_)
        ));
        assert!(matches!(
            item_outcome(&item(503, "unavailable", false)),
            ItemOutcome::Retry(_)
        ));
        assert!(matches!(item_outcome(&item(500, "", false)), ItemOutcome::Retry(_)));
        for (s, c) in [
            (409, "out_of_stock"),
            (402, "insufficient_balance"),
            (409, "price_changed"),
            (409, "idempotency_conflict"),
            (422, "quantity_out_of_range"),
            (422, "product_unavailable"),
            (404, "not_found"),
            (400, "invalid_request"),
        ] {
            match item_outcome(&item(s, c, false)) {
                ItemOutcome::Failed { code, .. } => assert_eq!(code, c),
                other => panic!("{c}: {other:?}"),
            }
        }
        match item_outcome(&item(418, "", false)) {
            ItemOutcome::Failed { code, .. } => assert_eq!(code, "http_418"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rate_limit_headers_are_read() {
        let h = headers(&[
            ("ratelimit-limit", "40"),
            ("ratelimit-remaining", "0"),
            ("ratelimit-reset", "2"),
        ]);
        assert_eq!(
            rate_limit(&h),
            RateLimit {
                limit: Some(40),
                remaining: Some(0),
                reset: Some(Duration::from_secs(2))
            }
        );
        assert_eq!(
            rate_limit(&headers(&[("ratelimit-remaining", "x")])),
            RateLimit::default()
        );
    }
}
