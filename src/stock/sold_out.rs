//! Sell-outs already found, so that after a product sells out each order is refused in its
//! one reservation call rather than by a fill's reading of every cell.
//!
//! With several cells, an order whose home pool is short is answered `out_of_stock` only
//! once [`super::mover::fill`] has counted every cell and transfer and found them short.
//! That count is a few dozen commands; in a flash sale every order after the sell-out paid
//! it, and the refusals took longer than the sales. A fill that finds a shortage notes
//! here what it read first: the home cell's epoch and the product's restock counter there
//! ([`crate::store::keys::Keys::restocked`]). Codes reach a pool from outside only by an
//! import or a give-back, which bump that counter in every cell before they answer, or by
//! a rebuild, which moves the epoch; transfers between cells only move codes already
//! counted. So the reservation script, finding both unchanged in its own cell, knows no
//! cell can fill an order for more codes than the fill found, exactly as the fill would.
//!
//! A note is trusted for `redis.sold_out_trust_ms` at most: a restock whose bump was lost
//! (Redis failed between the codes and the counter) delays sales of its codes no longer
//! than that. A give-back bumps the counters just after its codes are back, so an order
//! in between, with a note, can still be refused for that moment.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;

use crate::store::keys::Keys;

/// Sell-outs this gateway found, by product and home cell. Bounded by products times cells.
pub struct SoldOut {
    found: Mutex<HashMap<(i64, u32), Found>>,
    /// How long one is trusted before a fill counts again.
    trusted: Duration,
}

struct Found {
    /// `epoch:restock counter` of the home cell, read before the count.
    as_of: String,
    /// The codes every cell and transfer held together.
    total: usize,
    at: Instant,
}

impl SoldOut {
    pub fn new(trusted: Duration) -> SoldOut {
        SoldOut {
            found: Mutex::default(),
            trusted,
        }
    }

    /// A fill found `total` codes of `product` in every cell together, fewer than an order
    /// from `cell` wanted, reading `as_of` in `cell` before it counted.
    pub fn note(&self, product: i64, cell: u32, as_of: String, total: usize) {
        let found = Found {
            as_of,
            total,
            at: Instant::now(),
        };
        if let Ok(mut m) = self.found.lock() {
            m.insert((product, cell), found);
        }
    }

    /// What the reservation script of an order for `quantity` codes from `cell` is to check
    /// (its argument 24), or `""` when no sell-out short of that quantity is known.
    pub fn as_of(&self, product: i64, cell: u32, quantity: usize) -> String {
        let Ok(m) = self.found.lock() else {
            return String::new();
        };
        match m.get(&(product, cell)) {
            Some(f) if quantity > f.total && f.at.elapsed() < self.trusted => f.as_of.clone(),
            _ => String::new(),
        }
    }
}

/// Counts a restock of `product` in every cell: codes were added to a pool other than by a
/// transfer. Called before the restock is acknowledged to anyone.
pub async fn restocked<C: ConnectionLike>(c: &mut C, keys: &Keys, product: i64) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    for cell in keys.all_cells() {
        pipe.cmd("INCR").arg(keys.restocked(cell, product)).ignore();
    }
    pipe.query_async(c).await
}

/// The epoch of `cell`, and its `epoch:restock counter` for `product`, read in one round
/// trip before counting the product's stock; `None` when the cell has no epoch (Redis is
/// being rebuilt).
pub async fn as_of<C: ConnectionLike>(
    c: &mut C,
    keys: &Keys,
    cell: u32,
    product: i64,
) -> redis::RedisResult<Option<(i64, String)>> {
    let (epoch, counter): (Option<i64>, Option<String>) = redis::pipe()
        .cmd("GET")
        .arg(keys.epoch(cell))
        .cmd("GET")
        .arg(keys.restocked(cell, product))
        .query_async(c)
        .await?;
    Ok(epoch.map(|e| (e, format!("{e}:{}", counter.unwrap_or_default()))))
}
