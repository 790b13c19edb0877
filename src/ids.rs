//! Public identifiers and generated secrets.

use rand::distributions::{Alphanumeric, DistString};

/// `prefix` followed by `len` random characters of `[A-Za-z0-9]` (about 5.95 bits each).
pub fn random(prefix: &str, len: usize) -> String {
    let mut s = String::with_capacity(prefix.len() + len);
    s.push_str(prefix);
    Alphanumeric.append_string(&mut rand::thread_rng(), &mut s, len);
    s
}

pub fn reseller_id() -> String {
    random("rs_", 16)
}

pub fn key_id() -> String {
    random("ak_", 20)
}

/// 40 characters: about 238 bits.
pub fn api_secret() -> String {
    random("sk_", 40)
}

pub fn webhook_secret() -> String {
    random("whsec_", 32)
}

pub fn supplier_id() -> String {
    random("sp_", 16)
}

pub fn order_id() -> String {
    random("ord_", 20)
}
