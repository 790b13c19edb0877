//! `CG1-HMAC-SHA256` request signing (docs/api.md §1).
//!
//! Parsing is strict and allocation-light: the header is split into its four parameters
//! (any order, optional spaces, double-quoted values), and anything else is
//! `missing_authorization` without panicking.

use std::io::Write;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const SCHEME: &str = "CG1-HMAC-SHA256";
pub const TIMESTAMP_WINDOW_SECS: i64 = 300;
pub const NONCE_TTL_SECS: u64 = 600;
/// Longer than any key_id issued (`ak_` and 20 characters), with room for keys of other forms.
pub const KEY_ID_MAX: usize = 256;

/// The parameters of an `Authorization: CG1-HMAC-SHA256 ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHeader<'a> {
    pub key_id: &'a str,
    pub timestamp: i64,
    pub nonce: &'a str,
    /// 32 bytes, decoded from lower- or upper-case hex.
    pub signature: [u8; 32],
}

/// Parses the header value, or `None` for anything docs/api.md §1 calls `missing_authorization`.
pub fn parse_header(value: &str) -> Option<AuthHeader<'_>> {
    // Auth schemes are case-insensitive (RFC 9110 §11.1); the parameter names are not.
    let rest = value
        .get(..SCHEME.len())
        .filter(|s| s.eq_ignore_ascii_case(SCHEME))
        .map(|_| &value[SCHEME.len()..])?;
    // The scheme must be followed by whitespace, then parameters.
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let (mut key_id, mut timestamp, mut nonce, mut signature) = (None, None, None, None);
    for param in rest.split(',') {
        let (name, quoted) = param.trim_matches([' ', '\t']).split_once('=')?;
        let value = quoted.strip_prefix('"')?.strip_suffix('"')?;
        if value.contains('"') {
            return None;
        }
        let slot = match name {
            "key_id" => &mut key_id,
            "timestamp" => &mut timestamp,
            "nonce" => &mut nonce,
            "signature" => &mut signature,
            _ => return None,
        };
        if slot.replace(value).is_some() {
            return None; // a parameter given twice
        }
    }
    // Any key_id of a sane length is a key to look up, and an unknown one is
    // invalid_signature like every other (docs/api.md §1); only one longer than any key
    // could be is a malformed header.
    let key_id = key_id.filter(|k| !k.is_empty() && k.len() <= KEY_ID_MAX)?;
    let timestamp = timestamp?;
    // Canonical decimal only: the server signs the number it parsed, so a leading zero
    // would make the client's string to sign differ from the server's. Any such number is
    // a time, however far off: milliseconds sent for seconds are outside the window, not a
    // malformed header, and one past i64 is the farthest time there is.
    if timestamp.is_empty()
        || !timestamp.bytes().all(|b| b.is_ascii_digit())
        || (timestamp.len() > 1 && timestamp.starts_with('0'))
    {
        return None;
    }
    let nonce = nonce.filter(|n| valid_nonce(n))?;
    let mut sig = [0u8; 32];
    hex::decode_to_slice(signature?, &mut sig).ok()?;
    Some(AuthHeader {
        key_id,
        timestamp: timestamp.parse().unwrap_or(i64::MAX),
        nonce,
        signature: sig,
    })
}

fn valid_nonce(n: &str) -> bool {
    (16..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The raw query's `name=value` pairs, sorted bytewise and joined by `&`.
pub fn canonical_query(raw: Option<&str>) -> String {
    let mut pairs: Vec<&str> = raw.unwrap_or("").split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_unstable();
    pairs.join("&")
}

/// What a signature covers (docs/api.md §1's string to sign, before joining).
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub timestamp: i64,
    pub nonce: &'a str,
    pub method: &'a str,
    /// As sent on the request line, without the query.
    pub path: &'a str,
    /// The raw query string, if any.
    pub query: Option<&'a str>,
    pub body: &'a [u8],
}

impl Message<'_> {
    pub fn string_to_sign(&self) -> String {
        let mut out = Vec::with_capacity(160 + self.path.len());
        self.write_to(|part| out.extend_from_slice(part));
        String::from_utf8(out).expect("every part is UTF-8")
    }

    /// Hands the string to sign to `sink` in pieces, without building it: the hot path
    /// feeds the pieces straight into the MAC.
    fn write_to(&self, mut sink: impl FnMut(&[u8])) {
        let mut body_hash = [0u8; 64];
        hex::encode_to_slice(Sha256::digest(self.body), &mut body_hash).expect("64 hex digits");
        let mut ts = [0u8; 20];
        let ts = {
            let mut w = &mut ts[..];
            write!(w, "{}", self.timestamp).expect("an i64 fits in 20 bytes");
            let left = w.len();
            &ts[..20 - left]
        };
        let query = match self.query {
            None | Some("") => std::borrow::Cow::Borrowed(""),
            Some(q) => std::borrow::Cow::Owned(canonical_query(Some(q))),
        };
        for (i, part) in [
            SCHEME.as_bytes(),
            ts,
            self.nonce.as_bytes(),
            self.method.as_bytes(),
            self.path.as_bytes(),
            query.as_bytes(),
            &body_hash,
        ]
        .into_iter()
        .enumerate()
        {
            if i > 0 {
                sink(b"\n");
            }
            sink(part);
        }
    }
}

