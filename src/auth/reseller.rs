//! Authenticating a signed `/v1` request, in the order of API.md §1's table:
//! header, timestamp window, signature, nonce, IP allow-list, suspension.

use std::sync::Arc;

use hyper::header::AUTHORIZATION;
use hyper::http::request::Parts;

use super::keys::Reseller;
use super::signing::{self, NONCE_TTL_SECS, TIMESTAMP_WINDOW_SECS};
use crate::app::App;
use crate::error::ApiError;
use crate::http::Ctx;

/// A secret no key has: an unknown key still costs a full HMAC, so the answer's timing
/// does not say whether the key exists.
const NO_SUCH_KEY_SECRET: &[u8] = b"cardgate: no such key, verification fails regardless";

pub struct Caller {
    pub key_id: String,
    pub reseller: Arc<Reseller>,
    pub ip: std::net::IpAddr,
}

pub async fn authenticate(app: &App, ctx: &Ctx, parts: &Parts, body: &[u8]) -> Result<Caller, ApiError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(signing::parse_header)
        .ok_or(ApiError::MissingAuthorization)?;

    let now = crate::auth::admin::unix_now() as i64;
    if (now - header.timestamp).abs() > TIMESTAMP_WINDOW_SECS {
        return Err(ApiError::TimestampOutOfWindow);
    }

    let entry = app.key_cache.get(header.key_id);
    let secret = entry.as_ref().map_or(NO_SUCH_KEY_SECRET, |e| e.secret.as_slice());
    let sts = signing::Message {
        timestamp: header.timestamp,
        nonce: header.nonce,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        body,
    }
    .string_to_sign();
    let valid = signing::verify(secret, &sts, &header.signature);
    let Some(entry) = entry.filter(|_| valid) else {
        return Err(ApiError::InvalidSignature);
    };

    // Only a verified request may spend a nonce, so nobody can burn another's nonces.
    let mut redis = app.redis();
    let fresh: bool = redis::cmd("SET")
        .arg(app.keys.nonce(header.key_id, header.nonce))
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(NONCE_TTL_SECS)
        .query_async::<Option<String>>(&mut redis)
        .await?
        .is_some();
    if !fresh {
        return Err(ApiError::NonceReused);
    }

    let ip = ctx.client_ip(app, &parts.headers);
    if !entry.reseller.allows(ip) {
        return Err(ApiError::IpNotAllowed);
    }
    if entry.reseller.suspended {
        return Err(ApiError::AccountSuspended);
    }
    Ok(Caller {
        key_id: header.key_id.to_string(),
        reseller: entry.reseller.clone(),
        ip,
    })
}
