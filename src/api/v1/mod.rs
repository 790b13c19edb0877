//! Reseller API (docs/api.md §3): every route signed, within its key's scopes,
//! rate-limited by tier.

pub mod orders;
pub mod reads;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use redis::{ErrorKind, ServerErrorKind};

use crate::app::App;
use crate::auth::reseller::{authorization, verify, Caller, Nonce, Verified};
use crate::auth::scopes::Scope;
use crate::error::ApiError;
use crate::http::{body, Body, Ctx};
use crate::overload::Slot;
use crate::ratelimit::global::{self, Admit, Charge, Tokens};
use crate::ratelimit::{Class, Headers, Outcome};

/// A signed request past authentication (and, when its tokens are taken already, the
/// rate limit).
pub struct Signed {
    pub parts: hyper::http::request::Parts,
    pub body: bytes::Bytes,
    verified: Verified,
    /// The request's tokens, taken with its nonce, and what the bucket then said.
    tokens: Tokens,
    /// Set once the nonce was spent (or sent to be), its tokens with it: by [`begin`]
    /// when the local shield refused, by [`Signed::query`], by the reservation script
    /// ([`Signed::nonce`]), by [`Signed::spend`] or by [`Signed::finish`].
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
/// verifies the signature and that the key's scopes cover `scope`, admits an order
/// request under overload, and prices the request at `cost(body, tier)` tokens of its
/// scope's class (a batch of orders costs one per order). The tokens are taken from the
/// reseller's bucket in Redis, shared by every gateway, by the same command that spends
/// the nonce (`ratelimit::global`). A refusal for the allow-list, suspension or scope
/// costs one token and spends the nonce at once (on its own, for orders too: the refusal
/// is not the order path), so a replay is told `nonce_reused` and the refused request
/// cannot be sent again. So is a request this gateway's local shield refuses: the bucket
/// decides it now, before any handler work. Otherwise the handler spends both before it
/// changes or reveals anything: in the same Redis round trip as its own commands (a
/// read's [`Signed::query`], an order's reservation script through [`Signed::nonce`]),
/// or on its own ([`Signed::spend`]); a handler that never touches Redis has them spent
/// by [`Signed::finish`] before its answer goes out. Either way a replay is answered
/// `nonce_reused` and a request over the limit `rate_limited`, whatever the handler made
/// of it.
///
/// Every answer from the point the caller is known carries the `RateLimit-*` headers of
/// its bucket, as the command that took the tokens read it; a `401` cannot (it must not
/// tell whether the key exists), nor can a `503 overloaded` (shed before the bucket is
/// asked, it takes nothing).
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
    let r = Arc::clone(&verified.caller.reseller);
    let refused = |e: &ApiError, headers: Option<Headers>| -> Result<Begin, ApiError> {
        let mut resp = crate::http::response::error(e, &ctx.request_id);
        if let Some(h) = headers {
            set_headers(&mut resp, h);
        }
        Ok(Begin::Done(resp))
    };
    if let Some(refusal) = refusal {
        // Counted like any request, so a refused caller cannot call without limit; the
        // refusal is the answer whether the bucket had the token or not.
        let _ = app.rate_limits.check(&r.tier, class, r.pk, 1);
        let tokens = Tokens::new(Charge::new(&app.config.tiers, &r.tier, class, r.pk, 1));
        let e = match admit_alone(app, &verified, &tokens).await {
            Ok(spent) => {
                tokens.record(spent.bucket);
                if spent.nonce_fresh {
                    refusal
                } else {
                    ApiError::NonceReused
                }
            }
            Err(e) => e.into(),
        };
        return refused(&e, tokens.headers());
    }
    let mut admitted = None;
    if class == Class::Writes {
        // Before the nonce and the tokens: a shed request costs no Redis round trip, and
        // since nothing of it was done, the same signed request may simply be sent again.
        // A batch is admitted or shed whole.
        match app.admission.admit(&r.tier) {
            Ok(slot) => admitted = Some(slot),
            Err(e) => return refused(&e, None),
        }
    }
    let n = cost(&body, &r.tier).max(1);
    let tokens = Tokens::new(Charge::new(&app.config.tiers, &r.tier, class, r.pk, n));
    let mut nonce_spent = false;
    if let Some(Outcome::Refused { .. }) = app.rate_limits.check(&r.tier, class, r.pk, n) {
        // The shield is almost surely right, and its refusal needs this round trip for the
        // nonce anyway; but the bucket decides. It admits when this gateway's shield spent
        // tokens on requests the bucket refused (other gateways took them first): then the
        // request goes on, its tokens taken.
        nonce_spent = true;
        let spent = spend(app, &verified, &tokens).await;
        if let Some(o) = tokens.outcome() {
            let bucket = match o {
                Outcome::Allowed(_) => "admitted",
                Outcome::Refused { .. } => "refused",
            };
            metrics::counter!("cardgate_rate_limit_shield_total", "class" => class.label(), "bucket" => bucket)
                .increment(1);
        }
        if let Err(e) = spent {
            return refused(&e, tokens.headers());
        }
    }
    Ok(Begin::Go(Box::new(Signed {
        parts,
        body,
        verified,
        tokens,
        nonce_spent: AtomicBool::new(nonce_spent),
        _admitted: admitted,
    })))
}

