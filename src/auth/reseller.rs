//! Authenticating a signed `/v1` request, in the order of docs/api.md §1's table:
//! header, timestamp window, signature, nonce, IP allow-list, suspension, the key's scope.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use hyper::header::AUTHORIZATION;
use hyper::http::request::Parts;

use super::keys::Reseller;
use super::scopes::Scope;
use super::signing::{self, AuthHeader, Signer, TIMESTAMP_WINDOW_SECS};
use crate::app::App;
use crate::clock::Clock;
use crate::error::ApiError;
use crate::http::Ctx;
use crate::ratelimit::global::{Charge, Tokens};

/// Keyed with a secret no key has: an unknown key still costs a full HMAC, so the
/// answer's timing does not say whether the key exists.
static NO_SUCH_KEY: LazyLock<Signer> =
    LazyLock::new(|| Signer::new(b"cardgate: no such key, verification fails regardless"));

#[derive(Clone)]
pub struct Caller {
    pub key_id: String,
    pub reseller: Arc<Reseller>,
    pub ip: std::net::IpAddr,
    /// The key's own daily spend limit (docs/api.md §7), beside the reseller's.
    pub key_daily_limit: Option<i64>,
}

/// A request whose signature is good, with the rest of the checks decided but not yet
/// reported: the nonce must still be spent (a Redis round trip) before any of it is
/// answered, so that a replay is always told `nonce_reused` first.
pub struct Verified {
    pub caller: Caller,
    nonce_key: String,
    /// `ip_not_allowed`, `account_suspended` or `insufficient_scope`, reported after the
    /// nonce.
    pub refusal: Option<ApiError>,
}

/// The first two checks of docs/api.md §1, header and timestamp window: made before the body
/// is read, so a request that could never pass is refused without reading it.
pub fn authorization<'a>(parts: &'a Parts, clock: &Clock) -> Result<AuthHeader<'a>, ApiError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(signing::parse_header)
        .ok_or(ApiError::MissingAuthorization)?;
    let now = clock.now_unix_secs();
    if (now - header.timestamp).abs() > TIMESTAMP_WINDOW_SECS {
        return Err(ApiError::TimestampOutOfWindow);
    }
    Ok(header)
}

/// The signature over the body, from memory; then the allow-list, the account status and
/// whether the key's scopes cover `scope`, kept for after the nonce.
pub fn verify(
    app: &App,
    ctx: &Ctx,
    parts: &Parts,
    header: &AuthHeader,
    body: &[u8],
    scope: Scope,
) -> Result<Verified, ApiError> {
    let now_ms = app.clock.now_unix_ms();
    // An expired key goes the unknown key's way from here: the same dummy secret, the
    // same answer.
    let entry = app.key_cache.get(header.key_id).filter(|e| e.live_at(now_ms));
    let signer = entry.as_ref().map_or(&*NO_SUCH_KEY, |e| &e.signer);
    let message = signing::Message {
        timestamp: header.timestamp,
        nonce: header.nonce,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        body,
    };
    let valid = signer.verify(&message, &header.signature);
    if let (Some(e), false) = (&entry, valid) {
        // Counted off this path (`risk`): the answer is the same as for an unknown key.
        app.risk.signal(crate::risk::Signal::BadSignature {
            reseller_pk: e.reseller.pk,
            key_id: header.key_id.to_string(),
        });
    }
    let Some(entry) = entry.filter(|_| valid) else {
        return Err(ApiError::InvalidSignature);
    };
    // Signed with the key: a use, whatever is refused below.
    app.last_used.record(header.key_id, now_ms);

    let ip = ctx.client_ip(app, &parts.headers);
    let refusal = if !entry.reseller.allows(ip) {
        Some(ApiError::IpNotAllowed)
    } else if entry.reseller.suspended {
        Some(ApiError::AccountSuspended)
    } else if !entry.settings.scopes.covers(scope) {
        Some(ApiError::InsufficientScope(scope.name()))
    } else {
        None
    };
    Ok(Verified {
        nonce_key: app.keys.nonce(entry.reseller.pk, header.key_id, header.nonce),
        caller: Caller {
            key_id: header.key_id.to_string(),
            reseller: entry.reseller.clone(),
            ip,
            key_daily_limit: entry.settings.daily_spend_limit,
        },
        refusal,
    })
}

impl Verified {
    pub fn nonce_key(&self) -> &str {
        &self.nonce_key
    }
}

/// A request's nonce and its tokens, handed to the one Redis command that will spend
/// them together (`crate::ratelimit::global`): the bucket is charged by whatever spends
/// the nonce, so a limit held in Redis costs no round trip of its own.
pub struct Nonce<'a> {
    key: &'a str,
    spent: &'a AtomicBool,
    tokens: &'a Tokens,
}

/// What the command that spends a nonce must do: spend `nonce_key`, take `charge`.
#[derive(Debug, Clone, Copy)]
pub struct Spend<'a> {
    pub nonce_key: &'a str,
    /// `None` for a tier that is not limited.
    pub charge: Option<&'a Charge>,
}

impl<'a> Nonce<'a> {
    pub fn new(key: &'a str, spent: &'a AtomicBool, tokens: &'a Tokens) -> Self {
        Nonce { key, spent, tokens }
    }

    /// The nonce and the tokens, the first time only: whoever takes them must spend them
    /// (a retried script must not find its own nonce and call itself a replay, nor be
    /// charged twice), and once taken they count as spent even if the command then fails,
    /// since it may have run.
    pub fn take(&self) -> Option<Spend<'a>> {
        (!self.spent.swap(true, Ordering::Relaxed)).then_some(Spend {
            nonce_key: self.key,
            charge: self.tokens.charge(),
        })
    }

    /// Whether the nonce was spent already (the request then asks Redis for no admission).
    pub fn spent(&self) -> bool {
        self.spent.load(Ordering::Relaxed)
    }

    /// Where the command that took them reports the bucket (the answer's headers).
    pub fn tokens(&self) -> &'a Tokens {
        self.tokens
    }
}
