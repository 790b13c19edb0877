//! Risk control (docs/api.md §7, "Risk rules"): what the rules saw, and holds.
//!
//! The order-path rules (`new_address`, `velocity`) are evaluated by the reservation
//! script in the same step as the order (`reserve/reserve.lua`), which answers the
//! rules that fired, places a hold when one of them holds, and refuses the orders of a
//! held reseller (`risk_hold`). Everything else happens off the answer's path: the order
//! path and signature checks only queue what they saw ([`order_fired`],
//! [`Queue::signal`]), and a background task ([`run`], or [`step`] in tests) records the
//! events in Postgres, counts them, and records holds. Flags go into a bounded queue that
//! drops what overflows; a hold into one of its own, which flags cannot fill.
//! `refund_rate` is judged after each refund, an operator's action, on the operator's path
//! ([`after_refund`]).
//!
//! Postgres keeps every hold (`resellers.risk_hold_at`), audited and called back
//! (`account.held`), and mirrors it into the reseller's risk hash in Redis for the
//! script (a `refund_rate` hold is placed there this way); a Redis rebuild restores it
//! from Postgres. No rule driven by requests that do not verify can hold:
//! `failed_signatures` only flags (config refuses `hold`).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::LazyLock;

use deadpool_postgres::GenericClient;
use redis::Script;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};

use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::config::RiskAction;
use crate::error::ApiError;
use crate::http::query::{page, rfc3339, Page};

/// Signals waiting for the background task; past this they are dropped and counted
/// (a flood of bad signatures must not grow memory).
const QUEUE_MAX: usize = 4096;
/// The refund-rate rule looks at this many of the reseller's latest orders.
const REFUND_RATE_ORDERS: i64 = 100;

/// Something a rule saw that needs recording.
#[derive(Debug)]
pub enum Signal {
    /// Rules the reservation script says an order fired (`a`: new address, `v`: velocity).
    Order {
        reseller_pk: i64,
        key_id: String,
        address: IpAddr,
        fired: String,
    },
    /// A signature that did not verify, for an existing key.
    BadSignature { reseller_pk: i64, key_id: String },
}

pub struct Queue {
    tx: mpsc::Sender<Signal>,
    /// Orders whose rules held their reseller: not dropped when the flags' queue is full,
    /// and few (the script refuses a held reseller's next orders until a release).
    holds: mpsc::UnboundedSender<Signal>,
    rx: Mutex<(mpsc::Receiver<Signal>, mpsc::UnboundedReceiver<Signal>)>,
}

impl Default for Queue {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        let (holds, holds_rx) = mpsc::unbounded_channel();
        Queue {
            tx,
            holds,
            rx: Mutex::new((rx, holds_rx)),
        }
    }
}

impl Queue {
    /// Never waits: a full queue drops the signal.
    pub fn signal(&self, s: Signal) {
        if self.tx.try_send(s).is_err() {
            metrics::counter!("cardgate_risk_signals_dropped_total").increment(1);
        }
    }
}

/// The order-path rules whose action is hold, as `reserve.lua` names them.
pub fn order_holds(r: &crate::config::RiskConfig) -> &'static str {
    match (r.new_address == RiskAction::Hold, r.velocity == RiskAction::Hold) {
        (true, true) => "av",
        (true, false) => "a",
        (false, true) => "v",
        (false, false) => "",
    }
}

/// The rules an order fired, for the background task. One that holds, which the
/// reservation script has placed in Redis already, goes where a flood of flags cannot
/// crowd it out: the hold must reach Postgres (the operator's view of the reseller, the
/// event, the callback), and off the order's path, which must not wait on the operator's
/// pool.
pub fn order_fired(app: &App, s: Signal) {
    match &s {
        Signal::Order { fired, .. } if fired.is_empty() => {}
        Signal::Order { fired, .. } if fired.chars().any(|c| order_holds(&app.config.risk).contains(c)) => {
            // The receiver lives as long as the gateway.
            let _ = app.risk.holds.send(s);
        }
        _ => app.risk.signal(s),
    }
}

pub async fn run(app: Arc<App>) {
    loop {
        let next = {
            let mut rx = app.risk.rx.lock().await;
            let (signals, holds) = &mut *rx;
            tokio::select! {
                Some(s) = holds.recv() => s,
                Some(s) = signals.recv() => s,
                else => return,
            }
        };
        if let Err(e) = handle(&app, next).await {
            // A hold not recorded stays in Redis alone: the reseller is refused, and a
            // release (or a rebuild, from Postgres) clears it.
            tracing::error!(error = format!("{e:#}"), "risk signal not recorded");
        }
    }
}

