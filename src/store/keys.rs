//! Every Redis key is named here, so that moving to Redis Cluster is a local change.
//!
//! All keys one reservation touches must share a hash slot. Until resellers get home
//! shards (docs/design.md, "Scale-out"), everything lives under the one tag `{s0}`.

#[derive(Debug, Clone)]
pub struct Keys {
    /// `<prefix>{s0}:`
    base: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            base: format!("{prefix}:{{s0}}:"),
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.base.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }

    /// List of sellable codes of a product: elements are [`crate::stock::element`]s.
    pub fn stock(&self, product_id: i64) -> String {
        self.key(&["stock", &product_id.to_string()])
    }

    /// A reseller's hot balance in minor units: Postgres balance less orders in flight.
    pub fn balance(&self, reseller_pk: i64) -> String {
        self.key(&["bal", &reseller_pk.to_string()])
    }

    /// Set once a hot-balance movement decided in Postgres has been applied here, so that a
    /// retry of it is not applied twice ([`crate::hot_balance`]).
    pub fn hot_movement(&self, movement: &str) -> String {
        self.key(&["hotmv", movement])
    }

    /// Failed logins of one operator username, expiring with the lock-out window.
    pub fn login_failures(&self, username: &str, ip: std::net::IpAddr) -> String {
        self.key(&["loginfail", username, &ip.to_string()])
    }

    /// A spent request nonce of one API key (expires after the replay window).
    pub fn nonce(&self, key_id: &str, nonce: &str) -> String {
        self.key(&["nonce", key_id, nonce])
    }

    /// The fast-path idempotency record of one merchant_order_no (a hash: state,
    /// fingerprint, order id); Postgres keeps the number forever.
    pub fn idempotency(&self, reseller_pk: i64, merchant_order_no: &str) -> String {
        self.key(&["idem", &reseller_pk.to_string(), merchant_order_no])
    }

    /// The outbox: reserved fulfilments waiting for the ledger writer (a stream).
    pub fn outbox(&self) -> String {
        self.key(&["outbox"])
    }

    /// A reseller's risk state, read and written by the reservation script (a hash:
    /// `hold`, the day's spend as `day`/`spent`, the order rate as `m`/`n`/`avg`).
    pub fn risk(&self, reseller_pk: i64) -> String {
        self.key(&["risk", &reseller_pk.to_string()])
    }

    /// One API key's spend today (a hash: `day`, `spent`).
    pub fn key_spend(&self, key_id: &str) -> String {
        self.key(&["kspend", key_id])
    }

    /// The client addresses a reseller ordered from, each with when it last did (a hash).
    pub fn addresses(&self, reseller_pk: i64) -> String {
        self.key(&["addrs", &reseller_pk.to_string()])
    }

    /// A reseller's token bucket of one class, shared by every gateway: its GCRA
    /// theoretical arrival time in microseconds of Redis's clock, expiring when the bucket
    /// is full again ([`crate::ratelimit::global`]).
    pub fn rate(&self, reseller_pk: i64, class: crate::ratelimit::Class) -> String {
        let class = match class {
            crate::ratelimit::Class::Reads => "r",
            crate::ratelimit::Class::Writes => "w",
        };
        self.key(&["rate", class, &reseller_pk.to_string()])
    }

    /// Signatures that did not verify for one existing key in one minute.
    pub fn signature_failures(&self, key_id: &str, minute: i64) -> String {
        self.key(&["sigfail", key_id, &minute.to_string()])
    }

    /// Written when the Redis state was last rebuilt from Postgres; its absence means
    /// Redis lost its data.
    pub fn epoch(&self) -> String {
        self.key(&["epoch"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_shard_tag() {
        let k = Keys::new("cg");
        assert_eq!(k.epoch(), "cg:{s0}:epoch");
        assert_eq!(k.stock(7), "cg:{s0}:stock:7");
        assert_eq!(k.balance(3), "cg:{s0}:bal:3");
        assert_eq!(k.idempotency(3, "M-1"), "cg:{s0}:idem:3:M-1");
        assert_eq!(k.outbox(), "cg:{s0}:outbox");
        assert_eq!(k.rate(3, crate::ratelimit::Class::Writes), "cg:{s0}:rate:w:3");
        assert_eq!(k.rate(3, crate::ratelimit::Class::Reads), "cg:{s0}:rate:r:3");
    }
}
