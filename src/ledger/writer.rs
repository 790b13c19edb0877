//! The ledger writer: reads reserved fulfilments from the outbox through the consumer
//! group, commits many of them per Postgres transaction, and only then acknowledges them
//! in Redis and wakes the requests waiting on them (group commit).
//!
//! Every gateway runs one; the group shares the outbox out between them. Entries another
//! writer read but never acknowledged (its gateway died) are claimed after
//! `orders.claim_idle_ms`. Committing is idempotent (the order id is unique), so an entry
//! committed twice is recorded once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::AsyncConnectionConfig;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;

use super::Settled;
use crate::app::App;
use crate::reserve::{self, Fulfilment, GROUP};

/// How long one read waits for new entries; also bounds how late a stop is noticed.
const BLOCK_MS: u64 = 500;
const CLAIM_EVERY: Duration = Duration::from_secs(5);
const GAUGES_EVERY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// One outbox entry, decoded.
pub struct Entry {
    pub id: String,
    pub f: Fulfilment,
    pub elements: Vec<Vec<u8>>,
}

fn decode(s: &StreamId) -> Option<Entry> {
    let o: Vec<u8> = s.get("o")?;
    let c: Vec<u8> = s.get("c")?;
    Some(Entry {
        id: s.id.clone(),
        f: serde_json::from_slice(&o).ok()?,
        elements: reserve::unpack(&c)?,
    })
}

/// Runs until `stop` turns true and the outbox has nothing more for this writer.
pub async fn run(app: Arc<App>, stop: watch::Receiver<bool>) {
    let consumer = crate::ids::random("writer_", 12);
    let mut conn: Option<MultiplexedConnection> = None;
    let mut next_claim = Instant::now();
    let mut next_gauges = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        let stopping = *stop.borrow();
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(&app).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::warn!(error = %e, "ledger writer cannot reach Redis; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                    continue;
                }
            },
        };
        let claiming = Instant::now() >= next_claim;
        let read = if claiming {
            next_claim = Instant::now() + CLAIM_EVERY;
            claim(c, &app, &consumer).await
        } else {
            read_new(c, &app, &consumer, !stopping).await
        };
        let ids = match read {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "ledger writer lost its outbox reader; reconnecting");
                conn = None;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
                continue;
            }
        };
        delay = Duration::from_millis(50);
        if Instant::now() >= next_gauges {
            next_gauges = Instant::now() + GAUGES_EVERY;
            outbox_gauges(c, &app).await;
        }
        if ids.is_empty() {
            if stopping && !claiming {
                return;
            }
            continue;
        }
        let entries: Vec<Entry> = ids
            .iter()
            .filter_map(|s| {
                let e = decode(s);
                if e.is_none() {
                    // Left pending (never acknowledged): reconciliation reports it.
                    tracing::error!(entry = %s.id, "malformed outbox entry left in place");
                    metrics::counter!("cardgate_outbox_malformed_total").increment(1);
                }
                e
            })
            .collect();
        process(&app, &entries).await;
    }
}

async fn connect(app: &App) -> redis::RedisResult<MultiplexedConnection> {
    let timeouts = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(app.config.redis.connect_timeout_ms)))
        .set_response_timeout(Some(
            Duration::from_millis(BLOCK_MS + app.config.redis.response_timeout_ms),
        ));
    let mut c = app
        .redis_client
        .get_multiplexed_async_connection_with_config(&timeouts)
        .await?;
    ensure_group(&mut c, app).await?;
    Ok(c)
}

/// Creates the consumer group (and the stream) unless it exists; Redis may have
/// restarted empty since the last time.
pub async fn ensure_group(c: &mut MultiplexedConnection, app: &App) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(app.keys.outbox())
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(c)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

