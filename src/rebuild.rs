//! Rebuilding Redis from Postgres (docs/invariants.md invariant 5).
//!
//! Redis holds stock, hot balances and idempotency records, all of which Postgres can
//! rebuild, plus the fulfilments in flight. Its `epoch` key names the rebuild its state
//! comes from. A Redis that restarted empty has none, and a replica promoted from before
//! the last rebuild has an older one than Postgres's `redis_epoch`: either way a gateway
//! rebuilds it, under Postgres's exclusive fence lock (so several gateways never rebuild
//! at once), before anything is sold from it again. Meanwhile the reservation script
//! refuses (`503 unavailable`).
//!
//! Ordering with everything else that changes mirrored state rests on the fence
//! (migrations/V1__baseline.sql, `redis_fence`): a transaction that changes orders, codes
//! or balances takes it shared ([`fence`]), and a rebuild holds it exclusive. A change's Redis write made before its
//! commit is therefore never interleaved with a rebuild (which deletes and rewrites every
//! key it could have touched); one made after its commit (a credit made spendable) is
//! applied only if Redis is still at the epoch the transaction saw, because a rebuild
//! that came between has read the change from Postgres already. Fulfilments reserved before a
//! rebuild are refused by `ledger_commit()` as stale: the rebuild read Postgres, where
//! they never were, so their codes and money are already back.

use std::time::Instant;

use anyhow::Context;
use deadpool_postgres::GenericClient;
use futures_util::{pin_mut, TryStreamExt};
use redis::aio::ConnectionLike;

use crate::store::redis::Redis;
use serde::Serialize;

use crate::app::App;
use crate::reserve;

/// Stock elements per `RPUSH`, and elements per pipeline sent to Redis.
const PUSH_CHUNK: usize = 1_000;
const PIPELINE_ELEMENTS: usize = 20_000;

#[derive(Debug, Serialize)]
pub struct Report {
    /// The epoch Redis is at now.
    pub epoch: i64,
    pub products: u64,
    pub codes: u64,
    pub balances: u64,
    /// Recent orders whose idempotency records were restored (older ones are answered
    /// from Postgres).
    pub idempotency_records: u64,
    /// Reservations that were in flight in the lost state; never committed, so their
    /// codes and money are back in the rebuilt stock and balances.
    pub dropped_in_flight: u64,
    pub seconds: f64,
}

/// Takes the fence shared for the rest of `tx` and returns the epoch that Redis writes
/// made for this transaction's changes must be guarded by.
pub async fn fence(tx: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(tx.query_one("SELECT redis_fence()", &[]).await?.get(0))
}

/// The epoch Redis's state comes from; `None` when any cell has lost it (or the cells
/// disagree, as in the middle of a rebuild).
pub async fn redis_epoch<C: ConnectionLike>(redis: &mut C, app: &App) -> redis::RedisResult<Option<i64>> {
    // One GET per cell: a cluster serves each from its own node.
    let mut pipe = redis::pipe();
    for cell in app.keys.all_cells() {
        pipe.cmd("GET").arg(app.keys.epoch(cell));
    }
    let epochs: Vec<Option<i64>> = pipe.query_async(redis).await?;
    let first = epochs.first().copied().flatten();
    Ok(first.filter(|e| epochs.iter().all(|x| *x == Some(*e))))
}

/// Rebuilds Redis unless it is at Postgres's epoch already (always, with `force`).
/// `None`: nothing to do, possibly because another gateway just did it.
pub async fn rebuild(app: &App, force: bool) -> anyhow::Result<Option<Report>> {
    let started = Instant::now();
    let mut client = app.pg_orders.get().await?;
    let tx = client.transaction().await?;
    // Reading and writing a million codes takes seconds; the lock waits for writers.
    tx.batch_execute("SET LOCAL statement_timeout = '120s'").await?;
    let current: i64 = tx.query_one("SELECT redis_rebuild_lock()", &[]).await?.get(0);
    let mut redis = app.redis();
    if !force && redis_epoch(&mut redis, app).await? == Some(current) {
        return Ok(None);
    }
    let epoch = next_epoch(app).await?;
    tracing::warn!(epoch, "rebuilding Redis from Postgres; orders wait until it is done");
    // From here nothing is sold in any cell, and no late write of an earlier change lands.
    let mut pipe = redis::pipe();
    for cell in app.keys.all_cells() {
        pipe.cmd("DEL").arg(app.keys.epoch(cell)).ignore();
    }
    send(pipe, &mut redis).await?;
    let dropped_in_flight = drop_in_flight(app, &mut redis).await?;
    let (products, codes) = load_stock(app, &tx, &mut redis).await?;
    let balances = load_balances(app, &tx, &mut redis).await?;
    load_risk(app, &tx, &mut redis).await?;
    let idempotency_records = load_records(app, &tx, &mut redis).await?;
    // The ledger writers create the outboxes' consumer groups again when they find them
    // gone. Every cell gets the epoch: each script checks its own cell's.
    let mut pipe = redis::pipe();
    for cell in app.keys.all_cells() {
        pipe.cmd("SET").arg(app.keys.epoch(cell)).arg(epoch).ignore();
    }
    send(pipe, &mut redis).await?;
    tx.commit().await.context("releasing the rebuild's fence")?;
    let seconds = started.elapsed().as_secs_f64();
    metrics::counter!("cardgate_redis_rebuilds_total").increment(1);
    metrics::histogram!("cardgate_redis_rebuild_seconds").record(seconds);
    let report = Report {
        epoch,
        products,
        codes,
        balances,
        idempotency_records,
        dropped_in_flight,
        seconds,
    };
    tracing::warn!(?report, "Redis rebuilt from Postgres");
    Ok(Some(report))
}

