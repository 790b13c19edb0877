//! The stock mover: keeps every cell's pool of a product stocked, moving codes between
//! cells in two idempotent steps (docs/design.md, "Scale-out").
//!
//! A reservation only sees its reseller's home cell, so each product's codes are split
//! into one pool per cell. A transfer moves codes from one pool to another:
//!
//! 1. `OUT`, on the source cell: pops up to n codes into a transfer record (a list under
//!    the transfer's id) and names the id in the cell's set of open transfers. A retry
//!    with the same id finds it there and pops nothing more.
//! 2. `IN`, on the destination cell: pushes the record's codes into the destination pool
//!    and sets a marker under the id, so a retry pushes nothing twice.
//! 3. `FINISH`, on the source cell: deletes the record, drops the id from the open set
//!    and leaves a marker so that a late retry of step 1 pops nothing.
//!
//! A code is always in exactly one pool or one transfer record; a transfer cut short
//! (a crash between the steps) stays open and the next pass completes it. Every step
//! checks its cell's epoch, carried in the transfer id: a rebuild in between restored
//! the pools from Postgres, so what an older transfer holds is dropped, not pushed.
//!
//! Pools are kept in proportion to how fast each cell sells ([`step`]); a cell that runs
//! dry under an order asks for what it lacks at once ([`fill`]).

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::Script;

use crate::app::App;
use crate::store::keys::Keys;

/// Codes per transfer at most: a script's arguments are unpacked onto Lua's stack.
const TRANSFER_MAX: usize = 1_000;
/// How long the markers that make steps 1 and 2 idempotent are kept: far longer than a
/// transfer can stay open.
const MARKER_TTL_SECS: u64 = 7 * 24 * 3600;

static OUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS: 1 source pool, 2 transfer record, 3 open transfers, 4 epoch, 5 finished marker,
--       6 the cell's move counter
-- ARGV: 1 transfer id, 2 codes to move, 3 the epoch the transfer belongs to
if redis.call('GET', KEYS[4]) ~= ARGV[3] then return -1 end
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return redis.call('LLEN', KEYS[2]) end
local codes = redis.call('LPOP', KEYS[1], tonumber(ARGV[2]))
if not codes then return 0 end
redis.call('RPUSH', KEYS[2], unpack(codes))
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('INCR', KEYS[6])
return #codes",
    )
});

static IN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS: 1 destination pool, 2 arrived marker, 3 epoch, 4 the cell's move counter
-- ARGV: 1 the transfer's epoch, 2 marker TTL, 3.. the codes
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return 0 end
for i = 3, #ARGV do
  redis.call('RPUSH', KEYS[1], ARGV[i])
end
redis.call('INCR', KEYS[4])
return #ARGV - 2",
    )
});

static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS: 1 transfer record, 2 open transfers, 3 finished marker
-- ARGV: 1 transfer id, 2 marker TTL
redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
redis.call('DEL', KEYS[1])
return redis.call('SREM', KEYS[2], ARGV[1])",
    )
});

/// One transfer: what it moves where, at which epoch. Its id spells all of it, so an
/// open transfer found in Redis can be completed by anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub product: i64,
    pub from: u32,
    pub to: u32,
    pub epoch: i64,
    pub id: String,
}

impl Transfer {
    pub fn new(product: i64, from: u32, to: u32, epoch: i64) -> Transfer {
        let id = format!("{product}.{from}.{to}.{epoch}.{}", crate::ids::random("", 12));
        Transfer {
            product,
            from,
            to,
            epoch,
            id,
        }
    }

    pub fn parse(id: &str) -> Option<Transfer> {
        let mut it = id.split('.');
        let t = Transfer {
            product: it.next()?.parse().ok()?,
            from: it.next()?.parse().ok()?,
            to: it.next()?.parse().ok()?,
            epoch: it.next()?.parse().ok()?,
            id: id.to_string(),
        };
        // The random part, and nothing after it.
        it.next()?;
        it.next().is_none().then_some(t)
    }
}

/// The cell imports push a product's codes into; the mover spreads them from there.
pub fn import_cell(keys: &Keys, product: i64) -> u32 {
    product.rem_euclid(i64::from(keys.cells())) as u32
}

