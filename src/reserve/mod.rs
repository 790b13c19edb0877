//! The Redis side of an order: one atomic script reserves it ([`reserve`]); after the
//! ledger writer's Postgres commit another acknowledges it ([`settle`]), or, if it is not
//! to be committed, a third undoes it ([`release`]).
//!
//! Every key a script touches shares the reseller's home cell's hash tag (see
//! [`crate::store::keys`]).

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{Cmd, RedisError, Script};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

use crate::auth::signing::NONCE_TTL_SECS;
use crate::ratelimit::global::{self, Charge};
use crate::ratelimit::{Class, Outcome};
use crate::store::keys::Keys;
use crate::store::redis::Redis;

/// The outbox's consumer group: every gateway's ledger writer reads through it.
pub const GROUP: &str = "ledger";

/// The bucket's code comes first: the script charges the write bucket itself.
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../ratelimit/gcra.lua"),
        include_str!("reserve.lua")
    ))
});
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("give_back.lua"), include_str!("release.lua"))));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("settle.lua")));

/// Everything the ledger writer needs to record one order, carried in its outbox entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fulfilment {
    pub order_id: String,
    pub reseller: i64,
    pub merchant_order_no: String,
    pub product: i64,
    pub sku: String,
    pub quantity: i32,
    pub unit_price: i64,
    pub amount: i64,
    /// Unix seconds: the order's `created_at`, the same in the first answer and in replays.
    pub created_at: i64,
    /// Milliseconds past that second, which Postgres keeps so that a statement lists an
    /// order and a balance movement of the same second in the order they happened (an
    /// entry written before this field reads 0).
    #[serde(default)]
    pub created_ms: u16,
    /// The API key that placed it: its spend is counted against the key's limit.
    #[serde(default)]
    pub key_id: String,
}

impl Fulfilment {
    /// `created_at` and `created_ms` of an order placed at `unix_ms`.
    pub fn placed_at(unix_ms: i64) -> (i64, u16) {
        (unix_ms.div_euclid(1000), unix_ms.rem_euclid(1000) as u16)
    }

    /// When the order was placed, in unix milliseconds.
    pub fn created_unix_ms(&self) -> i64 {
        self.created_at * 1000 + i64::from(self.created_ms)
    }
}