/// Handles every signal queued so far, holds first; answers how many.
pub async fn step(app: &App) -> anyhow::Result<usize> {
    let mut n = 0;
    loop {
        let next = {
            let mut rx = app.risk.rx.lock().await;
            let (signals, holds) = &mut *rx;
            holds.try_recv().or_else(|_| signals.try_recv())
        };
        let Ok(s) = next else { return Ok(n) };
        handle(app, s).await?;
        n += 1;
    }
}

async fn handle(app: &App, s: Signal) -> anyhow::Result<()> {
    let r = &app.config.risk;
    match s {
        Signal::Order {
            reseller_pk,
            key_id,
            address,
            fired,
        } => {
            for c in fired.chars() {
                let (rule, action, details) = match c {
                    'a' => (
                        "new_address",
                        r.new_address,
                        json!({"address": address.to_string(), "key_id": key_id}),
                    ),
                    'v' => (
                        "velocity",
                        r.velocity,
                        json!({"key_id": key_id, "factor": r.velocity_factor,
                               "min_per_minute": r.velocity_min_per_minute}),
                    ),
                    _ => continue,
                };
                if action != RiskAction::Off {
                    record(app, reseller_pk, rule, action, details).await?;
                }
            }
        }
        Signal::BadSignature { reseller_pk, key_id } => {
            if r.failed_signatures == RiskAction::Off {
                return Ok(());
            }
            let minute = app.clock.now_unix_secs().div_euclid(60);
            let key = app.keys.signature_failures(&key_id, minute);
            let (n,): (u64,) = redis::pipe()
                .atomic()
                .cmd("INCR")
                .arg(&key)
                .cmd("EXPIRE")
                .arg(&key)
                .arg(120)
                .ignore()
                .query_async(&mut app.redis())
                .await?;
            // Once a minute per key, on the failure that passes the limit.
            if n == u64::from(r.failed_signatures_per_minute) + 1 {
                let details = json!({"key_id": key_id, "per_minute": r.failed_signatures_per_minute});
                record(app, reseller_pk, "failed_signatures", RiskAction::Flag, details).await?;
            }
        }
    }
    Ok(())
}

/// Records a risk event and, for `hold`, holds the reseller.
async fn record(app: &App, reseller_pk: i64, rule: &str, action: RiskAction, details: Value) -> anyhow::Result<()> {
    app.pg
        .get()
        .await?
        .execute(
            "INSERT INTO risk_events (reseller_id, rule, action, details) VALUES ($1, $2, $3, $4)",
            &[&reseller_pk, &rule, &action.as_str(), &details],
        )
        .await?;
    metrics::counter!("cardgate_risk_events_total", "rule" => rule.to_string(), "action" => action.as_str())
        .increment(1);
    tracing::info!(reseller_pk, rule, action = action.as_str(), "risk rule fired");
    if action == RiskAction::Hold {
        hold(app, reseller_pk, rule, details).await?;
    }
    Ok(())
}

/// Sets or clears `hold` in a reseller's risk hash if Redis is still at epoch ARGV[2]
/// (KEYS[2]); after a rebuild Redis has Postgres's word already.
static MIRROR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
if ARGV[1] == '1' then return redis.call('HSET', KEYS[1], 'hold', '1') end
return redis.call('HDEL', KEYS[1], 'hold')",
    )
});

async fn mirror(app: &App, reseller_pk: i64, held: bool, epoch: i64) {
    let r: redis::RedisResult<i64> = MIRROR
        .key(app.keys.risk(reseller_pk))
        .key(app.keys.epoch(app.keys.cell_of(reseller_pk)))
        .arg(if held { "1" } else { "0" })
        .arg(epoch)
        .invoke_async(&mut app.redis())
        .await;
    if let Err(e) = r {
        // Postgres has it; the next rebuild, or the next change, puts it in Redis.
        tracing::error!(error = %e, reseller_pk, held, "risk hold not mirrored to Redis");
    }
}

/// Holds a reseller's orders (once: a held reseller stays held as it was).
async fn hold(app: &App, reseller_pk: i64, rule: &str, details: Value) -> anyhow::Result<()> {
    let mut client = app.pg.get().await?;
    let reseller_id: String = client
        .query_one("SELECT reseller_id FROM resellers WHERE id = $1", &[&reseller_pk])
        .await?
        .get(0);
    let tx = Audited::begin(&mut client, &Actor::system(), "reseller.risk_hold", &reseller_id).await?;
    let epoch = crate::rebuild::fence(&*tx).await?;
    let held = tx
        .execute(
            "UPDATE resellers SET risk_hold_at = now(), risk_hold_rule = $2 WHERE id = $1 AND risk_hold_at IS NULL",
            &[&reseller_pk, &rule],
        )
        .await?;
    if held == 0 {
        tx.rollback().await?;
        return Ok(());
    }
    account_event(
        &*tx,
        reseller_pk,
        "account.held",
        json!({"rule": rule, "details": details}),
    )
    .await?;
    tx.commit(json!({"rule": rule})).await?;
    mirror(app, reseller_pk, true, epoch).await;
    tracing::warn!(reseller_id, rule, "reseller's orders held by risk control");
    Ok(())
}