/// Step 1: pops up to `n` codes of the source pool into the transfer's record. Returns
/// how many the record holds (`None`: the source cell is not at the transfer's epoch).
pub async fn take_out<C: ConnectionLike>(
    c: &mut C,
    keys: &Keys,
    t: &Transfer,
    n: usize,
) -> redis::RedisResult<Option<usize>> {
    let got: i64 = OUT
        .key(keys.stock(t.from, t.product))
        .key(keys.transfer(t.from, &t.id))
        .key(keys.transfers(t.from, t.product))
        .key(keys.epoch(t.from))
        .key(keys.transfer_done(t.from, &t.id))
        .key(keys.moves(t.from, t.product))
        .arg(&t.id)
        .arg(n.min(TRANSFER_MAX))
        .arg(t.epoch)
        .invoke_async(c)
        .await?;
    Ok(usize::try_from(got).ok())
}

/// Steps 2 and 3: pushes an open transfer's codes into the destination pool (once) and
/// closes it. Returns the codes pushed by this call.
pub async fn complete<C: ConnectionLike>(c: &mut C, keys: &Keys, t: &Transfer) -> redis::RedisResult<usize> {
    let codes: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(keys.transfer(t.from, &t.id))
        .arg(0)
        .arg(-1)
        .query_async(c)
        .await?;
    let mut inv = IN.prepare_invoke();
    inv.key(keys.stock(t.to, t.product))
        .key(keys.transfer_done(t.to, &t.id))
        .key(keys.epoch(t.to))
        .key(keys.moves(t.to, t.product))
        .arg(t.epoch)
        .arg(MARKER_TTL_SECS);
    for code in &codes {
        inv.arg(code.as_slice());
    }
    // -1: a rebuild came between and restored these codes from Postgres; the record
    // is dropped with nothing pushed.
    let pushed: i64 = inv.invoke_async(c).await?;
    FINISH
        .key(keys.transfer(t.from, &t.id))
        .key(keys.transfers(t.from, t.product))
        .key(keys.transfer_done(t.from, &t.id))
        .arg(&t.id)
        .arg(MARKER_TTL_SECS)
        .invoke_async::<i64>(c)
        .await?;
    Ok(pushed.max(0) as usize)
}

/// One whole transfer of up to `n` codes. Returns the codes that arrived.
pub async fn transfer<C: ConnectionLike>(c: &mut C, keys: &Keys, t: &Transfer, n: usize) -> redis::RedisResult<usize> {
    match take_out(c, keys, t, n).await? {
        Some(0) | None => Ok(0),
        Some(_) => complete(c, keys, t).await,
    }
}

/// The open transfers of a product out of every cell.
pub async fn open_transfers<C: ConnectionLike>(
    c: &mut C,
    keys: &Keys,
    product: i64,
) -> redis::RedisResult<Vec<Transfer>> {
    let mut pipe = redis::pipe();
    for cell in keys.all_cells() {
        pipe.cmd("SMEMBERS").arg(keys.transfers(cell, product));
    }
    let ids: Vec<Vec<String>> = pipe.query_async(c).await?;
    Ok(ids.iter().flatten().filter_map(|id| Transfer::parse(id)).collect())
}

/// The open transfers of a product whose codes have not reached their destination: a
/// record already pushed (its arrival marker set) but not yet closed holds copies of codes
/// that are in the destination pool too.
pub async fn in_transit<C: ConnectionLike>(c: &mut C, keys: &Keys, product: i64) -> redis::RedisResult<Vec<Transfer>> {
    let mut out = Vec::new();
    for t in open_transfers(c, keys, product).await? {
        let arrived: bool = redis::cmd("EXISTS")
            .arg(keys.transfer_done(t.to, &t.id))
            .query_async(c)
            .await?;
        if !arrived {
            out.push(t);
        }
    }
    Ok(out)
}

