//! Reseller API (docs/api.md §3): every route signed, within its key's scopes,
//! rate-limited by tier.

pub mod orders;
pub mod reads;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};

use crate::app::App;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::auth::reseller::{authorization, nonce_fresh, spend_nonce, verify, Caller, Nonce, Verified};
use crate::auth::scopes::Scope;
use crate::error::ApiError;
use crate::http::{body, Body, Ctx};
use crate::overload::Slot;
use crate::ratelimit::{Class, Headers, Outcome};

/// A signed request past authentication and the rate limiter.
pub struct Signed {
    pub parts: hyper::http::request::Parts,
    pub body: bytes::Bytes,
    verified: Verified,
    headers: Option<Headers>,
    /// Set once the nonce was spent (or sent to be): by [`Signed::query`], by the
    /// reservation script ([`Signed::nonce`]), by [`Signed::spend`] or by [`Signed::finish`].
    nonce_spent: AtomicBool,
    /// Order requests (the writes) hold their place in the overload count until answered.
    _admitted: Option<Slot>,
}

pub enum Begin {
    Go(Box<Signed>),
    /// Answered already (refused by the rate limiter, with its headers).
    Done(Response<Body>),
}

/// Checks the `Authorization` header and its timestamp, reads the body (it is signed),
/// verifies the signature and that the key's scopes cover `scope`, and takes
/// `cost(body, tier)` tokens from the caller's bucket of the scope's class (a batch of
/// orders costs one per order). A refusal for the allow-list, suspension or scope costs
/// one token and spends the nonce first (on its own, for orders too: the refusal is not
/// the order path), so a replay is told `nonce_reused` and the refused request cannot be
/// sent again. Otherwise the nonce is spent by the handler before it changes or reveals
/// anything: in the same Redis round trip as its own commands (a read's
/// [`Signed::query`], an order's reservation script through [`Signed::nonce`]), or on its
/// own ([`Signed::spend`]); a handler that never touches Redis has it spent by
/// [`Signed::finish`] before its answer goes out. Either way a replay is answered
/// `nonce_reused`.
///
/// Every answer from the point the caller is known carries the `RateLimit-*` headers of
/// its bucket; a `401` cannot (it must not tell whether the key exists).
pub async fn begin(
    app: &App,
    ctx: &Ctx,
    req: Request<Incoming>,
    scope: Scope,
    cost: impl FnOnce(&[u8], &str) -> u32,
) -> Result<Begin, ApiError> {
    let class = class_of(scope);
    let (parts, body) = req.into_parts();
    let header = authorization(&parts, &app.clock)?;
    let body = body::read_json_body(&parts, body, &app.config.http).await?;
    let mut verified = verify(app, ctx, &parts, &header, &body, scope)?;
    let refusal = verified.refusal.take();
    let r = &verified.caller.reseller;
    let refused = |e: &ApiError, headers: Option<Headers>| -> Result<Begin, ApiError> {
        let mut resp = crate::http::response::error(e, &ctx.request_id);
        if let Some(h) = headers {
            set_headers(&mut resp, h);
        }
        Ok(Begin::Done(resp))
    };
    if let Some(refusal) = refusal {
        // Counted like any request, so a refused caller cannot call without limit.
        let headers = app.rate_limits.check(&r.tier, class, r.pk, 1).map(Outcome::headers);
        let e = spend_nonce(app, &verified).await.err().unwrap_or(refusal);
        return refused(&e, headers);
    }
    let headers = match app.rate_limits.check(&r.tier, class, r.pk, cost(&body, &r.tier).max(1)) {
        None => None,
        Some(Outcome::Allowed(h)) => Some(h),
        Some(Outcome::Refused {
            headers,
            retry_after_secs,
        }) => {
            if let Err(e) = spend_nonce(app, &verified).await {
                return refused(&e, Some(headers));
            }
            metrics::counter!("cardgate_rate_limited_total", "tier" => r.tier.clone(), "class" => class_label(class))
                .increment(1);
            return refused(&ApiError::RateLimited { retry_after_secs }, Some(headers));
        }
    };
    let mut admitted = None;
    if class == Class::Writes {
        // Before the nonce: a shed request costs no Redis round trip, and since nothing of
        // it was done, the same signed request may simply be sent again. A batch is
        // admitted or shed whole.
        match app.admission.admit(&r.tier) {
            Ok(slot) => admitted = Some(slot),
            Err(e) => return refused(&e, headers),
        }
    }
    Ok(Begin::Go(Box::new(Signed {
        parts,
        body,
        verified,
        headers,
        nonce_spent: AtomicBool::new(false),
        _admitted: admitted,
    })))
}

impl Signed {
    pub fn caller(&self) -> &Caller {
        &self.verified.caller
    }

    /// Runs `pipe` with the nonce's `SET NX` added at its end, in one Redis round trip
    /// shared with the other reads of the moment, and returns the replies of `pipe`'s own
    /// commands, or `nonce_reused`. Reads have no side effects, so where the nonce stands
    /// in the pipeline does not matter; it is checked before anything is answered.
    pub async fn query(&self, app: &App, mut pipe: redis::Pipeline) -> Result<Vec<redis::Value>, ApiError> {
        self.verified.spend_in(&mut pipe);
        let mut replies = app.coalescer.query(pipe).await?;
        self.nonce_spent.store(true, Ordering::Relaxed);
        let nonce = replies
            .pop()
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("empty pipeline reply")))?;
        nonce_fresh(&nonce)?;
        Ok(replies)
    }

    /// The nonce for a Redis script of the handler's to spend first thing, atomically
    /// with its own work: see [`Nonce::take`].
    pub fn nonce(&self) -> Nonce<'_> {
        Nonce::new(self.verified.nonce_key(), &self.nonce_spent)
    }

    /// Spends the nonce on its own round trip, unless it was already.
    pub async fn spend(&self, app: &App) -> Result<(), ApiError> {
        if !self.nonce_spent.swap(true, Ordering::Relaxed) {
            spend_nonce(app, &self.verified).await?;
        }
        Ok(())
    }

    /// Spends the nonce if the handler did not, then puts the `RateLimit-*` headers on
    /// the answer, refusals included.
    pub async fn finish(
        self,
        app: &App,
        ctx: &Ctx,
        result: Result<Response<Body>, ApiError>,
    ) -> Result<Response<Body>, ApiError> {
        let result = self.spend(app).await.and(result);
        let mut resp = result.unwrap_or_else(|e| crate::http::response::error(&e, &ctx.request_id));
        if let Some(h) = self.headers {
            set_headers(&mut resp, h);
        }
        Ok(resp)
    }
}

/// Authenticates, checks the key's scope and rate-limits, or returns the finished answer
/// from the handler.
macro_rules! signed {
    ($app:expr, $ctx:expr, $req:expr, $scope:expr) => {
        $crate::api::v1::signed!($app, $ctx, $req, $scope, |_, _| 1)
    };
    ($app:expr, $ctx:expr, $req:expr, $scope:expr, $cost:expr) => {
        match $crate::api::v1::begin($app, $ctx, $req, $scope, $cost).await? {
            $crate::api::v1::Begin::Go(s) => s,
            $crate::api::v1::Begin::Done(resp) => return Ok(resp),
        }
    };
}
pub(crate) use signed;

/// The bucket a scope's routes draw on: order writes apart from every read.
fn class_of(scope: Scope) -> Class {
    match scope {
        Scope::OrdersWrite => Class::Writes,
        Scope::CatalogueRead | Scope::OrdersRead | Scope::BalanceRead => Class::Reads,
    }
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
