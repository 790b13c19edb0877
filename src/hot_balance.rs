//! Hot-balance movements that Postgres decides, applied to Redis exactly once.
//!
//! The hot balance (Redis) is the Postgres balance less the orders in flight. An operator
//! credit or a refund is written to the ledger first and only then made spendable; a
//! debit is held in the hot balance first (in-flight orders may already have the money)
//! and given back if its ledger row is not written. Redis can fail between the two
//! steps, so each movement is recorded in `hot_balance_pending`
//! (migrations/V1__baseline.sql) where Postgres decides it, and applied by a script that checks a marker (applied once) and
//! the epoch (a rebuild since then read Postgres's figure, which has it already). The
//! request applies its own at once; a replay of it, and [`settle_due`] every second,
//! retry whatever is left. docs/invariants.md invariant 11: once per movement.
//!
//! Movements come from `balance::adjust` (operator credits and debits, reached from
//! `api/admin/resellers.rs` `adjust_balance`), `orders::refund` and `rebates::close`.
//!
//! A credit:  ledger row + `credit` row in one transaction -> commit -> [`settle`].
//! A debit:   [`record_hold`] (committed on its own) -> transaction: [`lock_hold`],
//!            [`take_hold`] in Redis, ledger row, [`keep_hold`] deletes the record -> commit. If the
//!            transaction fails: [`release`] marks the record and [`settle`] gives the
//!            money back. If the gateway dies in between, the record is abandoned and
//!            [`settle_due`] gives it back once it is older than any request can take.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use deadpool_postgres::GenericClient;
use redis::Script;

use crate::app::App;
use crate::error::ApiError;

/// A hold row older than this belongs to a request that has died: every step of a
/// request (statement timeout, Redis timeout, commit) ends well within it.
const HOLD_ABANDONED_AFTER_SECS: i64 = 60;
/// How long Redis remembers that a movement was applied. A pending row is retried every
/// second, so it outlives any retry but that of a Postgres down for a week.
const MARKER_TTL_SECS: u64 = 7 * 24 * 3600;
/// Rows settled per background step.
const SETTLE_BATCH_ROWS_MAX: i64 = 256;
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// Adds ARGV[1] once (marker KEYS[3]) if Redis is at epoch ARGV[2] (KEYS[2]) and the
/// hot balance KEYS[1] exists: 1 applied, 0 applied before, -1 nothing to do (a rebuild
/// since read Postgres's figure, which has it; or no hot balance yet, likewise).
static CREDIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[2] or redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[3])
return 1",
    )
});

/// Takes ARGV[1] from the hot balance if it holds that much with the credit line ARGV[4]
/// (the balance may go down to minus it), marking the hold (KEYS[3])
/// so that giving it back happens at most once: 1 taken, 0 too little, -1 no hot balance
/// or not at epoch ARGV[2] (Postgres alone decides; the rebuild that follows reads it),
/// -2 marked already by another hold of the same reference (nothing taken).
static HOLD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
if redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
local b = redis.call('GET', KEYS[1])
if not b then return -1 end
if tonumber(b) + tonumber(ARGV[4]) < tonumber(ARGV[1]) then return 0 end
redis.call('DECRBY', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[3])
return 1",
    )
});

/// Gives a hold back if it was taken and not given back yet (its marker KEYS[3]), at
/// epoch ARGV[2]: 1 given back, 0 nothing held, -1 rebuilt since (the hold is gone).
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
if redis.call('DEL', KEYS[3]) == 0 then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
return 1",
    )
});

pub fn credit_id(ledger_id: i64) -> String {
    format!("ledger:{ledger_id}")
}

pub fn hold_id(reseller_pk: i64, reference: &str) -> String {
    format!("hold:{reseller_pk}:{reference}")
}

/// Records, in the transaction that writes ledger row `ledger_id`, that its credit is to
/// reach the hot balance; [`settle`] after the commit applies it.
pub async fn record_credit(
    tx: &impl GenericClient,
    reseller_pk: i64,
    ledger_id: i64,
    amount: i64,
    epoch: i64,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO hot_balance_pending (movement, reseller_id, amount, kind, epoch) VALUES ($1, $2, $3, 'credit', $4)",
        &[&credit_id(ledger_id), &reseller_pk, &amount, &epoch],
    )
    .await
    .map(drop)
}

/// A second debit with the reference of one still being applied: it is refused rather
/// than queued, and the caller retries (the first one's answer is then its replay).
pub fn debit_in_progress() -> ApiError {
    ApiError::Conflict("a debit with this reference is still being applied; retry shortly".into())
}

/// The balance could not be decided now (a rebuild came between, or the hold's record is
/// gone): nothing was taken, and the caller retries.
pub fn balance_busy() -> ApiError {
    ApiError::Unavailable {
        what: "balance",
        retry_after_secs: 1,
    }
}