/// Completes every open transfer of a product (those a crash or a concurrent mover left
/// between the steps; completing one twice is harmless). Returns the codes pushed. One
/// whose cell's slot is being migrated between Redis Cluster nodes stays open for a later
/// pass.
pub async fn finish_open<C: ConnectionLike>(c: &mut C, keys: &Keys, product: i64) -> redis::RedisResult<usize> {
    let mut pushed = 0;
    for t in open_transfers(c, keys, product).await? {
        match complete(c, keys, &t).await {
            Ok(n) => pushed += n,
            Err(e) if crate::store::redis::slot_moving(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(pushed)
}

/// Each cell's pool length of a product.
pub async fn pool_lengths<C: ConnectionLike>(c: &mut C, keys: &Keys, product: i64) -> redis::RedisResult<Vec<usize>> {
    pool_counts(keys, product).query_async(c).await
}

/// Each product's codes over every cell (the sum of its pools), in one pipeline.
pub async fn available<C: ConnectionLike>(c: &mut C, keys: &Keys, products: &[i64]) -> redis::RedisResult<Vec<i64>> {
    let mut pipe = redis::pipe();
    for &product in products {
        for cell in keys.all_cells() {
            pipe.cmd("LLEN").arg(keys.stock(cell, product));
        }
    }
    let lens: Vec<i64> = pipe.query_async(c).await?;
    let cells = keys.all_cells().count().max(1);
    if lens.len() != products.len() * cells {
        return Err(std::io::Error::other("pool counts that are not what was asked").into());
    }
    Ok(lens.chunks(cells).map(|c| c.iter().sum()).collect())
}

/// `LLEN` of each cell's pool of a product, in cell order.
fn pool_counts(keys: &Keys, product: i64) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for cell in keys.all_cells() {
        pipe.cmd("LLEN").arg(keys.stock(cell, product));
    }
    pipe
}

/// Each product's [`pool_counts`] as one shared read of the signed reads' coalescer,
/// built once: the requests asking a product's counts hand it the same `Arc`, which goes
/// once into each pipeline. A product's keys never change, so nothing expires.
#[derive(Default)]
pub struct PoolCounts(std::sync::Mutex<std::collections::HashMap<i64, std::sync::Arc<redis::Pipeline>>>);

impl PoolCounts {
    pub fn of(&self, keys: &Keys, product: i64) -> std::sync::Arc<redis::Pipeline> {
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::sync::Arc::clone(
            memo.entry(product)
                .or_insert_with(|| std::sync::Arc::new(pool_counts(keys, product))),
        )
    }
}

/// Readings of every cell tried by [`settled_stock`] before it gives up.
const SETTLE_TRIES: usize = 5;

/// A product's codes in every pool and in every transfer record not yet pushed, counted while
/// no transfer moved any: each cell's move counter is read before and after the counting,
/// and unchanged everywhere means the counting saw every code where it was (orders taking
/// codes meanwhile only make the count high, never low). `None`: transfers moved codes
/// during every try.
pub async fn settled_stock<C: ConnectionLike>(
    c: &mut C,
    keys: &Keys,
    product: i64,
) -> redis::RedisResult<Option<usize>> {
    for _ in 0..SETTLE_TRIES {
        let before = move_counts(c, keys, product).await?;
        let pooled: usize = pool_lengths(c, keys, product).await?.iter().sum();
        let mut in_flight = 0;
        for t in in_transit(c, keys, product).await? {
            in_flight += redis::cmd("LLEN")
                .arg(keys.transfer(t.from, &t.id))
                .query_async::<usize>(c)
                .await?;
        }
        if move_counts(c, keys, product).await? == before {
            return Ok(Some(pooled + in_flight));
        }
    }
    Ok(None)
}

async fn move_counts<C: ConnectionLike>(c: &mut C, keys: &Keys, product: i64) -> redis::RedisResult<Vec<Option<u64>>> {
    let mut pipe = redis::pipe();
    for cell in keys.all_cells() {
        pipe.cmd("GET").arg(keys.moves(cell, product));
    }
    pipe.query_async(c).await
}

/// What [`fill`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    /// The cell holds (or held, a moment ago) enough: worth reserving again.
    Moved,
    /// All cells and transfers together held `total` codes, fewer than wanted: out of
    /// stock. `as_of` is what the home cell read before the count
    /// ([`super::sold_out::as_of`]).
    Short { as_of: String, total: usize },
    /// Redis is being rebuilt: no epoch to move under.
    Rebuilding,
}

/// Brings at least what `cell` lacks of `want` codes from the other cells at once, the
/// fullest first. Open transfers are completed first, so that codes in flight count.
pub async fn fill(app: &App, product: i64, cell: u32, want: usize) -> redis::RedisResult<Fill> {
    let started = std::time::Instant::now();
    let filled = fill_from_others(app, product, cell, want).await;
    metrics::histogram!("cardgate_stock_fill_seconds").record(started.elapsed().as_secs_f64());
    filled
}

async fn fill_from_others(app: &App, product: i64, cell: u32, want: usize) -> redis::RedisResult<Fill> {
    let keys = &app.keys;
    let mut c = app.redis();
    // Before counting: a restock after this reading is never mistaken for a sell-out.
    let Some((epoch, as_of)) = super::sold_out::as_of(&mut c, keys, cell, product).await? else {
        return Ok(Fill::Rebuilding);
    };
    finish_open(&mut c, keys, product).await?;
    let mut lens = pool_lengths(&mut c, keys, product).await?;
    if lens.iter().sum::<usize>() < want {
        // The pools are read one cell after another (on a cluster, on different nodes), so
        // codes moved by another transfer meanwhile can be counted in neither cell: a
        // shortage is only believed when no transfer moved codes while they were counted.
        match settled_stock(&mut c, keys, product).await? {
            Some(total) if total < want => return Ok(Fill::Short { as_of, total }),
            Some(_) => lens = pool_lengths(&mut c, keys, product).await?,
            // Transfers keep moving codes: some remain; the order tries again.
            None => return Ok(Fill::Moved),
        }
    }
    let mut need = want.saturating_sub(lens[cell as usize]);
    let mut sources: Vec<(u32, usize)> = keys
        .all_cells()
        .zip(lens.iter().copied())
        .filter(|(c, n)| *c != cell && *n > 0)
        .collect();
    sources.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let cells = keys.cells() as usize;
    for (from, len) in sources {
        if need == 0 {
            break;
        }
        // What is lacking and a fair share of the rest, so the next order finds some.
        let take = (need + len.saturating_sub(need) / cells).min(len);
        let mut moved = 0;
        while moved < take {
            let t = Transfer::new(product, from, cell, epoch);
            let got = match transfer(&mut c, keys, &t, take - moved).await {
                Ok(got) => got,
                // That cell's slot is being migrated between nodes: the next source serves
                // instead (a transfer cut short stays open and is completed later).
                Err(e) if crate::store::redis::slot_moving(&e) => 0,
                Err(e) => return Err(e),
            };
            if got == 0 {
                break;
            }
            moved += got;
        }
        metrics::counter!("cardgate_stock_moved_total", "why" => "dry").increment(moved as u64);
        need = need.saturating_sub(moved);
    }
    Ok(Fill::Moved)
}

/// One pass over every product on sale: completes open transfers, then moves codes from
/// pools above their target to pools well below theirs. A pool's target is its share of
/// the product's codes in proportion to what its cell sold lately (plus one, so a cell
/// that sold nothing yet keeps a little). Returns the codes moved. Tests call it.
pub async fn step(app: &App) -> redis::RedisResult<usize> {
    let keys = &app.keys;
    if keys.cells() == 1 {
        return Ok(0);
    }
    let mut c = app.redis();
    let Some(epoch) = crate::rebuild::redis_epoch(&mut c, app).await? else {
        return Ok(0);
    };
    let mut moved = 0;
    let products: Vec<i64> = app.catalogue.snapshot().values().map(|p| p.id).collect();
    for product in products {
        moved += finish_open(&mut c, keys, product).await?;
        let lens = pool_lengths(&mut c, keys, product).await?;
        let mut pipe = redis::pipe();
        for cell in keys.all_cells() {
            pipe.cmd("GET").arg(keys.sold(cell, product));
        }
        let sold: Vec<Option<u64>> = pipe.query_async(&mut c).await?;
        for (from, to, n) in plan(&lens, &sold) {
            let t = Transfer::new(product, from, to, epoch);
            let got = transfer(&mut c, keys, &t, n).await?;
            metrics::counter!("cardgate_stock_moved_total", "why" => "balance").increment(got as u64);
            moved += got;
        }
    }
    Ok(moved)
}

/// The transfers `(from, to, codes)` that bring pools near their targets: a pool below
/// three quarters of its target is topped up to it from pools above theirs.
pub fn plan(lens: &[usize], sold: &[Option<u64>]) -> Vec<(u32, u32, usize)> {
    let total: usize = lens.iter().sum();
    let weights: Vec<u64> = sold.iter().map(|s| s.unwrap_or(0) + 1).collect();
    let weight: u64 = weights.iter().sum();
    if total == 0 || weight == 0 || lens.len() != weights.len() {
        return Vec::new();
    }
    let target: Vec<usize> = weights
        .iter()
        .map(|w| ((total as u128 * *w as u128) / weight as u128) as usize)
        .collect();
    let mut surplus: Vec<(u32, usize)> = lens
        .iter()
        .zip(&target)
        .enumerate()
        .filter(|(_, (l, t))| l > t)
        .map(|(i, (l, t))| (i as u32, l - t))
        .collect();
    let mut moves = Vec::new();
    for (to, (l, t)) in lens.iter().zip(&target).enumerate() {
        if *l * 4 >= *t * 3 {
            continue;
        }
        let mut need = t - l;
        for (from, spare) in surplus.iter_mut() {
            if need == 0 {
                break;
            }
            let n = need.min(*spare);
            if n > 0 {
                moves.push((*from, to as u32, n));
                *spare -= n;
                need -= n;
            }
        }
    }
    moves
}

/// Deletes every pool, open transfer and sales counter of a product (a rebuild, which
/// fills the pools again from Postgres).
pub async fn clear<C: ConnectionLike>(app: &App, c: &mut C, product: i64) -> redis::RedisResult<()> {
    let keys = &app.keys;
    let open = open_transfers(c, keys, product).await?;
    let mut pipe = redis::pipe();
    for t in &open {
        pipe.cmd("DEL").arg(keys.transfer(t.from, &t.id)).ignore();
    }
    for cell in keys.all_cells() {
        pipe.cmd("DEL").arg(keys.stock(cell, product)).ignore();
        pipe.cmd("DEL").arg(keys.transfers(cell, product)).ignore();
        pipe.cmd("DEL").arg(keys.sold(cell, product)).ignore();
        pipe.cmd("DEL").arg(keys.moves(cell, product)).ignore();
    }
    pipe.query_async(c).await
}

/// Runs [`step`] every `redis.mover_interval_ms` until the process ends.
pub async fn run(app: std::sync::Arc<App>) {
    let every = std::time::Duration::from_millis(app.config.redis.mover_interval_ms.max(10));
    loop {
        tokio::time::sleep(every).await;
        let started = std::time::Instant::now();
        let moved = step(&app).await;
        metrics::histogram!("cardgate_stock_mover_pass_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = moved {
            tracing::warn!(error = %e, "stock mover pass failed; the next one retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_ids_spell_the_transfer() {
        let t = Transfer::new(7, 1, 5, 3);
        assert_eq!(Transfer::parse(&t.id), Some(t));
        assert_eq!(Transfer::parse("7.1.5"), None);
        assert_eq!(Transfer::parse("7.1.5.3.x.y"), None);
    }

    #[test]
    fn pools_are_topped_up_in_proportion_to_sales() {
        // Everything in cell 0, cell 2 selling three times as fast as the others.
        let moves = plan(&[800, 0, 0, 0], &[None, None, Some(2), None]);
        assert_eq!(moves, vec![(0, 1, 133), (0, 2, 400), (0, 3, 133)]);
        // Near the targets: nothing moves.
        assert!(plan(&[210, 190, 200, 200], &[None; 4]).is_empty());
        assert!(plan(&[0, 0], &[None, None]).is_empty());
    }
}