async fn read_new(
    c: &mut MultiplexedConnection,
    app: &App,
    consumer: &str,
    block: bool,
) -> redis::RedisResult<Vec<StreamId>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(app.config.orders.ledger_batch_max);
    if block {
        cmd.arg("BLOCK").arg(BLOCK_MS);
    }
    cmd.arg("STREAMS").arg(app.keys.outbox()).arg(">");
    let reply: Result<Option<StreamReadReply>, _> = cmd.query_async(c).await;
    match reply {
        Ok(r) => Ok(r.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect()),
        Err(e) if e.code() == Some("NOGROUP") => {
            ensure_group(c, app).await?;
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

/// Takes over entries another writer read but did not acknowledge in time.
async fn claim(c: &mut MultiplexedConnection, app: &App, consumer: &str) -> redis::RedisResult<Vec<StreamId>> {
    let reply: Result<StreamAutoClaimReply, _> = redis::cmd("XAUTOCLAIM")
        .arg(app.keys.outbox())
        .arg(GROUP)
        .arg(consumer)
        .arg(app.config.orders.claim_idle_ms)
        .arg("0-0")
        .arg("COUNT")
        .arg(app.config.orders.ledger_batch_max)
        .query_async(c)
        .await;
    match reply {
        Ok(r) => Ok(r.claimed),
        Err(e) if e.code() == Some("NOGROUP") => {
            ensure_group(c, app).await?;
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

async fn outbox_gauges(c: &mut MultiplexedConnection, app: &App) {
    let key = app.keys.outbox();
    let got: redis::RedisResult<(u64, Vec<(String, redis::Value)>)> = redis::pipe()
        .cmd("XLEN")
        .arg(&key)
        .cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(c)
        .await;
    if let Ok((len, oldest)) = got {
        metrics::gauge!("cardgate_outbox_length").set(len as f64);
        let age = oldest
            .first()
            .and_then(|(id, _)| id.split_once('-')?.0.parse::<u64>().ok())
            .map_or(0.0, |ms| (crate::auth::admin::unix_now() as f64 - ms as f64 / 1000.0).max(0.0));
        metrics::gauge!("cardgate_outbox_oldest_age_seconds").set(age);
    }
}

/// Commits `entries` (retrying until Postgres takes them), then settles or releases each
/// in Redis and wakes its waiter.
async fn process(app: &App, entries: &[Entry]) {
    if entries.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(50);
    let outcomes = loop {
        let t = Instant::now();
        match commit(app, entries).await {
            Ok(o) => {
                metrics::histogram!("cardgate_ledger_commit_seconds").record(t.elapsed().as_secs_f64());
                metrics::histogram!("cardgate_ledger_batch_size").record(entries.len() as f64);
                break o;
            }
            Err(e) => {
                metrics::counter!("cardgate_ledger_commit_failures_total").increment(1);
                tracing::warn!(error = format!("{e:#}"), orders = entries.len(), "ledger commit failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    };
    finish(app, entries, &outcomes).await;
}

async fn finish(app: &App, entries: &[Entry], outcomes: &[Settled]) {
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
    let mut redis = app.redis();
    if let Err(e) = reserve::settle(&mut redis, &app.keys, &committed).await {
        // Left pending: claimed again later, found committed, settled then.
        tracing::warn!(error = %e, "could not acknowledge committed orders; they will be claimed again");
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
                    match reserve::release(&mut redis, &app.keys, &e.id, &e.f, &back, dedupe).await {
                        Ok(_) => wake(&e.f.order_id, s),
                        Err(err) => tracing::warn!(error = %err, order_id = %e.f.order_id, "could not undo a reservation; it will be claimed again"),
                    }
                }
            }
            Err(err) => tracing::warn!(error = format!("{err:#}"), "could not check codes to return; they will be claimed again"),
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
    let ids: Vec<i64> = entries
        .flat_map(|e| e.elements.iter())
        .filter_map(|el| crate::stock::parse_element(el).map(|(id, _)| id))
        .collect();
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT id FROM codes c WHERE id = ANY($1) AND status = 'available'
               AND NOT EXISTS (SELECT 1 FROM order_codes oc WHERE oc.code_id = c.id)",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

enum Once {
    /// Committed; the outcome of every order that was tried.
    Done(Vec<(usize, Settled)>),
    /// Nothing committed: these orders hold codes Postgres will not deliver.
    Guard(Vec<usize>),
}

/// The outcome of every entry, in order.
pub async fn commit(app: &App, entries: &[Entry]) -> anyhow::Result<Vec<Settled>> {
    let mut client = app.pg.get().await?;
    let currency = app.config.currency.as_str();
    let mut outcome: Vec<Option<Settled>> = vec![None; entries.len()];
    loop {
        let pending: Vec<usize> = (0..entries.len()).filter(|i| outcome[*i].is_none()).collect();
        if pending.is_empty() {
            break;
        }
        match commit_once(&mut client, currency, entries, &pending).await {
            Ok(Once::Done(done)) => done.into_iter().for_each(|(i, s)| outcome[i] = Some(s)),
            Ok(Once::Guard(bad)) => {
                for i in bad {
                    last_guard(&entries[i], "a code is not available in Postgres");
                    outcome[i] = Some(Settled::LastGuard);
                }
            }
            // A constraint fired that the checks above did not foresee: find the order
            // that trips it by committing one at a time.
            Err(e) if is_constraint(&e) => {
                for i in pending {
                    outcome[i] = Some(match commit_once(&mut client, currency, entries, &[i]).await {
                        Ok(Once::Done(mut done)) => done.pop().map_or(Settled::Failed, |(_, s)| s),
                        Ok(Once::Guard(_)) => {
                            last_guard(&entries[i], "a code is not available in Postgres");
                            Settled::LastGuard
                        }
                        Err(e) if is_constraint(&e) => refused(&entries[i], &e),
                        Err(e) => return Err(e.into()),
                    });
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(outcome.into_iter().map(|s| s.unwrap_or(Settled::Failed)).collect())
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
    let ids: Vec<i64> = e
        .elements
        .iter()
        .filter_map(|el| crate::stock::parse_element(el).map(|(id, _)| id))
        .collect();
    tracing::error!(order_id = %e.f.order_id, code_ids = ?ids, why, "last guard: order not delivered with these codes");
}

async fn commit_once(
    client: &mut deadpool_postgres::Client,
    currency: &str,
    entries: &[Entry],
    which: &[usize],
) -> Result<Once, tokio_postgres::Error> {
    // One reseller's balance row is locked by all its orders in the batch; taking the
    // rows in one order keeps concurrent writers from deadlocking.
    let mut which = which.to_vec();
    which.sort_by_key(|&i| (entries[i].f.reseller, i));
    let fs: Vec<&Fulfilment> = which.iter().map(|&i| &entries[i].f).collect();
    let tx = client.transaction().await?;

    let col = |g: fn(&Fulfilment) -> i64| fs.iter().map(|f| g(f)).collect::<Vec<i64>>();
    let order_ids: Vec<&str> = fs.iter().map(|f| f.order_id.as_str()).collect();
    let mons: Vec<&str> = fs.iter().map(|f| f.merchant_order_no.as_str()).collect();
    let skus: Vec<&str> = fs.iter().map(|f| f.sku.as_str()).collect();
    let quantities: Vec<i32> = fs.iter().map(|f| f.quantity).collect();
    let created: Vec<time::OffsetDateTime> = fs
        .iter()
        .map(|f| time::OffsetDateTime::from_unix_timestamp(f.created_at).unwrap_or(time::OffsetDateTime::UNIX_EPOCH))
        .collect();
    let rows = tx
        .query(
            "INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
             SELECT o, r, m, p, s, q, u, a, $9, t
               FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::int4[], $7::int8[], $8::int8[], $10::timestamptz[])
                    AS x(o, r, m, p, s, q, u, a, t)
             ON CONFLICT DO NOTHING
             RETURNING order_id, id",
            &[
                &order_ids,
                &col(|f| f.reseller),
                &mons,
                &col(|f| f.product),
                &skus,
                &quantities,
                &col(|f| f.unit_price),
                &col(|f| f.amount),
                &currency,
                &created,
            ],
        )
        .await?;
    let inserted: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();

    let mut done = Vec::new();
    let not_inserted: Vec<&str> = order_ids.iter().copied().filter(|o| !inserted.contains_key(*o)).collect();
    if !not_inserted.is_empty() {
        // Committed before (an entry read twice), or another order holds this
        // merchant_order_no (Redis had lost the record).
        let existing: HashSet<String> = tx
            .query("SELECT order_id FROM orders WHERE order_id = ANY($1)", &[&not_inserted])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for &i in &which {
            let id = &entries[i].f.order_id;
            if !inserted.contains_key(id) {
                let s = if existing.contains(id) { Settled::Committed } else { Settled::Duplicate };
                done.push((i, s));
            }
        }
    }
    let fresh: Vec<usize> = which
        .iter()
        .copied()
        .filter(|&i| inserted.contains_key(&entries[i].f.order_id))
        .collect();
    if fresh.is_empty() {
        tx.commit().await?;
        return Ok(Once::Done(done));
    }

    let (mut order_pks, mut code_ids, mut code_products, mut positions) = (vec![], vec![], vec![], vec![]);
    let mut bad = Vec::new();
    for &i in &fresh {
        let e = &entries[i];
        for (pos, el) in e.elements.iter().enumerate() {
            match crate::stock::parse_element(el) {
                Some((id, _)) => {
                    order_pks.push(inserted[&e.f.order_id]);
                    code_ids.push(id);
                    code_products.push(e.f.product);
                    positions.push(pos as i16 + 1);
                }
                None => bad.push(i),
            }
        }
        if e.elements.len() != e.f.quantity as usize {
            bad.push(i);
        }
    }
    let delivered: HashSet<i64> = tx
        .query(
            "UPDATE codes c SET status = 'delivered'
               FROM unnest($1::int8[], $2::int8[]) AS x(id, product_id)
              WHERE c.id = x.id AND c.product_id = x.product_id AND c.status = 'available'
             RETURNING c.id",
            &[&code_ids, &code_products],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut claimed = HashSet::new();
    for &i in &fresh {
        let ok = entries[i].elements.iter().all(|el| {
            crate::stock::parse_element(el).is_some_and(|(id, _)| delivered.contains(&id) && claimed.insert(id))
        });
        if !ok {
            bad.push(i);
        }
    }
    if !bad.is_empty() {
        bad.sort_unstable();
        bad.dedup();
        // Dropping the transaction rolls it back; the caller retries without these.
        return Ok(Once::Guard(bad));
    }
    tx.execute(
        "INSERT INTO order_codes (order_id, code_id, position) SELECT * FROM unnest($1::int8[], $2::int8[], $3::int2[])",
        &[&order_pks, &code_ids, &positions],
    )
    .await?;
    let charged: Vec<&Fulfilment> = fresh.iter().map(|&i| &entries[i].f).filter(|f| f.amount != 0).collect();
    let resellers: Vec<i64> = charged.iter().map(|f| f.reseller).collect();
    let debits: Vec<i64> = charged.iter().map(|f| -f.amount).collect();
    let references: Vec<&str> = charged.iter().map(|f| f.order_id.as_str()).collect();
    tx.execute(
        "INSERT INTO balance_ledger (reseller_id, amount, kind, reference)
         SELECT r, a, 'order', o FROM unnest($1::int8[], $2::int8[], $3::text[]) AS x(r, a, o)",
        &[&resellers, &debits, &references],
    )
    .await?;
    tx.commit().await?;
    done.extend(fresh.into_iter().map(|i| (i, Settled::Committed)));
    Ok(Once::Done(done))
}
