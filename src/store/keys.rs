//! Every Redis key is named here, so that moving to Redis Cluster is a local change.
//!
//! All keys one reservation touches must share a hash slot. Each reseller has a home
//! cell (docs/design.md, "Scale-out"): its balance, idempotency records, risk state,
//! buckets and nonces, the cell's outbox, epoch and stock pools all carry the cell's hash
//! tag `{cN}`. Keys that belong to no reseller (login and signature failures) stay under
//! `{s0}`. With one cell every key is under `{s0}`, exactly as before cells existed.

#[derive(Debug, Clone)]
pub struct Keys {
    /// `<prefix>:`
    prefix: String,
    cells: u32,
}

impl Keys {
    /// One cell: every key under `{s0}`.
    pub fn new(prefix: &str) -> Self {
        Keys::with_cells(prefix, 1)
    }

    pub fn with_cells(prefix: &str, cells: u32) -> Self {
        Keys {
            prefix: format!("{prefix}:"),
            cells: cells.max(1),
        }
    }

    pub fn cells(&self) -> u32 {
        self.cells
    }

    /// Every cell, in order.
    pub fn all_cells(&self) -> std::ops::Range<u32> {
        0..self.cells
    }

    /// A reseller's home cell: a function of its id alone, so every gateway agrees and a
    /// reseller never moves while the cell count stays.
    pub fn cell_of(&self, reseller_pk: i64) -> u32 {
        reseller_pk.rem_euclid(i64::from(self.cells)) as u32
    }

