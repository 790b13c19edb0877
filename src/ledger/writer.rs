//! The ledger writer: reads reserved fulfilments from the outbox through the consumer
//! group, commits many of them per Postgres transaction, and only then acknowledges them
//! in Redis and wakes the requests waiting on them (group commit).
//!
//! Every gateway runs `orders.ledger_writers` of them; each home cell has its outbox
//! stream and its consumer group, and every writer reads every cell's (a batch spans
//! cells), so the groups share the outboxes out between all writers of all gateways. Entries another
//! writer read but never acknowledged (its gateway died) are claimed after
//! `orders.claim_idle_ms`. Committing is idempotent (the order id is unique), so an entry
//! committed twice is recorded once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;

use super::Settled;
use crate::app::App;
use crate::reserve::{self, Entry, Fulfilment, GROUP};
use crate::store::redis::Redis;

/// How long one read waits for new entries; also bounds how late a stop is noticed.
const BLOCK_MS: u64 = 500;
/// How soon an idle writer on a Redis Cluster looks at every cell's outbox again when
/// no order of its own gateway woke it: for the orders of other gateways, whose own
/// writers are woken at once.
const CLUSTER_POLL_MS: u64 = 50;
const CLAIM_EVERY: Duration = Duration::from_secs(5);
const GAUGES_EVERY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long committed orders whose slot is being migrated are tried again before they are
/// left to claiming: about as long as claiming takes to come round by default.
const SETTLE_PATIENCE: Duration = Duration::from_secs(30);