/// `POST /admin/v1/resellers/{id}/risk/release`: ends a hold, if there is one; answers
/// the rule that had held it.
pub async fn release(app: &App, actor: &Actor, reseller_id: &str) -> Result<Option<String>, ApiError> {
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "reseller.risk_release", reseller_id).await?;
    let epoch = crate::rebuild::fence(&*tx).await?;
    let row = tx
        .query_opt(
            "SELECT id, risk_hold_rule FROM resellers WHERE reseller_id = $1 FOR UPDATE",
            &[&reseller_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("no such reseller"))?;
    let (pk, rule): (i64, Option<String>) = (row.get(0), row.get(1));
    let Some(rule) = rule else {
        tx.rollback().await?;
        // Redis may still hold what a lost write left: clear it all the same.
        mirror(app, pk, false, epoch).await;
        return Ok(None);
    };
    tx.execute(
        "UPDATE resellers SET risk_hold_at = NULL, risk_hold_rule = NULL WHERE id = $1",
        &[&pk],
    )
    .await?;
    account_event(&*tx, pk, "account.released", json!({"rule": rule})).await?;
    tx.commit(json!({"rule": rule})).await?;
    mirror(app, pk, false, epoch).await;
    Ok(Some(rule))
}

async fn account_event<C: GenericClient>(c: &C, reseller_pk: i64, kind: &str, data: Value) -> Result<(), ApiError> {
    c.execute(
        "INSERT INTO events (reseller_id, type, data)
         SELECT id, $2, $3 FROM resellers WHERE id = $1 AND callback_url IS NOT NULL",
        &[&reseller_pk, &kind, &data],
    )
    .await?;
    Ok(())
}

/// `refund_rate`: after a refund, the share of refunded orders among the reseller's
/// latest `REFUND_RATE_ORDERS`. Fires when a refund takes it over the limit.
pub async fn after_refund(app: &App, reseller_pk: i64) -> anyhow::Result<()> {
    let r = &app.config.risk;
    if r.refund_rate == RiskAction::Off {
        return Ok(());
    }
    let row = app
        .pg
        .get()
        .await?
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE status = 'refunded')
               FROM (SELECT status FROM orders WHERE reseller_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2) o",
            &[&reseller_pk, &REFUND_RATE_ORDERS],
        )
        .await?;
    let (orders, refunded): (i64, i64) = (row.get(0), row.get(1));
    let rate = if orders > 0 {
        refunded as f64 / orders as f64
    } else {
        0.0
    };
    // Only the refund that crosses the limit fires, not every one above it.
    let before = if orders > 0 {
        (refunded - 1) as f64 / orders as f64
    } else {
        0.0
    };
    if rate > r.refund_rate_max && before <= r.refund_rate_max {
        let details = json!({"orders": orders, "refunded": refunded, "rate": rate, "max": r.refund_rate_max});
        record(app, reseller_pk, "refund_rate", r.refund_rate, details).await?;
    }
    Ok(())
}

/// `GET /admin/v1/risk/events`: newest first.
pub struct Search<'a> {
    pub reseller_id: Option<&'a str>,
    pub rule: Option<&'a str>,
    pub window: crate::http::query::Window,
}

pub async fn events(app: &App, s: &Search<'_>) -> Result<Page, ApiError> {
    let w = &s.window;
    let client = app.pg.get().await?;
    let mut rows = client
        .query(
            "SELECT e.id, e.event_id, r.reseller_id, e.rule, e.action, e.details, e.created_at
               FROM risk_events e JOIN resellers r ON r.id = e.reseller_id
              WHERE ($1::text IS NULL OR r.reseller_id = $1) AND ($2::text IS NULL OR e.rule = $2)
                AND ($3::timestamptz IS NULL OR e.created_at >= $3) AND ($4::timestamptz IS NULL OR e.created_at < $4)
                AND ($5::bigint IS NULL OR e.id < $5)
              ORDER BY e.id DESC LIMIT $6",
            &[&s.reseller_id, &s.rule, &w.from, &w.to, &w.cursor, &(w.limit + 1)],
        )
        .await?;
    let more = page(&mut rows, w.limit);
    Ok(Page::of(&rows, more, 0, |r| {
        json!({"id": r.get::<_, &str>(1), "reseller_id": r.get::<_, &str>(2), "rule": r.get::<_, &str>(3),
               "action": r.get::<_, &str>(4), "details": r.get::<_, Value>(5), "created_at": rfc3339(r.get(6))})
    }))
}