    /// Built in one allocation, without `format!`: a reservation names a dozen keys, and
    /// building them showed as 4% of the gateway's CPU under orders.
    fn key_in(&self, cell: Option<u32>, parts: &[&str]) -> String {
        let mut k = String::with_capacity(self.prefix.len() + 16 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
        k.push_str(&self.prefix);
        match cell {
            Some(cell) if self.cells > 1 => {
                use std::fmt::Write;
                let _ = write!(k, "{{c{cell}}}");
            }
            _ => k.push_str("{s0}"),
        }
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    fn cell_key(&self, cell: u32, parts: &[&str]) -> String {
        self.key_in(Some(cell), parts)
    }

    fn home_key(&self, reseller_pk: i64, parts: &[&str]) -> String {
        self.cell_key(self.cell_of(reseller_pk), parts)
    }

    fn global_key(&self, parts: &[&str]) -> String {
        self.key_in(None, parts)
    }

    /// One cell's pool of sellable codes of a product (a list of [`crate::stock::element`]s).
    pub fn stock(&self, cell: u32, product_id: i64) -> String {
        self.cell_key(cell, &["stock", &product_id.to_string()])
    }

    /// Codes of a product sold from one cell lately (a counter that expires): how fast
    /// the pool empties, for the mover's targets ([`crate::stock::mover`]).
    pub fn sold(&self, cell: u32, product_id: i64) -> String {
        self.cell_key(cell, &["sold", &product_id.to_string()])
    }

    /// Codes popped from this cell's pool on their way to another cell (a list), under
    /// the transfer's id ([`crate::stock::mover`]).
    pub fn transfer(&self, cell: u32, transfer_id: &str) -> String {
        self.cell_key(cell, &["xfer", transfer_id])
    }

    /// How many times a transfer took codes out of, or put codes into, this cell's pool of a
    /// product (a counter): unchanged over a reading of every cell, it shows no transfer
    /// moved codes while they were counted ([`crate::stock::mover`]).
    pub fn moves(&self, cell: u32, product_id: i64) -> String {
        self.cell_key(cell, &["moves", &product_id.to_string()])
    }

    /// How many times codes of a product were added to any cell's pool other than by a
    /// transfer (imports, codes given back): a counter kept in every cell, so a reservation
    /// script can tell, in its own cell, that nothing was restocked since a gateway found
    /// every cell dry ([`crate::stock::sold_out`]).
    pub fn restocked(&self, cell: u32, product_id: i64) -> String {
        self.cell_key(cell, &["restocked", &product_id.to_string()])
    }

    /// The ids of a product's transfers out of this cell not yet finished (a set).
    pub fn transfers(&self, cell: u32, product_id: i64) -> String {
        self.cell_key(cell, &["xfers", &product_id.to_string()])
    }

    /// Set in the destination cell once a transfer's codes are in its pool, so that a
    /// retry does not push them twice.
    pub fn transfer_done(&self, cell: u32, transfer_id: &str) -> String {
        self.cell_key(cell, &["xferdone", transfer_id])
    }

    /// A reseller's hot balance in minor units: Postgres balance less orders in flight.
    pub fn balance(&self, reseller_pk: i64) -> String {
        self.home_key(reseller_pk, &["bal", &reseller_pk.to_string()])
    }

    /// Set once a hot-balance movement decided in Postgres has been applied here, so that a
    /// retry of it is not applied twice ([`crate::hot_balance`]). In the reseller's cell,
    /// with its balance.
    pub fn hot_movement(&self, reseller_pk: i64, movement: &str) -> String {
        self.home_key(reseller_pk, &["hotmv", movement])
    }

    /// Failed logins of one operator username, expiring with the lock-out window.
    pub fn login_failures(&self, username: &str, ip: std::net::IpAddr) -> String {
        self.global_key(&["loginfail", username, &ip.to_string()])
    }

    /// A spent request nonce of one API key (expires after the replay window), in the
    /// key's reseller's cell: the reservation script spends it.
    pub fn nonce(&self, reseller_pk: i64, key_id: &str, nonce: &str) -> String {
        self.home_key(reseller_pk, &["nonce", key_id, nonce])
    }

    /// The fast-path idempotency record of one merchant_order_no (a hash: state,
    /// fingerprint, order id); Postgres keeps the number forever.
    pub fn idempotency(&self, reseller_pk: i64, merchant_order_no: &str) -> String {
        self.home_key(reseller_pk, &["idem", &reseller_pk.to_string(), merchant_order_no])
    }

    /// One cell's outbox: reserved fulfilments waiting for the ledger writer (a stream).
    pub fn outbox(&self, cell: u32) -> String {
        self.cell_key(cell, &["outbox"])
    }

    /// A reseller's risk state, read and written by the reservation script (a hash:
    /// `hold`, the day's spend as `day`/`spent`, the order rate as `m`/`n`/`avg`).
    pub fn risk(&self, reseller_pk: i64) -> String {
        self.home_key(reseller_pk, &["risk", &reseller_pk.to_string()])
    }

    /// One API key's spend today (a hash: `day`, `spent`), in its reseller's cell.
    pub fn key_spend(&self, reseller_pk: i64, key_id: &str) -> String {
        self.home_key(reseller_pk, &["kspend", key_id])
    }

    /// The client addresses a reseller ordered from, each with when it last did (a hash).
    pub fn addresses(&self, reseller_pk: i64) -> String {
        self.home_key(reseller_pk, &["addrs", &reseller_pk.to_string()])
    }

    /// A reseller's token bucket of one class, shared by every gateway: its GCRA
    /// theoretical arrival time in microseconds of Redis's clock, expiring when the bucket
    /// is full again ([`crate::ratelimit::global`]).
    pub fn rate(&self, reseller_pk: i64, class: crate::ratelimit::Class) -> String {
        let class = match class {
            crate::ratelimit::Class::Reads => "r",
            crate::ratelimit::Class::Writes => "w",
        };
        self.home_key(reseller_pk, &["rate", class, &reseller_pk.to_string()])
    }

    /// Signatures that did not verify for one existing key in one minute.
    pub fn signature_failures(&self, key_id: &str, minute: i64) -> String {
        self.global_key(&["sigfail", key_id, &minute.to_string()])
    }

    /// Written in every cell when the Redis state was last rebuilt from Postgres; its
    /// absence in a cell means that cell lost its data.
    pub fn epoch(&self, cell: u32) -> String {
        self.cell_key(cell, &["epoch"])
    }
}

/// The part of a key Redis Cluster hashes to find its slot: between the first `{` and the
/// next `}` when something is there, else the whole key. Keys with one tag share a slot.
pub fn hash_tag(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cell_keeps_every_key_under_one_tag() {
        let k = Keys::new("cg");
        assert_eq!(k.epoch(0), "cg:{s0}:epoch");
        assert_eq!(k.stock(0, 7), "cg:{s0}:stock:7");
        assert_eq!(k.balance(3), "cg:{s0}:bal:3");
        assert_eq!(k.idempotency(3, "M-1"), "cg:{s0}:idem:3:M-1");
        assert_eq!(k.outbox(0), "cg:{s0}:outbox");
        assert_eq!(k.rate(3, crate::ratelimit::Class::Writes), "cg:{s0}:rate:w:3");
        assert_eq!(k.rate(3, crate::ratelimit::Class::Reads), "cg:{s0}:rate:r:3");
    }

    #[test]
    fn a_resellers_keys_share_its_home_cells_tag() {
        let k = Keys::with_cells("cg", 8);
        assert_eq!(k.cell_of(11), 3);
        assert_eq!(k.balance(11), "cg:{c3}:bal:11");
        assert_eq!(k.idempotency(11, "M"), "cg:{c3}:idem:11:M");
        assert_eq!(k.nonce(11, "ak", "n"), "cg:{c3}:nonce:ak:n");
        assert_eq!(k.key_spend(11, "ak"), "cg:{c3}:kspend:ak");
        assert_eq!(k.hot_movement(11, "m"), "cg:{c3}:hotmv:m");
        assert_eq!(k.outbox(3), "cg:{c3}:outbox");
        assert_eq!(k.epoch(3), "cg:{c3}:epoch");
        assert_eq!(k.stock(3, 7), "cg:{c3}:stock:7");
        assert_eq!(k.signature_failures("ak", 1), "cg:{s0}:sigfail:ak:1");
        // As Redis Cluster reads a slot: the first tag, a client's `{` after it is not one.
        assert_eq!(hash_tag(&k.nonce(11, "ak", "{x}")), "c3");
        assert_eq!(hash_tag(&k.rate(11, crate::ratelimit::Class::Reads)), "c3");
        assert_eq!(hash_tag("a{}b{c}"), "a{}b{c}");
        assert_eq!(hash_tag("plain"), "plain");
    }
}