/// Runs until `stop` turns true and the outbox has nothing more for this writer. The
/// outbox gauges are the same for every writer: only the one with `gauges` reports them.
pub async fn run(app: Arc<App>, stop: watch::Receiver<bool>, gauges: bool) {
    let mut writer = Writer::new(gauges);
    let mut delay = Duration::from_millis(50);
    loop {
        let stopping = *stop.borrow();
        match writer.step(&app, !stopping).await {
            Ok(Step::Idle) if stopping => return,
            Ok(_) => delay = Duration::from_millis(50),
            Err(e) => {
                tracing::warn!(error = %e, "ledger writer lost its outbox reader; reconnecting");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// What one [`Writer::step`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Committed (or released) this many outbox entries; a round that looked for other
    /// writers' leftovers counts here even when it found none.
    Processed(usize),
    /// Nothing new was waiting.
    Idle,
}

/// One ledger writer: its consumer name in the outbox group and its Redis connection.
pub struct Writer {
    consumer: String,
    conn: Option<Redis>,
    next_claim: Instant,
    next_gauges: Option<Instant>,
}

impl Writer {
    pub fn new(gauges: bool) -> Writer {
        Writer {
            consumer: crate::ids::random("writer_", 12),
            conn: None,
            next_claim: Instant::now(),
            next_gauges: gauges.then(Instant::now),
        }
    }

    /// One round: reads what is due for this writer (new entries, waiting up to half a
    /// second for them when `block`; every few seconds instead the entries other writers
    /// left), commits them to Postgres, then settles or releases them in Redis and wakes
    /// their requests. Tests call it directly.
    pub async fn step(&mut self, app: &App, block: bool) -> redis::RedisResult<Step> {
        if self.conn.is_none() {
            self.conn = Some(connect(app).await?);
        }
        let Some(c) = self.conn.as_mut() else {
            return Ok(Step::Idle);
        };
        let claiming = Instant::now() >= self.next_claim;
        let read = if claiming {
            self.next_claim = Instant::now() + CLAIM_EVERY;
            claim(c, app, &self.consumer).await
        } else {
            read_new(c, app, &self.consumer, block).await
        };
        let ids = match read {
            Ok(ids) => ids,
            Err(e) => {
                self.conn = None;
                return Err(e);
            }
        };
        if self.next_gauges.is_some_and(|n| Instant::now() >= n) {
            self.next_gauges = Some(Instant::now() + GAUGES_EVERY);
            outbox_gauges(c, app).await;
        }
        if ids.is_empty() {
            // A claim round that found nothing is not the end: new entries may wait.
            return Ok(if claiming { Step::Processed(0) } else { Step::Idle });
        }
        let entries: Vec<Entry> = ids
            .iter()
            .filter_map(|s| {
                let e = Entry::decode(s);
                if e.is_none() {
                    // Left pending (never acknowledged): reconciliation reports it.
                    tracing::error!(entry = %s.id, "malformed outbox entry left in place");
                    metrics::counter!("cardgate_outbox_malformed_total").increment(1);
                }
                e
            })
            .collect();
        process(app, c, &entries).await;
        Ok(Step::Processed(entries.len()))
    }
}

async fn connect(app: &App) -> redis::RedisResult<Redis> {
    let response_timeout = Duration::from_millis(BLOCK_MS + app.config.redis.response_timeout_ms);
    let mut c = app.redis_client.own_connection(&app.config, response_timeout).await?;
    ensure_group(&mut c, app).await?;
    Ok(c)
}

/// Creates each cell's consumer group (and stream) unless it exists; Redis may have
/// restarted empty since the last time. A cell whose group cannot be made now (its node
/// away) is read as `NOGROUP` later and made then: one node away must not stop the writers
/// of every other cell, so this fails only when no cell answered.
async fn ensure_group(c: &mut Redis, app: &App) -> redis::RedisResult<()> {
    let made = each::<()>(
        c,
        app.keys.all_cells().map(|cell| {
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("CREATE")
                .arg(app.keys.outbox(cell))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM");
            cmd
        }),
    )
    .await;
    let mut failed = None;
    let mut answered = 0;
    for r in made {
        match r {
            Ok(()) => answered += 1,
            Err(e) if e.code() == Some("BUSYGROUP") => answered += 1,
            Err(e) => failed = Some(e),
        }
    }
    match failed {
        Some(e) if answered == 0 => Err(e),
        _ => Ok(()),
    }
}

/// Each command on its own, all at once (the connection pipelines those that share a
/// node), each with its own outcome: one cell's node away fails only that cell's command.
async fn each<T: redis::FromRedisValue>(
    c: &Redis,
    cmds: impl Iterator<Item = redis::Cmd>,
) -> Vec<redis::RedisResult<T>> {
    futures_util::future::join_all(cmds.map(|cmd| {
        let mut c = c.clone();
        async move { cmd.query_async::<T>(&mut c).await }
    }))
    .await
}

fn read_cmd(consumer: &str, streams: &[String], count: usize, block: bool) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(GROUP).arg(consumer).arg("COUNT").arg(count.max(1));
    if block {
        cmd.arg("BLOCK").arg(BLOCK_MS);
    }
    cmd.arg("STREAMS").arg(streams);
    for _ in streams {
        cmd.arg(">");
    }
    cmd
}

/// New entries of every cell's outbox, one batch over all cells (group commit spans
/// cells). Each cell's stream is read by its own command, pipelined, as a cluster needs
/// (one slot per command); only when all are empty and `block` does one read wait on
/// every stream at once, which a single Redis allows.
async fn read_new(c: &mut Redis, app: &App, consumer: &str, block: bool) -> redis::RedisResult<Vec<StreamId>> {
    let max = app.config.orders.ledger_batch_max;
    let streams: Vec<String> = app.keys.all_cells().map(|cell| app.keys.outbox(cell)).collect();
    let mut got = Vec::new();
    if streams.len() > 1 || !block {
        // A fair share each, so one busy cell cannot starve the others' orders.
        let share = max.div_ceil(streams.len());
        // Each cell's answer on its own: on a cluster one cell's primary failing over, or
        // losing its data, must not hold back the orders read from the others (read, they
        // are this writer's until committed, or claimed after `orders.claim_idle_ms`).
        let replies = each::<Option<StreamReadReply>>(
            c,
            streams
                .iter()
                .map(|s| read_cmd(consumer, std::slice::from_ref(s), share, false)),
        )
        .await;
        let (mut refused, mut error) = (0, None);
        for reply in replies {
            match reply {
                Ok(r) => got.extend(r.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids)),
                Err(e) => (refused, error) = (refused + 1, Some(e)),
            }
        }
        if let Some(e) = error {
            // No cell answered: the error stands and the writer reconnects.
            if refused == streams.len() {
                return regroup(c, app, e).await;
            }
            // The other cells' entries are committed meanwhile, and the next round reads
            // this one again (a failover shows in /readyz and in the answers' 503s); an
            // outbox gone (its node lost its data) is started again.
            if let Err(e) = regroup(c, app, e).await {
                tracing::debug!(error = %e, "a cell's outbox could not be read");
            }
            if got.is_empty() && block {
                // One blocking read over every stream would fail on that cell too.
                idle_wait(app).await;
                return Ok(got);
            }
        }
    }
    if got.is_empty() && block && streams.len() > 1 && matches!(c, Redis::Cluster(_)) {
        // A cluster refuses one read over streams of different slots, and a blocking read
        // per cell would hold this connection on one of them.
        idle_wait(app).await;
    } else if got.is_empty() && block {
        let reply: Result<Option<StreamReadReply>, _> = read_cmd(consumer, &streams, max, true).query_async(c).await;
        got = match reply {
            Ok(r) => r.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect(),
            Err(e) => return regroup(c, app, e).await,
        };
    }
    Ok(got)
}

/// Until this gateway's next order reaches an outbox, or a while for other gateways'.
async fn idle_wait(app: &App) {
    let _ = tokio::time::timeout(Duration::from_millis(CLUSTER_POLL_MS), app.waiters.next_reservation()).await;
}

/// An outbox deleted under a read (a rebuild) is started again; any other error stands.
async fn regroup(c: &mut Redis, app: &App, e: redis::RedisError) -> redis::RedisResult<Vec<StreamId>> {
    if e.code() == Some("NOGROUP") || e.code() == Some("UNBLOCKED") {
        ensure_group(c, app).await?;
        Ok(Vec::new())
    } else {
        Err(e)
    }
}

/// Takes over entries another writer read but did not acknowledge in time, cell by cell.
async fn claim(c: &mut Redis, app: &App, consumer: &str) -> redis::RedisResult<Vec<StreamId>> {
    let mut claimed = Vec::new();
    for cell in app.keys.all_cells() {
        let reply: Result<StreamAutoClaimReply, _> = redis::cmd("XAUTOCLAIM")
            .arg(app.keys.outbox(cell))
            .arg(GROUP)
            .arg(consumer)
            .arg(app.config.orders.claim_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(app.config.orders.ledger_batch_max)
            .query_async(c)
            .await;
        match reply {
            Ok(r) => claimed.extend(r.claimed),
            Err(e) => claimed.extend(regroup(c, app, e).await?),
        }
        if claimed.len() >= app.config.orders.ledger_batch_max {
            break;
        }
    }
    Ok(claimed)
}

async fn outbox_gauges(c: &mut Redis, app: &App) {
    let mut pipe = redis::pipe();
    for cell in app.keys.all_cells() {
        let key = app.keys.outbox(cell);
        pipe.cmd("XLEN")
            .arg(&key)
            .cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
    }
    let got: redis::RedisResult<Vec<redis::Value>> = pipe.query_async(c).await;
    let Ok(got) = got else { return };
    let (mut len, mut oldest_ms) = (0u64, None::<u64>);
    let mut got = got.into_iter();
    while let (Some(l), Some(first)) = (got.next(), got.next()) {
        len += redis::from_redis_value::<u64>(l).unwrap_or(0);
        let first: Vec<(String, redis::Value)> = redis::from_redis_value(first).unwrap_or_default();
        if let Some(ms) = first
            .first()
            .and_then(|(id, _)| id.split_once('-')?.0.parse::<u64>().ok())
        {
            oldest_ms = Some(oldest_ms.map_or(ms, |o| o.min(ms)));
        }
    }
    metrics::gauge!("cardgate_outbox_length").set(len as f64);
    let age = oldest_ms.map_or(0.0, |ms| {
        ((app.clock.now_unix_ms() as f64 - ms as f64) / 1000.0).max(0.0)
    });
    metrics::gauge!("cardgate_outbox_oldest_age_seconds").set(age);
}

/// Commits `entries` (retrying until Postgres takes them), then settles or releases each
/// in Redis and wakes its waiter.
async fn process(app: &App, c: &Redis, entries: &[Entry]) {
    if entries.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(50);
    let outcomes = loop {
        let t = Instant::now();
        match commit(app, entries).await {
            Ok(o) => {
                app.health.set_postgres_up(true);
                metrics::histogram!("cardgate_ledger_commit_seconds").record(t.elapsed().as_secs_f64());
                metrics::histogram!("cardgate_ledger_batch_size").record(entries.len() as f64);
                break o;
            }
            Err(e) => {
                // A pool whose connections are all busy is not a store that is down.
                if !crate::store::pg::is_pool_busy(&e) {
                    app.health.set_postgres_up(false);
                }
                metrics::counter!("cardgate_ledger_commit_failures_total").increment(1);
                tracing::warn!(
                    error = format!("{e:#}"),
                    orders = entries.len(),
                    "ledger commit failed; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    };
    finish(app, c, entries, &outcomes).await;
}

/// Redis's part goes over `c`, the writer's own connection: on the shared one it queued
/// behind every reservation in flight, and the writer's next batch waited with it. Only a
/// settle retried while its slot moves runs apart, on the shared connection, which
/// reconnects by itself over the retry's 30 s.
async fn finish(app: &App, c: &Redis, entries: &[Entry], outcomes: &[Settled]) {
    let mut elsewhere = String::new();
    let mut wake = |order_id: &str, s: Settled| {
        if !app.waiters.notify(order_id, s) {
            elsewhere.push_str(order_id);
            elsewhere.push(' ');
            elsewhere.push_str(s.as_str());
            elsewhere.push('\n');
        }
    };
    // The answer depends only on the commit: wake those first, acknowledge after.
    let committed: Vec<(&str, &Fulfilment)> = entries
        .iter()
        .zip(outcomes)
        .filter(|(_, s)| **s == Settled::Committed)
        .map(|(e, _)| (e.id.as_str(), &e.f))
        .collect();
    for (_, f) in &committed {
        wake(&f.order_id, Settled::Committed);
    }
    let mut redis = c.clone();
    match reserve::settle(&redis, &app.keys, &committed).await {
        Ok(()) => {}
        // A slot being migrated refuses the script until its last key has moved: tried again
        // meanwhile, apart, so the next batch does not wait (settling twice is harmless).
        Err(e) if crate::store::redis::slot_moving(&e) => {
            let (redis, keys) = (app.redis(), app.keys.clone());
            let owned: Vec<(String, Fulfilment)> =
                committed.iter().map(|(id, f)| (id.to_string(), (*f).clone())).collect();
            tokio::spawn(async move {
                let committed: Vec<(&str, &Fulfilment)> = owned.iter().map(|(id, f)| (id.as_str(), f)).collect();
                let mut moving = crate::store::redis::SlotMoving::new(SETTLE_PATIENCE);
                loop {
                    match reserve::settle(&redis, &keys, &committed).await {
                        Ok(()) => break,
                        Err(e) if moving.wait(&e).await => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "could not acknowledge committed orders; they will be claimed again");
                            break;
                        }
                    }
                }
            });
        }
        // Left pending: claimed again later, found committed, settled then.
        Err(e) => tracing::warn!(error = %e, "could not acknowledge committed orders; they will be claimed again"),
    }

    let undone: Vec<(&Entry, Settled)> = entries
        .iter()
        .zip(outcomes)
        .filter(|(_, s)| **s != Settled::Committed)
        .map(|(e, s)| (e, *s))
        .collect();
    if !undone.is_empty() {
        match sellable(app, undone.iter().map(|(e, _)| *e)).await {
            Ok(sellable) => {
                for (e, s) in undone {
                    let mut seen = HashSet::new();
                    let back: Vec<Vec<u8>> = e
                        .elements
                        .iter()
                        .filter(|el| {
                            crate::stock::parse_element(el)
                                .is_some_and(|(id, _)| sellable.contains(&id) && seen.insert(id))
                        })
                        .cloned()
                        .collect();
                    let dedupe = s == Settled::LastGuard;
                    match reserve::release(&mut redis, &app.keys, &e.id, e.epoch, &e.f, &back, dedupe).await {
                        Ok(_) => wake(&e.f.order_id, s),
                        Err(err) => {
                            tracing::warn!(error = %err, order_id = %e.f.order_id, "could not undo a reservation; it will be claimed again")
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "could not check codes to return; they will be claimed again"
            ),
        }
    }
    if !elsewhere.is_empty() {
        let published: redis::RedisResult<()> = redis::cmd("PUBLISH")
            .arg(super::channel(&app.config.redis_prefix))
            .arg(elsewhere)
            .query_async(&mut redis)
            .await;
        if let Err(e) = published {
            tracing::warn!(error = %e, "could not tell other gateways about settled orders; their requests time out and retry");
        }
    }
}

/// Of the codes these entries hold, the ones Postgres says may be sold again.
async fn sellable<'a>(app: &App, entries: impl Iterator<Item = &'a Entry>) -> anyhow::Result<HashSet<i64>> {
    let ids: Vec<i64> = entries.flat_map(|e| crate::stock::code_ids(&e.elements)).collect();
    let client = app.pg_orders.get().await?;
    let rows = client
        .query(
            "SELECT id FROM codes c WHERE id = ANY($1) AND status = 'available'
               AND NOT EXISTS (SELECT 1 FROM order_codes oc WHERE oc.code_id = c.id)",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The outcome of every entry, in order.
async fn commit(app: &App, entries: &[Entry]) -> anyhow::Result<Vec<Settled>> {
    let mut client = app.pg_orders.get().await?;
    let currency = app.config.currency.as_str();
    let all: Vec<usize> = (0..entries.len()).collect();
    // An order ledger_commit gives no answer for is undone rather than left hanging.
    let mut outcome = vec![Settled::Failed; entries.len()];
    match commit_once(&mut client, currency, entries, &all).await {
        Ok(done) => done.into_iter().for_each(|(i, s)| outcome[i] = s),
        // A constraint fired that ledger_commit's checks did not foresee: find the order
        // that trips it by committing one at a time.
        Err(e) if is_constraint(&e) => {
            for i in all {
                outcome[i] = match commit_once(&mut client, currency, entries, &[i]).await {
                    Ok(mut done) => done.pop().map_or(Settled::Failed, |(_, s)| s),
                    Err(e) if is_constraint(&e) => refused(&entries[i], &e),
                    Err(e) => return Err(e.into()),
                };
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(outcome)
}

fn is_constraint(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("23"))
}

fn refused(e: &Entry, err: &tokio_postgres::Error) -> Settled {
    let constraint = err.as_db_error().and_then(|d| d.constraint()).unwrap_or("");
    if err.code() == Some(&SqlState::UNIQUE_VIOLATION) && constraint == "delivered_code_unique" {
        last_guard(e, "delivered_code_unique refused a code");
        return Settled::LastGuard;
    }
    tracing::error!(order_id = %e.f.order_id, constraint, "Postgres refused an order; undoing its reservation");
    Settled::Failed
}

fn last_guard(e: &Entry, why: &str) {
    metrics::counter!("cardgate_last_guard_total").increment(1);
    // Code ids only: never the codes.
    let ids: Vec<i64> = crate::stock::code_ids(&e.elements).collect();
    tracing::error!(order_id = %e.f.order_id, code_ids = ?ids, why, "last guard: order not delivered with these codes");
}

/// One call of `ledger_commit` (migrations/V1__baseline.sql) for the entries at `which`:
/// one round trip and one transaction for the whole batch.
async fn commit_once(
    client: &mut deadpool_postgres::Client,
    currency: &str,
    entries: &[Entry],
    which: &[usize],
) -> Result<Vec<(usize, Settled)>, tokio_postgres::Error> {
    let mut done = Vec::new();
    let mut sent: Vec<usize> = Vec::with_capacity(which.len());
    let (mut code_orders, mut code_ids, mut positions) = (vec![], vec![], vec![]);
    for &i in which {
        let e = &entries[i];
        let ids: Option<Vec<i64>> = e
            .elements
            .iter()
            .map(|el| crate::stock::parse_element(el).map(|(id, _)| id))
            .collect();
        match ids {
            Some(ids) if ids.len() == e.f.quantity as usize => {
                sent.push(i);
                for (pos, id) in ids.into_iter().enumerate() {
                    code_orders.push(sent.len() as i32);
                    code_ids.push(id);
                    positions.push(pos as i16 + 1);
                }
            }
            _ => {
                last_guard(e, "malformed stock element or wrong number of codes");
                done.push((i, Settled::LastGuard));
            }
        }
    }
    if sent.is_empty() {
        return Ok(done);
    }
    let fs: Vec<&Fulfilment> = sent.iter().map(|&i| &entries[i].f).collect();
    let col = |g: fn(&Fulfilment) -> i64| fs.iter().map(|f| g(f)).collect::<Vec<i64>>();
    let order_ids: Vec<&str> = fs.iter().map(|f| f.order_id.as_str()).collect();
    let mons: Vec<&str> = fs.iter().map(|f| f.merchant_order_no.as_str()).collect();
    let skus: Vec<&str> = fs.iter().map(|f| f.sku.as_str()).collect();
    let quantities: Vec<i32> = fs.iter().map(|f| f.quantity).collect();
    let created: Vec<time::OffsetDateTime> = fs
        .iter()
        .map(|f| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(f.created_unix_ms()) * 1_000_000)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        })
        .collect();
    let stmt = client
        .prepare_cached(
            "SELECT idx, outcome FROM ledger_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .await?;
    let epochs: Vec<i64> = sent.iter().map(|&i| entries[i].epoch).collect();
    // Entries written before keys were recorded carry none.
    let key_ids: Vec<Option<&str>> = fs
        .iter()
        .map(|f| Some(f.key_id.as_str()).filter(|k| !k.is_empty()))
        .collect();
    let rows = client
        .query(
            &stmt,
            &[
                &epochs,
                &order_ids,
                &col(|f| f.reseller),
                &mons,
                &col(|f| f.product),
                &skus,
                &quantities,
                &col(|f| f.unit_price),
                &col(|f| f.amount),
                &created,
                &currency,
                &code_orders,
                &code_ids,
                &positions,
                &key_ids,
            ],
        )
        .await?;
    for r in rows {
        let Some(&i) = usize::try_from(r.get::<_, i32>(0) - 1).ok().and_then(|k| sent.get(k)) else {
            continue;
        };
        let s = match r.get::<_, &str>(1) {
            "committed" => Settled::Committed,
            "duplicate" => Settled::Duplicate,
            "stale" => Settled::Stale,
            _ => {
                last_guard(&entries[i], "a code is not deliverable in Postgres");
                Settled::LastGuard
            }
        };
        done.push((i, s));
    }
    Ok(done)
}