/// The UTC day of a unix time, as spend is counted (`YYYY-MM-DD`).
pub fn utc_day(unix_secs: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix_secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let d = t.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// What the reservation script holds an order to beyond stock and balance: the credit
/// line, the spend limits and the risk rules evaluated in the same step.
#[derive(Debug, Clone, Default)]
pub struct Guards {
    pub credit_limit: i64,
    pub reseller_daily_limit: Option<i64>,
    pub key_daily_limit: Option<i64>,
    /// The client's address, when the `new_address` rule is on.
    pub address: Option<String>,
    /// `(factor, floor per minute)`, when the `velocity` rule is on.
    pub velocity: Option<(f64, u32)>,
    /// The rules whose action is hold, as the script names them (`a`, `v`).
    pub holds: &'static str,
}

/// One outbox entry, as `reserve.lua` appends it: the fulfilment (`o`), its stock
/// elements (`c`) and the Redis epoch it was reserved at (`e`).
#[derive(Debug)]
pub struct Entry {
    pub id: String,
    pub epoch: i64,
    pub f: Fulfilment,
    pub elements: Vec<Vec<u8>>,
}

impl Entry {
    /// `None` if the entry is malformed.
    pub fn decode(s: &redis::streams::StreamId) -> Option<Entry> {
        let o: Vec<u8> = s.get("o")?;
        let c: Vec<u8> = s.get("c")?;
        Some(Entry {
            id: s.id.clone(),
            // Entries written before epochs existed count as epoch 0, older than any rebuild.
            epoch: s.get::<i64>("e").unwrap_or(0),
            f: serde_json::from_slice(&o).ok()?,
            elements: unpack(&c)?,
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reserved {
    /// Codes taken and money held (these stock elements); the fulfilment is in the outbox.
    /// `signals`: the risk rules the order fired, as `reserve.lua` names them.
    Ok { signals: String, elements: Vec<Vec<u8>> },
    /// The merchant_order_no has a record already.
    Seen {
        pending: bool,
        fingerprint: String,
        order_id: String,
        /// The order went upstream: no outbox entry will commit it.
        upstream: bool,
    },
    /// Nothing taken.
    Refused(Refusal),
    /// Nothing taken: this order fired a rule whose action is hold (`signals`), and the
    /// script held the reseller. Refused `risk_hold` like every order after it.
    Held { signals: String },
    /// Money held and the number recorded, no codes taken: the order is to be bought
    /// upstream (`crate::upstream`).
    Upstream { signals: String },
}

/// What the reservation script answered, and the write bucket after it charged it
/// (`None` when it took no tokens).
#[derive(Debug, PartialEq, Eq)]
pub struct Reservation {
    pub reserved: Reserved,
    pub bucket: Option<Outcome>,
}

/// Why a reservation took nothing. The first four are decided by the gateway before the
/// script runs and passed to it, so that they are reported only after the idempotency
/// check (a replay of an order placed before a price change still gets its order); the
/// rest are the script's own. [`Refusal::wire`] and [`Refusal::from_wire`] are the one
/// mapping to and from the codes `reserve.lua` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownProduct,
    ProductUnavailable,
    QuantityOutOfRange,
    PriceChanged,
    /// The request's nonce was spent already: a replayed request.
    NonceReused,
    /// Redis has lost its state and is not rebuilt from Postgres yet.
    Rebuilding,
    OutOfStock,
    /// A reseller created while Redis was away: nothing is sold until the rebuild.
    NoHotBalance,
    InsufficientBalance,
    SpendLimitExceeded,
    /// Risk control holds the reseller's orders.
    RiskHold,
    /// The reseller's write bucket, shared by every gateway, has not the tokens.
    RateLimited,
    /// The home cell's pool cannot fill the order while other cells may: never answered,
    /// the gateway brings stock over and asks again ([`crate::stock::mover`]).
    CellDry,
}

impl Refusal {
    const ALL: [Refusal; 13] = [
        Refusal::UnknownProduct,
        Refusal::ProductUnavailable,
        Refusal::QuantityOutOfRange,
        Refusal::PriceChanged,
        Refusal::NonceReused,
        Refusal::Rebuilding,
        Refusal::OutOfStock,
        Refusal::NoHotBalance,
        Refusal::InsufficientBalance,
        Refusal::SpendLimitExceeded,
        Refusal::RiskHold,
        Refusal::RateLimited,
        Refusal::CellDry,
    ];

    pub fn wire(self) -> &'static str {
        match self {
            Refusal::UnknownProduct => "not_found",
            Refusal::ProductUnavailable => "product_unavailable",
            Refusal::QuantityOutOfRange => "quantity_out_of_range",
            Refusal::PriceChanged => "price_changed",
            Refusal::NonceReused => "nonce_reused",
            Refusal::Rebuilding => "rebuilding",
            Refusal::OutOfStock => "out_of_stock",
            Refusal::NoHotBalance => "no_hot_balance",
            Refusal::InsufficientBalance => "insufficient_balance",
            Refusal::SpendLimitExceeded => "spend_limit_exceeded",
            Refusal::RiskHold => "risk_hold",
            Refusal::RateLimited => "rate_limited",
            Refusal::CellDry => "cell_dry",
        }
    }

    pub fn from_wire(code: &[u8]) -> Option<Refusal> {
        Refusal::ALL.into_iter().find(|r| r.wire().as_bytes() == code)
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::UnknownProduct => ApiError::not_found("no such product"),
            Refusal::ProductUnavailable => ApiError::ProductUnavailable,
            Refusal::QuantityOutOfRange => ApiError::QuantityOutOfRange(
                "quantity must be between 1 and the product's max_quantity for your tier".into(),
            ),
            Refusal::PriceChanged => ApiError::PriceChanged,
            Refusal::NonceReused => ApiError::NonceReused,
            Refusal::OutOfStock => ApiError::OutOfStock,
            // Stock remains in other cells but could not be brought over in time.
            Refusal::CellDry => ApiError::Unavailable {
                what: "stock (being moved between cells)",
                retry_after_secs: 1,
            },
            Refusal::InsufficientBalance => ApiError::InsufficientBalance,
            Refusal::SpendLimitExceeded => ApiError::SpendLimitExceeded,
            Refusal::RiskHold => ApiError::RiskHold,
            // The bucket's own wait replaces this where the answer has it
            // (`ratelimit::global::Tokens::limited`).
            Refusal::RateLimited => ApiError::RateLimited { retry_after_secs: 1 },
            Refusal::Rebuilding | Refusal::NoHotBalance => ApiError::Unavailable {
                what: "stock (being rebuilt)",
                retry_after_secs: 1,
            },
        }
    }
}

/// What a replay must match to be a replay: the sku and the quantity (docs/api.md §3).
pub fn fingerprint(sku: &str, quantity: i64) -> String {
    format!("{sku}\n{quantity}")
}

/// Runs a reservation built by [`reserve_cmd`] (`EVALSHA`, loading the script on first use).
pub async fn reserve<C: ConnectionLike>(conn: &mut C, cmd: &Cmd) -> Result<Reservation, RedisError> {
    let reply: Vec<Vec<u8>> = crate::store::redis::evalsha(conn, &RESERVE, cmd).await?;
    parse_reserved(reply).ok_or_else(|| io_error("unexpected reply from the reservation script".into()))
}

/// The reservation's `EVALSHA`, built straight into one command buffer (a
/// `ScriptInvocation` copies every argument once more); benches/order_path.rs measures it.
/// `nonce_key`, a request nonce's key (`Keys::nonce`), is spent by the script first, and
/// `charge`'s tokens are taken from the reseller's write bucket before that: the two go
/// together, with the request's first reservation (a retry, or an order of a batch, has
/// neither). With `other_cells`, a home pool short of the order is refused
/// [`Refusal::CellDry`] instead of out of stock or bought upstream, unless `sold_out`
/// ([`crate::stock::sold_out::SoldOut::as_of`]) shows no cell can fill it.
#[allow(clippy::too_many_arguments)]
pub fn reserve_cmd(
    keys: &Keys,
    f: &Fulfilment,
    fingerprint: &str,
    refusal: Option<Refusal>,
    record_ttl_secs: u64,
    nonce_key: Option<&str>,
    charge: Option<&Charge>,
    guards: &Guards,
    sourcing: Sourcing,
    other_cells: bool,
    sold_out: &str,
) -> Cmd {
    let cell = keys.cell_of(f.reseller);
    // Serialising plain integers and strings cannot fail.
    let fields = serde_json::to_vec(f).unwrap_or_default();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(RESERVE.get_hash())
        .arg(if nonce_key.is_some() { 12 } else { 11 })
        .arg(keys.idempotency(f.reseller, &f.merchant_order_no))
        .arg(keys.stock(cell, f.product))
        .arg(keys.balance(f.reseller))
        .arg(keys.outbox(cell))
        .arg(keys.epoch(cell))
        .arg(keys.risk(f.reseller))
        .arg(keys.key_spend(f.reseller, &f.key_id))
        .arg(keys.addresses(f.reseller))
        .arg(keys.rate(f.reseller, Class::Writes))
        .arg(keys.sold(cell, f.product))
        .arg(keys.restocked(cell, f.product));
    if let Some(k) = nonce_key {
        cmd.arg(k);
    }
    cmd.arg(&f.order_id)
        .arg(fingerprint)
        .arg(f.quantity)
        .arg(f.amount)
        .arg(refusal.map_or("", Refusal::wire))
        .arg(record_ttl_secs)
        .arg(fields)
        .arg(NONCE_TTL_SECS)
        .arg(guards.credit_limit)
        .arg(utc_day(f.created_at))
        .arg(limit_arg(guards.reseller_daily_limit))
        .arg(limit_arg(guards.key_daily_limit))
        .arg(f.created_at)
        .arg(guards.address.as_deref().unwrap_or(""))
        .arg(f.created_at.div_euclid(60));
    match guards.velocity {
        Some((factor, floor)) => cmd.arg(factor).arg(floor),
        None => cmd.arg(0).arg(""),
    };
    cmd.arg(match sourcing {
        Sourcing::Local => "",
        Sourcing::Fallback => "fallback",
        Sourcing::Only => "only",
        // Refused before the script looks at where codes come from.
        Sourcing::Nowhere => "",
    });
    match charge {
        Some(c) => cmd.arg(c.n).arg(c.quota.interval_us).arg(c.quota.burst),
        None => cmd.arg(0).arg(0).arg(0),
    };
    cmd.arg(if other_cells { "cells" } else { "" })
        .arg(guards.holds)
        .arg(sold_out);
    cmd
}

/// Where an order's codes may come from (docs/api.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sourcing {
    /// Local stock only: short stock is `out_of_stock`.
    Local,
    /// Local stock, else bought upstream whole.
    Fallback,
    /// Always bought upstream.
    Only,
    /// Upstream only, and no source to buy from: every order is `out_of_stock`, decided by
    /// the gateway, nothing taken.
    Nowhere,
}

fn limit_arg(limit: Option<i64>) -> String {
    limit.map(|l| l.to_string()).unwrap_or_default()
}

fn parse_reserved(reply: Vec<Vec<u8>>) -> Option<Reservation> {
    let mut it = reply.into_iter();
    let text = |v: Option<Vec<u8>>| v.and_then(|b| String::from_utf8(b).ok());
    let status = it.next()?;
    let bucket = global::parse_bucket(&it.next()?)?;
    let reserved = match status.as_slice() {
        b"ok" => Reserved::Ok {
            signals: text(it.next())?,
            elements: it.collect(),
        },
        b"dup" => Reserved::Seen {
            pending: text(it.next())? == "pending",
            fingerprint: text(it.next())?,
            order_id: text(it.next())?,
            upstream: it.next().is_some_and(|v| v == b"1"),
        },
        b"upstream" => Reserved::Upstream {
            signals: text(it.next())?,
        },
        b"refused" => match (Refusal::from_wire(&it.next()?)?, it.next()) {
            (Refusal::RiskHold, Some(fired)) => Reserved::Held {
                signals: String::from_utf8(fired).ok()?,
            },
            (refusal, _) => Reserved::Refused(refusal),
        },
        _ => return None,
    };
    // The bucket refuses exactly when the script says rate_limited.
    let limited = matches!(bucket, Some(Outcome::Refused { .. }));
    let refused_for_rate = reserved == Reserved::Refused(Refusal::RateLimited);
    if limited != refused_for_rate && reserved != Reserved::Refused(Refusal::NonceReused) {
        return None;
    }
    Some(Reservation { reserved, bucket })
}

/// Acknowledges committed orders: deletes their outbox entries, one script per home cell
/// (its keys must share a slot), the cells' scripts sent at once.
pub async fn settle(conn: &Redis, keys: &Keys, committed: &[(&str, &Fulfilment)]) -> Result<(), RedisError> {
    let mut by_cell: std::collections::BTreeMap<u32, Vec<&str>> = Default::default();
    for (entry_id, f) in committed {
        by_cell.entry(keys.cell_of(f.reseller)).or_default().push(entry_id);
    }
    let scripts = by_cell.into_iter().map(|(cell, entry_ids)| {
        let mut inv = SETTLE.prepare_invoke();
        inv.key(keys.outbox(cell)).arg(GROUP).arg(entry_ids);
        let mut conn = conn.clone();
        async move { inv.invoke_async::<i64>(&mut conn).await }
    });
    futures_util::future::try_join_all(scripts).await.map(drop)
}

/// Undoes a reservation made at `epoch` that will not be committed. `elements` are the
/// codes that may be sold again (never one Postgres has delivered or voided). With
/// `dedupe`, other copies of each element are removed from the stock first. Returns false
/// when another writer released the entry already. A reservation from before the last
/// rebuild is only acknowledged.
pub async fn release<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    entry_id: &str,
    epoch: i64,
    f: &Fulfilment,
    elements: &[Vec<u8>],
    dedupe: bool,
) -> Result<bool, RedisError> {
    // Back into the home cell's pool, where the codes were taken from.
    let cell = keys.cell_of(f.reseller);
    let mut inv = RELEASE.prepare_invoke();
    inv.key(keys.idempotency(f.reseller, &f.merchant_order_no))
        .key(keys.stock(cell, f.product))
        .key(keys.balance(f.reseller))
        .key(keys.outbox(cell))
        .key(keys.epoch(cell))
        .key(keys.risk(f.reseller))
        .key(keys.key_spend(f.reseller, &f.key_id))
        .arg(&f.order_id)
        .arg(f.amount)
        .arg(GROUP)
        .arg(entry_id)
        .arg(if dedupe { "1" } else { "0" })
        .arg(epoch)
        .arg(utc_day(f.created_at));
    for e in elements {
        inv.arg(e.as_slice());
    }
    let released = inv.invoke_async::<i64>(conn).await? == 1;
    if released && !elements.is_empty() {
        // Codes back in a pool: a sell-out found before is no longer one. The entry is gone
        // already, so this is not retried; a sell-out is trusted only briefly for that.
        if let Err(e) = crate::stock::sold_out::restocked(conn, keys, f.product).await {
            tracing::warn!(error = %e, "could not count codes given back as a restock");
        }
    }
    Ok(released)
}

