//! Authenticating a signed `/v1` request, in the order of docs/api.md §1's table:
//! header, timestamp window, signature, nonce, IP allow-list, suspension, the key's scope.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use hyper::header::AUTHORIZATION;
use hyper::http::request::Parts;

use super::keys::Reseller;
use super::scopes::Scope;
use super::signing::{self, AuthHeader, Signer, NONCE_TTL_SECS, TIMESTAMP_WINDOW_SECS};
use crate::app::App;
use crate::clock::Clock;
use crate::error::ApiError;
use crate::http::Ctx;

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
        nonce_key: app.keys.nonce(header.key_id, header.nonce),
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

    /// Adds the command that spends the nonce to `pipe`; its reply is `OK` when the nonce
    /// was fresh and nil when it was used before (see [`nonce_fresh`]).
    pub fn spend_in(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("SET")
            .arg(&self.nonce_key)
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(NONCE_TTL_SECS);
    }
}

/// A request's nonce, handed to the one Redis command that will spend it.
pub struct Nonce<'a> {
    key: &'a str,
    spent: &'a AtomicBool,
}

impl<'a> Nonce<'a> {
    pub fn new(key: &'a str, spent: &'a AtomicBool) -> Self {
        Nonce { key, spent }
    }

    /// The nonce's key, the first time only: whoever takes it must spend it (a retried
    /// script must not find its own nonce and call itself a replay), and once taken it
    /// counts as spent even if the command then fails, since it may have run.
    pub fn take(&self) -> Option<&str> {
        (!self.spent.swap(true, Ordering::Relaxed)).then_some(self.key)
    }
}

/// Reads the reply of [`Verified::spend_in`].
pub fn nonce_fresh(reply: &redis::Value) -> Result<(), ApiError> {
    match reply {
        redis::Value::Nil => Err(ApiError::NonceReused),
        _ => Ok(()),
    }
}

/// Spends the nonce on its own; only a verified request may, so nobody can burn
/// another's nonces.
pub async fn spend_nonce(app: &App, v: &Verified) -> Result<(), ApiError> {
    let mut pipe = redis::pipe();
    v.spend_in(&mut pipe);
    let mut redis = app.redis();
    let replies: Vec<redis::Value> = pipe.query_async(&mut redis).await?;
    nonce_fresh(replies.first().unwrap_or(&redis::Value::Nil))
}
