//! `CG1-HMAC-SHA256` request signing, written from docs/api.md §1 alone so that a reseller can
//! build this client without the gateway's source.
//!
//! A signature covers the timestamp, a nonce, the method, the path, the sorted raw query
//! and a hash of the body bytes: the caller must send exactly the bytes and the path that
//! were signed, which is why [`crate::api`] serialises the body once and signs the URL it
//! actually requests.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};

pub const SCHEME: &str = "CG1-HMAC-SHA256";

/// docs/api.md §1 allows 16 to 64 characters; 32 random alphanumerics make a collision within
/// the server's 600 s replay window practically impossible.
const NONCE_LEN: usize = 32;

/// The API secret. Kept out of `Debug` and `Display` so that no log line, panic message
/// or error chain can ever print it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Secret {
        Secret(secret)
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub key_id: String,
    pub secret: Secret,
}

/// What one signature covers.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Unix seconds.
    pub timestamp: i64,
    pub nonce: &'a str,
    pub method: &'a str,
    /// As it goes on the request line, without the query.
    pub path: &'a str,
    /// The raw query string as sent (percent-encoding untouched), `""` if none.
    pub query: &'a str,
    pub body: &'a [u8],
}

/// The raw `name=value` pairs sorted bytewise and joined by `&`. Pairs are compared as
/// sent, not decoded: the server sees the encoded bytes, so both sides must sort those.
pub fn canonical_query(raw: &str) -> String {
    let mut pairs: Vec<&str> = raw.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_unstable();
    pairs.join("&")
}

pub fn string_to_sign(m: &Message<'_>) -> String {
    let body_sha256 = hex::encode(Sha256::digest(m.body));
    [
        SCHEME,
        &m.timestamp.to_string(),
        m.nonce,
        &m.method.to_ascii_uppercase(),
        m.path,
        &canonical_query(m.query),
        &body_sha256,
    ]
    .join("\n")
}

/// Lower-case hex HMAC-SHA256 of the string to sign, keyed by the secret's UTF-8 bytes.
pub fn signature(secret: &Secret, string_to_sign: &str) -> String {
    // HMAC accepts keys of any length, so this constructor cannot fail; the fallback
    // only exists to keep a panic out of the request path.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.bytes()) else {
        return String::new();
    };
    mac.update(string_to_sign.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The whole `Authorization` header value for one request.
pub fn authorization(credentials: &Credentials, m: &Message<'_>) -> String {
    format!(
        "{SCHEME} key_id=\"{}\",timestamp=\"{}\",nonce=\"{}\",signature=\"{}\"",
        credentials.key_id,
        m.timestamp,
        m.nonce,
        signature(&credentials.secret, &string_to_sign(m))
    )
}

/// A fresh nonce for every attempt: the server refuses a nonce it saw in the last 600 s,
/// so even a retry of the very same body must be signed anew.
pub fn new_nonce() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(NONCE_LEN)
        .map(char::from)
        .collect()
}

/// The timestamp to sign now, in Unix seconds: the gateway refuses one more than 300 s
/// from its own clock, so a host whose clock drifts is refused `timestamp_out_of_window`.
#[allow(
    clippy::disallowed_methods,
    reason = "the client signs on its host's real clock; the gateway's clock is not this crate's"
)]
pub fn now_unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Valid per docs/api.md §1: a `key_id` goes inside double quotes in the header, so quotes,
/// commas and control characters would break the header's syntax.
pub fn valid_key_id(key_id: &str) -> bool {
    (1..=64).contains(&key_id.len()) && key_id.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b',')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Vectors {
        scheme: String,
        vectors: Vec<Vector>,
    }

    #[derive(Deserialize)]
    struct Vector {
        name: String,
        secret: String,
        method: String,
        path: String,
        query: String,
        body: String,
        timestamp: i64,
        nonce: String,
        string_to_sign: String,
        signature: String,
        authorization: String,
    }

    #[test]
    fn reproduces_every_published_vector() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/signing-vectors.json");
        let text = std::fs::read_to_string(path).expect("the signing vectors are part of the repository");
        let file: Vectors = serde_json::from_str(&text).expect("vectors file parses");
        assert_eq!(file.scheme, SCHEME);
        assert!(!file.vectors.is_empty());
        for v in &file.vectors {
            let m = Message {
                timestamp: v.timestamp,
                nonce: &v.nonce,
                method: &v.method,
                path: &v.path,
                query: &v.query,
                body: v.body.as_bytes(),
            };
            let creds = Credentials {
                key_id: "ak_test_vector".into(),
                secret: Secret::new(v.secret.clone()),
            };
            assert_eq!(string_to_sign(&m), v.string_to_sign, "{}: string to sign", v.name);
            assert_eq!(
                signature(&creds.secret, &v.string_to_sign),
                v.signature,
                "{}: signature",
                v.name
            );
            assert_eq!(authorization(&creds, &m), v.authorization, "{}: header", v.name);
        }
    }

    #[test]
    fn nonces_are_valid_and_fresh() {
        let a = new_nonce();
        let b = new_nonce();
        assert_ne!(a, b);
        assert!((16..=64).contains(&a.len()));
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn secret_never_shows_in_debug_output() {
        let creds = Credentials {
            key_id: "ak_1".into(),
            secret: Secret::new("sk_live_do_not_print".into()),
        };
        assert!(!format!("{creds:?}").contains("do_not_print"));
    }

    #[test]
    fn key_ids_that_would_break_the_header_are_refused() {
        assert!(valid_key_id("ak_live_123"));
        for bad in ["", "ak\"x", "ak,x", "ak x", "ak\nx"] {
            assert!(!valid_key_id(bad), "{bad:?}");
        }
    }
}