/// Moves Postgres's epoch on, committed at once on a connection of its own, while the
/// caller holds the fence (which keeps every ledger commit from seeing the new epoch before
/// the rebuild is done). Committed with the rebuild instead, a rebuild failing after Redis
/// took its epoch (Postgres gone as it ends) would leave Redis at a number the next rebuild
/// hands out again, and the reservations made against the failed one's state would then
/// commit as current ones, though the next rebuild gave their codes and money back.
async fn next_epoch(app: &App) -> anyhow::Result<i64> {
    let (client, connection) = crate::store::pg::pg_config(&app.config)?
        .connect(tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres for the rebuild's epoch")?;
    let driver = tokio::spawn(connection);
    let epoch = client
        .query_one("UPDATE redis_epoch SET epoch = epoch + 1 RETURNING epoch", &[])
        .await
        .context("moving the epoch on");
    drop(client);
    let _ = driver.await;
    Ok(epoch?.get(0))
}

/// Deletes the outbox and the idempotency records of its reservations: none of them can
/// commit any more (their epoch is gone), and a record left `pending` would answer
/// `order_in_progress` for days.
async fn drop_in_flight(app: &App, redis: &mut Redis) -> anyhow::Result<u64> {
    let mut dropped = 0;
    for cell in app.keys.all_cells() {
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(app.keys.outbox(cell))
            .arg("-")
            .arg("+")
            .query_async(redis)
            .await?;
        let mut pipe = redis::pipe();
        for e in entries.ids.iter().filter_map(reserve::Entry::decode) {
            pipe.cmd("DEL")
                .arg(app.keys.idempotency(e.f.reseller, &e.f.merchant_order_no))
                .ignore();
            dropped += 1;
        }
        pipe.cmd("DEL").arg(app.keys.outbox(cell)).ignore();
        send(pipe, redis).await?;
    }
    Ok(dropped)
}

/// Every available code, in import order, into its product's pools, dealt over the cells
/// in turn; the pools and transfers of the lost state go first.
async fn load_stock(
    app: &App,
    tx: &deadpool_postgres::Transaction<'_>,
    redis: &mut Redis,
) -> anyhow::Result<(u64, u64)> {
    let products: Vec<i64> = tx
        .query("SELECT id FROM products", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for p in &products {
        crate::stock::mover::clear(app, redis, *p).await?;
    }

    let rows = tx
        .query_raw(
            "SELECT product_id, id, code_enc FROM codes WHERE status = 'available' ORDER BY product_id, id",
            std::iter::empty::<i64>(),
        )
        .await?;
    pin_mut!(rows);
    let cells = app.keys.cells() as usize;
    let mut pipe = redis::pipe();
    let (mut queued, mut codes) = (0usize, 0u64);
    // One chunk per cell; the product's n-th code goes to cell n mod cells.
    let mut chunks: Vec<Vec<Vec<u8>>> = vec![Vec::new(); cells];
    let mut chunk_product = None;
    let mut dealt = 0usize;
    let push = |pipe: &mut redis::Pipeline, product: i64, chunks: &mut Vec<Vec<Vec<u8>>>| {
        for (cell, chunk) in chunks.iter_mut().enumerate() {
            if !chunk.is_empty() {
                pipe.cmd("RPUSH")
                    .arg(app.keys.stock(cell as u32, product))
                    .arg(&*chunk)
                    .ignore();
                chunk.clear();
            }
        }
    };
    while let Some(row) = rows.try_next().await? {
        let product: i64 = row.get(0);
        if chunk_product.is_some_and(|p| p != product) {
            push(&mut pipe, chunk_product.unwrap_or(product), &mut chunks);
            dealt = 0;
        }
        chunk_product = Some(product);
        chunks[dealt % cells].push(crate::stock::element(row.get(1), row.get::<_, &[u8]>(2)));
        dealt += 1;
        codes += 1;
        queued += 1;
        if queued == PIPELINE_ELEMENTS || chunks.iter().any(|c| c.len() == PUSH_CHUNK) {
            if let Some(p) = chunk_product {
                push(&mut pipe, p, &mut chunks);
            }
            send(std::mem::replace(&mut pipe, redis::pipe()), redis).await?;
            queued = 0;
        }
    }
    if let Some(p) = chunk_product {
        push(&mut pipe, p, &mut chunks);
    }
    send(pipe, redis).await?;
    Ok((products.len() as u64, codes))
}

/// Hot balances start at the Postgres balances: nothing is in flight in the new epoch.
async fn load_balances(app: &App, tx: &deadpool_postgres::Transaction<'_>, redis: &mut Redis) -> anyhow::Result<u64> {
    // An open purchase without its order yet holds its amount in the hot balance only.
    let rows = tx
        .query(
            "SELECT b.reseller_id, b.balance - coalesce((SELECT sum(p.amount) FROM purchases p
                                                          WHERE p.reseller_id = b.reseller_id AND p.state = 'open'
                                                            AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = p.order_id)), 0)::int8
               FROM balances b",
            &[],
        )
        .await?;
    // One SET each: the balances are in their resellers' cells, and a multi-key command
    // may not span slots.
    for part in rows.chunks(PUSH_CHUNK) {
        let mut pipe = redis::pipe();
        for r in part {
            pipe.cmd("SET")
                .arg(app.keys.balance(r.get(0)))
                .arg(r.get::<_, i64>(1))
                .ignore();
        }
        send(pipe, redis).await?;
    }
    Ok(rows.len() as u64)
}