/// Spends the nonce and takes the tokens on their own round trip. Only a verified request
/// may, so nobody can burn another's nonces or tokens.
async fn spend(app: &App, verified: &Verified, tokens: &Tokens) -> Result<(), ApiError> {
    tokens.settle(admit_alone(app, verified, tokens).await?)
}

/// `admit.lua` for this one request, and what it answered.
async fn admit_alone(app: &App, verified: &Verified, tokens: &Tokens) -> Result<global::Spent, redis::RedisError> {
    global::admit(
        &mut app.redis(),
        &Admit::new(&app.keys, verified.nonce_key(), tokens.charge()),
    )
    .await
}

impl Signed {
    pub fn caller(&self) -> &Caller {
        &self.verified.caller
    }

    /// Runs `pipe` with the nonce spent and the tokens taken (`admit.lua`, one call for
    /// the reads of the moment), in one Redis round trip shared with the other reads, and
    /// returns the replies of `pipe`'s own commands, or `nonce_reused`, or `rate_limited`.
    /// Reads have no side effects, so where the nonce stands in the pipeline does not
    /// matter; it is checked before anything is answered.
    pub async fn query(
        &self,
        app: &App,
        pipe: redis::Pipeline,
        shared: Vec<Arc<redis::Pipeline>>,
    ) -> Result<crate::store::coalesce::Replies, ApiError> {
        let admit = self
            .nonce()
            .take()
            .map(|s| Admit::new(&app.keys, s.nonce_key, s.charge));
        let pipe = Arc::new(pipe);
        let ask = || app.coalescer.query(Arc::clone(&pipe), shared.clone(), admit.clone());
        let mut moving = crate::store::redis::SlotMoving::new(crate::store::redis::SLOT_MOVING_PATIENCE);
        let (replies, spent) = loop {
            let reply = match ask().await {
                // A restarted Redis has no scripts: the admit command alone was refused, so
                // nothing was spent or taken, and the reads may simply be asked again.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    global::load(&mut app.redis()).await?;
                    ask().await
                }
                other => other,
            };
            match reply {
                // The same while the cell's slot migrates between cluster nodes: the admit
                // command names a new nonce key, so both nodes refuse it (`TRYAGAIN`) until
                // the slot has moved, and the reads, single keys, are not refused.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::TryAgain) && moving.wait(&e).await => {}
                other => break other?,
            }
        };
        if let Some(spent) = spent {
            self.tokens.settle(spent)?;
        }
        Ok(replies)
    }

    /// The nonce and the tokens for a Redis script of the handler's to spend first thing,
    /// atomically with its own work: see [`Nonce::take`].
    pub fn nonce(&self) -> Nonce<'_> {
        Nonce::new(self.verified.nonce_key(), &self.nonce_spent, &self.tokens)
    }

    /// Spends the nonce and takes the tokens on their own round trip, unless that was done.
    pub async fn spend(&self, app: &App) -> Result<(), ApiError> {
        if self.nonce().take().is_some() {
            spend(app, &self.verified, &self.tokens).await?;
        }
        Ok(())
    }

    /// Spends the nonce and takes the tokens if the handler did not, then puts the
    /// `RateLimit-*` headers on the answer, refusals included.
    pub async fn finish(
        self,
        app: &App,
        ctx: &Ctx,
        result: Result<Response<Body>, ApiError>,
    ) -> Result<Response<Body>, ApiError> {
        let result = self.spend(app).await.and(result);
        let mut resp = result.unwrap_or_else(|e| crate::http::response::error(&e, &ctx.request_id));
        if let Some(h) = self.tokens.headers() {
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

fn set_headers(resp: &mut Response<Body>, h: Headers) {
    let hs = resp.headers_mut();
    hs.insert("ratelimit-limit", HeaderValue::from(h.limit));
    hs.insert("ratelimit-remaining", HeaderValue::from(h.remaining));
    hs.insert("ratelimit-reset", HeaderValue::from(h.reset_secs));
}
