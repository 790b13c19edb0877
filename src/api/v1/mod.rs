//! Reseller API (API.md §3): every route signed, rate-limited by tier.

pub mod reads;

use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Request, Response};

use crate::app::App;
use crate::auth::reseller::{spend_nonce, verify, Caller};
use crate::error::ApiError;
use crate::http::{body, Body, Ctx};
use crate::ratelimit::{Class, Headers, Outcome};

pub struct Signed {
    pub caller: Caller,
    pub parts: hyper::http::request::Parts,
    pub body: bytes::Bytes,
}

/// Reads the body (it is signed), authenticates, takes a token from the caller's bucket
/// of `class`, then runs `handler`; the `RateLimit-*` headers go on every answer that
/// got as far as the limiter, refusals included.
///
/// Reads have no side effects, so their handler runs alongside the nonce's Redis round
/// trip (both ride the one multiplexed connection) and its answer is used only if the
/// nonce was fresh. Writes spend the nonce first.
pub async fn signed<F, Fut>(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    class: Class,
    handler: F,
) -> Result<Response<Body>, ApiError>
where
    F: FnOnce(Signed) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Body>, ApiError>>,
{
    let (parts, body) = req.into_parts();
    let body = body::read_json_body(
        &parts,
        body,
        app.config.http.json_body_max_bytes,
        Duration::from_millis(app.config.http.body_read_timeout_ms),
    )
    .await?;
    let mut verified = verify(app, ctx, &parts, &body)?;
    if let Some(refusal) = verified.refusal.take() {
        spend_nonce(app, &verified).await?;
        return Err(refusal);
    }
    let caller = &verified.caller;
    let headers = match app
        .rate_limits
        .check(&caller.reseller.tier, class, caller.reseller.pk, 1)
    {
        None => None,
        Some(Outcome::Allowed(h)) => Some(h),
        Some(Outcome::Refused {
            headers,
            retry_after_secs,
        }) => {
            spend_nonce(app, &verified).await?;
            metrics::counter!("cardgate_rate_limited_total", "tier" => caller.reseller.tier.clone(),
                "class" => class_label(class))
            .increment(1);
            let mut resp = crate::http::response::error(&ApiError::RateLimited { retry_after_secs }, &ctx.request_id);
            set_headers(&mut resp, headers);
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
            return Ok(resp);
        }
    };
    let result = match class {
        Class::Reads => {
            let nonce = spend_nonce(app, &verified);
            let (nonce, result) = tokio::join!(
                nonce,
                handler(Signed {
                    caller: verified.caller.clone(),
                    parts,
                    body
                })
            );
            nonce?;
            result
        }
        Class::Writes => {
            spend_nonce(app, &verified).await?;
            handler(Signed {
                caller: verified.caller.clone(),
                parts,
                body,
            })
            .await
        }
    };
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => crate::http::response::error(&e, &ctx.request_id),
    };
    if let Some(h) = headers {
        set_headers(&mut resp, h);
    }
    Ok(resp)
}

fn class_label(c: Class) -> &'static str {
    match c {
        Class::Reads => "reads",
        Class::Writes => "writes",
    }
}

fn set_headers(resp: &mut Response<Body>, h: Headers) {
    let hs = resp.headers_mut();
    hs.insert("ratelimit-limit", HeaderValue::from(h.limit));
    hs.insert("ratelimit-remaining", HeaderValue::from(h.remaining));
    hs.insert("ratelimit-reset", HeaderValue::from(h.reset_secs));
}