/// A secret's HMAC, keyed once: each request clones the keyed state instead of hashing
/// the key again, and the string to sign is fed in pieces, never allocated.
#[derive(Clone)]
pub struct Signer(Hmac<Sha256>);

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    pub fn new(secret: &[u8]) -> Self {
        Signer(<Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length"))
    }

    fn mac(&self, message: &Message<'_>) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        message.write_to(|part| mac.update(part));
        mac
    }

    pub fn sign(&self, message: &Message<'_>) -> [u8; 32] {
        self.mac(message).finalize().into_bytes().into()
    }

    /// Constant-time comparison of the expected signature with the one given.
    pub fn verify(&self, message: &Message<'_>, signature: &[u8; 32]) -> bool {
        self.mac(message).verify_slice(signature).is_ok()
    }

    /// The whole header for a request signed with this secret.
    pub fn authorization(&self, key_id: &str, message: &Message<'_>) -> String {
        let mut sig = [0u8; 64];
        hex::encode_to_slice(self.sign(message), &mut sig).expect("64 hex digits");
        format!(
            "{SCHEME} key_id=\"{key_id}\",timestamp=\"{}\",nonce=\"{}\",signature=\"{}\"",
            message.timestamp,
            message.nonce,
            std::str::from_utf8(&sig).expect("hex is ASCII")
        )
    }
}

fn mac(secret: &[u8], message: &str) -> Hmac<Sha256> {
    let mut mac = Signer::new(secret).0;
    mac.update(message.as_bytes());
    mac
}

/// Lower-case hex signature of a string to sign.
pub fn sign(secret: &[u8], string_to_sign: &str) -> String {
    hex::encode(mac(secret, string_to_sign).finalize().into_bytes())
}

/// Constant-time comparison of the expected signature with the one given.
pub fn verify(secret: &[u8], string_to_sign: &str, signature: &[u8; 32]) -> bool {
    mac(secret, string_to_sign).verify_slice(signature).is_ok()
}

/// A whole header for a request: what clients (and the tests) send.
pub fn authorization(key_id: &str, secret: &[u8], message: &Message<'_>) -> String {
    Signer::new(secret).authorization(key_id, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parameters_in_any_order_with_spaces() {
        let sig = "ab".repeat(32);
        let h = format!(
            "CG1-HMAC-SHA256  signature=\"{sig}\" , nonce=\"abcdefghijklmnop\",key_id=\"ak_1\",  timestamp=\"17\""
        );
        let p = parse_header(&h).unwrap();
        assert_eq!((p.key_id, p.timestamp, p.nonce), ("ak_1", 17, "abcdefghijklmnop"));
        let lower = h.replacen("CG1-HMAC-SHA256", "cg1-hmac-sha256", 1);
        assert_eq!(parse_header(&lower), Some(p), "the scheme is case-insensitive");
    }

    #[test]
    fn rejects_malformed_headers() {
        let sig = "ab".repeat(32);
        let good = format!("key_id=\"k\",timestamp=\"1\",nonce=\"abcdefghijklmnop\",signature=\"{sig}\"");
        for bad in [
            String::new(),
            format!("Bearer {good}"),
            format!("CG1-HMAC-SHA256{good}"),
            format!("CG1-HMAC-SHA256 {}", good.replace("\"1\"", "\"01\"")),
            format!("CG1-HMAC-SHA256 {good},key_id=\"k\""),
            format!("CG1-HMAC-SHA256 {good},extra=\"1\""),
            good.replace("CG1", "")
                .replace("\"1\"", "\"-1\"")
                .replace("key_id", "CG1-HMAC-SHA256 key_id"),
            format!("CG1-HMAC-SHA256 {}", good.replace("abcdefghijklmnop", "short")),
            format!(
                "CG1-HMAC-SHA256 {}",
                good.replace("abcdefghijklmnop", "abcdefghijklmno!")
            ),
            format!("CG1-HMAC-SHA256 {}", good.replace(&sig, "zz")),
            format!("CG1-HMAC-SHA256 {}", good.replace("\"k\"", "k")),
            format!("CG1-HMAC-SHA256 {}", good.replace(",timestamp=\"1\"", "")),
        ] {
            assert!(parse_header(&bad).is_none(), "{bad}");
        }
        assert!(parse_header(&format!("CG1-HMAC-SHA256 {good}")).is_some());
    }

    #[test]
    fn a_long_key_id_is_a_key_to_look_up_until_no_key_could_be_that_long() {
        let sig = "ab".repeat(32);
        let header = |key: &str| {
            format!("CG1-HMAC-SHA256 key_id=\"{key}\",timestamp=\"1\",nonce=\"abcdefghijklmnop\",signature=\"{sig}\"")
        };
        assert!(parse_header(&header(&"k".repeat(65))).is_some());
        assert!(parse_header(&header(&"k".repeat(KEY_ID_MAX))).is_some());
        assert!(parse_header(&header(&"k".repeat(KEY_ID_MAX + 1))).is_none());
    }

    #[test]
    fn a_timestamp_of_any_length_is_a_time() {
        let sig = "ab".repeat(32);
        let with = |t: &str| {
            parse_header(&format!(
                "CG1-HMAC-SHA256 key_id=\"k\",timestamp=\"{t}\",nonce=\"abcdefghijklmnop\",signature=\"{sig}\""
            ))
            .map(|h| h.timestamp)
        };
        assert_eq!(with("1764570000000"), Some(1_764_570_000_000), "milliseconds");
        assert_eq!(with("9223372036854775807"), Some(i64::MAX));
        assert_eq!(with(&"9".repeat(40)), Some(i64::MAX), "past i64: the farthest time");
        assert_eq!(with("0"), Some(0));
    }

    #[test]
    fn canonical_query_sorts_raw_pairs() {
        assert_eq!(canonical_query(Some("b=2&a=1&a=0")), "a=0&a=1&b=2");
        assert_eq!(canonical_query(None), "");
        assert_eq!(canonical_query(Some("")), "");
    }
}