pub enum Held {
    Taken,
    /// The hot balance holds less than the debit.
    Short,
    /// Redis has no say (no hot balance, or a rebuild is due): Postgres alone decides.
    NotHeld,
    /// A hold of this reference is marked already (a concurrent or earlier debit with the
    /// same reference): nothing taken, so that giving one back never frees the other's.
    Marked,
}

/// Records, committed before anything is taken, that a debit under `reference` is about
/// to hold `amount` of the hot balance at `epoch`: the hold is never untracked.
pub async fn record_hold(
    client: &impl GenericClient,
    reseller_pk: i64,
    reference: &str,
    amount: i64,
    epoch: i64,
) -> Result<(), ApiError> {
    let recorded = client
        .execute(
            "INSERT INTO hot_balance_pending (movement, reseller_id, amount, kind, epoch)
             VALUES ($1, $2, $3, 'hold', $4) ON CONFLICT DO NOTHING",
            &[&hold_id(reseller_pk, reference), &reseller_pk, &amount, &epoch],
        )
        .await?;
    if recorded == 0 {
        return Err(debit_in_progress());
    }
    Ok(())
}

/// Takes the recorded hold in Redis. An error leaves it unknown whether it was taken:
/// the record stays, and is given back (if it was) once abandoned.
pub async fn take_hold(
    app: &App,
    reseller_pk: i64,
    reference: &str,
    amount: i64,
    epoch: i64,
    credit_limit: i64,
) -> redis::RedisResult<Held> {
    let mut redis = app.redis();
    let taken: i64 = HOLD
        .key(app.keys.balance(reseller_pk))
        .key(app.keys.epoch(app.keys.cell_of(reseller_pk)))
        .key(app.keys.hot_movement(reseller_pk, &hold_id(reseller_pk, reference)))
        .arg(amount)
        .arg(epoch)
        .arg(MARKER_TTL_SECS)
        .arg(credit_limit)
        .invoke_async(&mut redis)
        .await?;
    Ok(match taken {
        1 => Held::Taken,
        0 => Held::Short,
        -2 => Held::Marked,
        _ => Held::NotHeld,
    })
}

/// Locks the record of this request's hold inside its transaction; refused when the
/// record is gone (taken for abandoned and settled meanwhile: nothing is taken then).
pub async fn lock_hold(tx: &impl GenericClient, reseller_pk: i64, reference: &str) -> Result<(), ApiError> {
    let locked = tx
        .query_opt(
            "SELECT 1 FROM hot_balance_pending WHERE movement = $1 AND kind = 'hold' FOR UPDATE",
            &[&hold_id(reseller_pk, reference)],
        )
        .await?;
    locked.map(drop).ok_or_else(balance_busy)
}

/// Drops the record of a hold that was certainly not taken.
pub async fn forget_hold(client: &impl GenericClient, reseller_pk: i64, reference: &str) {
    let forgot = client
        .execute(
            "DELETE FROM hot_balance_pending WHERE movement = $1 AND kind = 'hold'",
            &[&hold_id(reseller_pk, reference)],
        )
        .await;
    if let Err(e) = forgot {
        // Left as a hold: once abandoned, giving it back finds nothing held.
        tracing::warn!(error = %e, "could not drop the record of a debit hold");
    }
}

/// Inside the debit's transaction: the hold becomes final when it commits. Its record was
/// locked by [`lock_hold`] in the same transaction, so it is there to delete; anything
/// else is a broken invariant, and the transaction is not committed.
pub async fn keep_hold(tx: &impl GenericClient, reseller_pk: i64, reference: &str) -> Result<(), ApiError> {
    let kept = tx
        .execute(
            "DELETE FROM hot_balance_pending WHERE movement = $1 AND kind = 'hold'",
            &[&hold_id(reseller_pk, reference)],
        )
        .await?;
    if kept == 1 {
        Ok(())
    } else {
        Err(ApiError::internal(anyhow::anyhow!(
            "a locked hold record vanished before its debit committed"
        )))
    }
}

/// The debit's ledger row was not written: its hold is to be given back, by [`settle`]
/// now if Redis answers, else by [`settle_due`].
pub async fn release(client: &impl GenericClient, reseller_pk: i64, reference: &str) {
    let marked = client
        .execute(
            "UPDATE hot_balance_pending SET kind = 'release' WHERE movement = $1 AND kind = 'hold'",
            &[&hold_id(reseller_pk, reference)],
        )
        .await;
    if let Err(e) = marked {
        // Left as a hold, it is given back once abandoned.
        tracing::warn!(error = %e, "could not mark a debit hold for release");
    }
}

/// Applies what is due (of one reseller, or of all) and logs a failure: the request that
/// calls it has already been decided, and [`settle_due`] retries.
pub async fn settle(app: &App, reseller_pk: Option<i64>) {
    if let Err(e) = settle_rows(app, reseller_pk).await {
        tracing::warn!(
            error = format!("{e:#}"),
            "hot balance not updated yet; retrying in the background"
        );
    }
}