/// Each reseller's risk hold and spend today, and each limited key's spend today, from
/// the orders Postgres holds (nothing is in flight in the new epoch). The order-rate and
/// address history the rules keep are Redis's alone: what survived is kept.
async fn load_risk(app: &App, tx: &deadpool_postgres::Transaction<'_>, redis: &mut Redis) -> anyhow::Result<()> {
    let now = app.clock.now();
    let today = reserve::utc_day(now.unix_timestamp());
    let midnight = now.replace_time(time::Time::MIDNIGHT);
    let resellers = tx
        .query(
            "SELECT r.id, r.risk_hold_at IS NOT NULL,
                    coalesce((SELECT sum(amount) FROM orders o WHERE o.reseller_id = r.id AND o.created_at >= $1), 0)::int8
               FROM resellers r",
            &[&midnight],
        )
        .await?;
    for part in resellers.chunks(PUSH_CHUNK) {
        let mut pipe = redis::pipe();
        for r in part {
            let key = app.keys.risk(r.get(0));
            pipe.cmd("HSET")
                .arg(&key)
                .arg("day")
                .arg(&today)
                .arg("spent")
                .arg(r.get::<_, i64>(2))
                .ignore();
            if r.get(1) {
                pipe.cmd("HSET").arg(&key).arg("hold").arg("1").ignore();
            } else {
                pipe.cmd("HDEL").arg(&key).arg("hold").ignore();
            }
        }
        send(pipe, redis).await?;
    }
    let keys = tx
        .query(
            "SELECT k.key_id, coalesce(sum(o.amount), 0)::int8, k.reseller_id
               FROM api_keys k LEFT JOIN orders o ON o.key_id = k.key_id AND o.created_at >= $1
              WHERE k.daily_spend_limit IS NOT NULL AND k.revoked_at IS NULL
              GROUP BY k.key_id, k.reseller_id",
            &[&midnight],
        )
        .await?;
    for part in keys.chunks(PUSH_CHUNK) {
        let mut pipe = redis::pipe();
        for k in part {
            let key = app.keys.key_spend(k.get(2), k.get(0));
            pipe.cmd("HSET")
                .arg(&key)
                .arg("day")
                .arg(&today)
                .arg("spent")
                .arg(k.get::<_, i64>(1))
                .ignore();
            pipe.cmd("EXPIRE").arg(&key).arg(172_800).ignore();
        }
        send(pipe, redis).await?;
    }
    Ok(())
}

/// Idempotency records of the most recent orders, so their replays stay on the fast path.
async fn load_records(app: &App, tx: &deadpool_postgres::Transaction<'_>, redis: &mut Redis) -> anyhow::Result<u64> {
    let limit = app.config.redis.rebuild_recent_orders as i64;
    let rows = tx
        .query(
            "SELECT reseller_id, merchant_order_no, sku, quantity, order_id FROM orders ORDER BY id DESC LIMIT $1",
            &[&limit],
        )
        .await?;
    let ttl = app.config.orders.idempotency_ttl_secs;
    for part in rows.chunks(PUSH_CHUNK) {
        let mut pipe = redis::pipe();
        for r in part {
            let key = app.keys.idempotency(r.get(0), r.get(1));
            let fp = reserve::fingerprint(r.get(2), r.get::<_, i32>(3).into());
            pipe.cmd("HSET")
                .arg(&key)
                .arg("state")
                .arg("done")
                .arg("fp")
                .arg(fp)
                .arg("order")
                .arg(r.get::<_, &str>(4))
                .ignore()
                .cmd("EXPIRE")
                .arg(&key)
                .arg(ttl)
                .ignore();
        }
        send(pipe, redis).await?;
    }
    Ok(rows.len() as u64)
}

async fn send(pipe: redis::Pipeline, redis: &mut Redis) -> redis::RedisResult<()> {
    if pipe.is_empty() {
        return Ok(());
    }
    pipe.query_async(redis).await
}