/// The stock elements packed in an outbox entry's `c` field (2-byte length, element).
pub fn unpack(mut packed: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !packed.is_empty() {
        let (len, rest) = packed.split_first_chunk::<2>()?;
        let n = u16::from_be_bytes(*len) as usize;
        out.push(rest.get(..n)?.to_vec());
        packed = &rest[n..];
    }
    Some(out)
}

fn io_error(msg: String) -> RedisError {
    RedisError::from(std::io::Error::other(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_elements_round_trip_and_truncation_is_caught() {
        let a = vec![7u8; 300];
        let mut packed = vec![1, 44];
        packed.extend_from_slice(&a);
        packed.extend_from_slice(&[0, 2, 9, 9]);
        assert_eq!(unpack(&packed), Some(vec![a, vec![9, 9]]));
        assert_eq!(unpack(&packed[..packed.len() - 1]), None);
        assert_eq!(unpack(&[0]), None);
        assert_eq!(unpack(&[]), Some(vec![]));
    }

    #[test]
    fn every_refusal_reads_back_from_its_wire_code_and_the_script_speaks_each_of_its_own() {
        let script = include_str!("reserve.lua");
        for r in Refusal::ALL {
            assert_eq!(Refusal::from_wire(r.wire().as_bytes()), Some(r));
        }
        for r in [
            Refusal::NonceReused,
            Refusal::RateLimited,
            Refusal::Rebuilding,
            Refusal::OutOfStock,
            Refusal::CellDry,
            Refusal::NoHotBalance,
            Refusal::InsufficientBalance,
            Refusal::SpendLimitExceeded,
            Refusal::RiskHold,
        ] {
            assert!(
                script.contains(&format!("{{'refused', bucket, '{}'}}", r.wire())),
                "{r:?}"
            );
        }
        assert_eq!(ApiError::from(Refusal::RateLimited).status().as_u16(), 429);
        assert_eq!(ApiError::from(Refusal::RateLimited).code(), "rate_limited");
        assert!(ApiError::from(Refusal::RateLimited).retry_after_secs().is_some());
    }

    #[test]
    fn an_orders_millisecond_is_kept_beside_its_second() {
        let (at, ms) = Fulfilment::placed_at(1_764_000_000_999);
        assert_eq!((at, ms), (1_764_000_000, 999));
        let f = Fulfilment {
            order_id: String::new(),
            reseller: 1,
            merchant_order_no: String::new(),
            product: 1,
            sku: String::new(),
            quantity: 1,
            unit_price: 0,
            amount: 0,
            created_at: at,
            created_ms: ms,
            key_id: String::new(),
        };
        assert_eq!(f.created_unix_ms(), 1_764_000_000_999);
        // An outbox entry written before the field: the second, to the millisecond.
        let old: Fulfilment = serde_json::from_str(
            r#"{"order_id":"","reseller":1,"merchant_order_no":"","product":1,"sku":"","quantity":1,"unit_price":0,"amount":0,"created_at":1764000000}"#,
        )
        .unwrap();
        assert_eq!(old.created_unix_ms(), 1_764_000_000_000);
    }

    #[test]
    fn replies_parse() {
        let b = |s: &str| s.as_bytes().to_vec();
        let plain = |reserved| Some(Reservation { reserved, bucket: None });
        assert_eq!(
            parse_reserved(vec![b("ok"), b(""), b("av"), b("x"), b("y")]),
            plain(Reserved::Ok {
                signals: "av".into(),
                elements: vec![b("x"), b("y")]
            })
        );
        assert_eq!(
            parse_reserved(vec![b("dup"), b(""), b("done"), b("s\n1"), b("ord_1")]),
            plain(Reserved::Seen {
                pending: false,
                fingerprint: "s\n1".into(),
                order_id: "ord_1".into(),
                upstream: false
            })
        );
        assert_eq!(
            parse_reserved(vec![b("refused"), b(""), b("out_of_stock")]),
            plain(Reserved::Refused(Refusal::OutOfStock))
        );
        // The order that placed a hold names the rules it fired; a held reseller's next
        // orders do not.
        assert_eq!(
            parse_reserved(vec![b("refused"), b(""), b("risk_hold"), b("a")]),
            plain(Reserved::Held { signals: "a".into() })
        );
        assert_eq!(
            parse_reserved(vec![b("refused"), b(""), b("risk_hold")]),
            plain(Reserved::Refused(Refusal::RiskHold))
        );
        // A charged bucket comes back whatever the outcome.
        let charged = parse_reserved(vec![b("refused"), b("40 39 50000 0"), b("out_of_stock")]).unwrap();
        assert_eq!(charged.bucket.map(|o| o.headers().remaining), Some(39));
        let limited = parse_reserved(vec![b("refused"), b("40 0 2000000 25000"), b("rate_limited")]).unwrap();
        assert_eq!(limited.reserved, Reserved::Refused(Refusal::RateLimited));
        assert!(matches!(
            limited.bucket,
            Some(Outcome::Refused {
                retry_after_secs: 1,
                ..
            })
        ));
        // A replay is counted too, admitted or not.
        assert!(parse_reserved(vec![b("refused"), b("40 0 2000000 25000"), b("nonce_reused")]).is_some());
        // The bucket and the answer must agree on whether it refused.
        assert_eq!(
            parse_reserved(vec![b("refused"), b("40 39 50000 0"), b("rate_limited")]),
            None
        );
        assert_eq!(parse_reserved(vec![b("ok"), b("40 0 2000000 25000"), b("")]), None);
        assert_eq!(parse_reserved(vec![b("refused"), b("1 2"), b("out_of_stock")]), None);
        assert_eq!(parse_reserved(vec![b("refused"), b(""), b("no_such_refusal")]), None);
        assert_eq!(parse_reserved(vec![b("refused"), b("out_of_stock")]), None);
        assert_eq!(parse_reserved(vec![b("what"), b("")]), None);
        assert_eq!(parse_reserved(vec![]), None);
    }
}