/// [`settle`] after a decision that credited many resellers at once (a month's rebates):
/// rounds of [`settle_due`] until `movements` could have been applied, fewer once a round
/// finds less than a batch. What Redis refuses is left to the background step.
pub async fn settle_many(app: &App, movements: usize) {
    let batch = SETTLE_BATCH_ROWS_MAX as usize;
    for _ in 0..=movements.div_ceil(batch) {
        match settle_rows(app, None).await {
            Ok(n) if n >= batch => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "hot balances not updated yet; retrying in the background"
                );
                return;
            }
        }
    }
}

/// One step of the background work: applies every movement that is due. Returns how many.
pub async fn settle_due(app: &App) -> anyhow::Result<usize> {
    settle_rows(app, None).await
}

/// Runs [`settle_due`] every second, for the life of the server.
pub async fn run(app: Arc<App>) {
    let app = &app;
    crate::every(SETTLE_EVERY, move || async move {
        if let Err(e) = settle_due(app).await {
            tracing::debug!(
                error = format!("{e:#}"),
                "pending hot-balance movements not settled yet"
            );
        }
    })
    .await
}

async fn settle_rows(app: &App, reseller_pk: Option<i64>) -> anyhow::Result<usize> {
    let mut client = app.pg.get().await?;
    let tx = client.transaction().await?;
    // SKIP LOCKED: a row another gateway is settling, or a hold whose request is still
    // deciding (its transaction locked the row), is left to them.
    let rows = tx
        .query(
            "SELECT movement, reseller_id, amount, kind, epoch FROM hot_balance_pending
              WHERE ($1::bigint IS NULL OR reseller_id = $1)
                AND (kind <> 'hold' OR created_at < now() - make_interval(secs => $2))
              ORDER BY created_at LIMIT $3
                FOR UPDATE SKIP LOCKED",
            &[
                &reseller_pk,
                &(HOLD_ABANDONED_AFTER_SECS as f64),
                &SETTLE_BATCH_ROWS_MAX,
            ],
        )
        .await?;
    let mut redis = app.redis();
    let mut done = Vec::with_capacity(rows.len());
    for r in &rows {
        let (movement, pk, amount, kind, epoch): (String, i64, i64, &str, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let script = if kind == "credit" { &*CREDIT } else { &*RELEASE };
        let outcome: redis::RedisResult<i64> = script
            .key(app.keys.balance(pk))
            .key(app.keys.epoch(app.keys.cell_of(pk)))
            .key(app.keys.hot_movement(pk, &movement))
            .arg(amount)
            .arg(epoch)
            .arg(MARKER_TTL_SECS)
            .invoke_async(&mut redis)
            .await;
        match outcome {
            Ok(applied) => {
                if applied == 1 {
                    metrics::counter!("cardgate_hot_balance_settled_total", "kind" => if kind == "credit" { "credit" } else { "release" })
                        .increment(1);
                }
                done.push(movement);
            }
            // Redis is away: what was applied is recorded below, the rest waits.
            Err(e) => {
                tracing::debug!(error = %e, "Redis refused a hot-balance movement");
                break;
            }
        }
    }
    if !done.is_empty() {
        tx.execute("DELETE FROM hot_balance_pending WHERE movement = ANY($1)", &[&done])
            .await?;
    }
    tx.commit().await?;
    Ok(done.len())
}

/// Per reseller, how far the hot balance is below Postgres's because of movements not yet
/// settled: credits not applied, and holds taken and not yet kept or given back. For
/// reconciliation, which would otherwise report them as differences.
pub async fn unapplied(
    app: &App,
    client: &impl GenericClient,
    redis: &mut crate::store::redis::Redis,
) -> anyhow::Result<std::collections::HashMap<i64, i64>> {
    let mut gap = std::collections::HashMap::new();
    let rows = client
        .query(
            "SELECT movement, reseller_id, amount, kind, epoch FROM hot_balance_pending",
            &[],
        )
        .await?;
    if rows.is_empty() {
        return Ok(gap);
    }
    let epoch = crate::rebuild::redis_epoch(redis, app).await?;
    for r in &rows {
        let (movement, pk, amount, kind, at): (String, i64, i64, &str, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        // Of an older epoch: the rebuild since read Postgres's figure.
        if Some(at) != epoch {
            continue;
        }
        let marked: bool = redis::cmd("EXISTS")
            .arg(app.keys.hot_movement(pk, &movement))
            .query_async(redis)
            .await?;
        // A credit lowers the gap once applied (marked); a hold while taken (marked).
        if marked == (kind != "credit") {
            *gap.entry(pk).or_insert(0) += amount;
        }
    }
    Ok(gap)
}
