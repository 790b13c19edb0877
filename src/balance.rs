//! Operator balance adjustments: Postgres ledger first for credits, the Redis hot balance
//! first for debits.
//!
//! The hot balance is the Postgres balance less the orders in flight. A debit must not
//! take money an in-flight order already holds, so it is taken from the hot balance
//! before the ledger row is written (and given back if the row is not); a credit is
//! written to the ledger first and only then made spendable. Both hot-balance moves are
//! guarded by the Redis epoch the ledger transaction saw ([`crate::rebuild`]).

use std::sync::LazyLock;

use redis::Script;
use serde::Serialize;

use crate::app::App;
use crate::audit::{self, Actor};
use crate::error::ApiError;
use crate::money::{self, MONEY_MAX_MINOR};

/// Takes ARGV[1] from the hot balance (KEYS[1]) if it holds that much: 1 taken, 0 too
/// little, -1 no hot balance or Redis not at epoch ARGV[2] (KEYS[2]): Postgres alone
/// decides, and the rebuild that follows reads its answer.
static HOT_DEBIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
local b = redis.call('GET', KEYS[1])
if not b then return -1 end
if tonumber(b) < tonumber(ARGV[1]) then return 0 end
redis.call('DECRBY', KEYS[1], ARGV[1])
return 1",
    )
});

/// Adds ARGV[1] to the hot balance only if it exists and Redis is at epoch ARGV[2]:
/// otherwise a rebuild reads the credit from Postgres, and adding it here would count it
/// twice.
static HOT_CREDIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) == ARGV[2] and redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return false",
    )
});

/// The largest credit or debit one adjustment may make: well inside the money bound, so
/// that a typo of a few digits is refused rather than booked.
pub const ADJUSTMENT_MAX_ABS: i64 = 1_000_000_000_000;
const _: () = assert!(ADJUSTMENT_MAX_ABS <= MONEY_MAX_MINOR);

#[derive(Debug, Serialize)]
pub struct Adjusted {
    pub reseller_id: String,
    pub amount: i64,
    pub reference: String,
    /// The balance right after this adjustment.
    pub balance: i64,
    pub currency: String,
    #[serde(skip)]
    pub replayed: bool,
}

/// Makes a credit recorded in a ledger transaction that saw `epoch` spendable.
pub async fn hot_credit(app: &App, reseller_pk: i64, amount: i64, epoch: i64) -> Result<(), ApiError> {
    let mut redis = app.redis();
    HOT_CREDIT
        .key(app.keys.balance(reseller_pk))
        .key(app.keys.epoch())
        .arg(amount)
        .arg(epoch)
        .invoke_async::<Option<i64>>(&mut redis)
        .await?;
    Ok(())
}

pub async fn adjust(
    app: &App,
    actor: &Actor,
    reseller_pk: i64,
    reseller_id: &str,
    amount: i64,
    reference: &str,
    note: Option<&str>,
) -> Result<Adjusted, ApiError> {
    let answer = |balance: i64, replayed: bool| Adjusted {
        reseller_id: reseller_id.to_string(),
        amount,
        reference: reference.to_string(),
        balance,
        currency: app.config.currency.clone(),
        replayed,
    };
    // Checked by the handler; here too because `-amount` below must not overflow.
    if amount == 0 || !money::within(amount) {
        return Err(ApiError::invalid(format!(
            "amount must be non-zero and at most {MONEY_MAX_MINOR} in size"
        )));
    }
    let mut client = app.pg.get().await?;
    let earlier = "SELECT amount, balance_after FROM balance_ledger WHERE reseller_id = $1 AND kind = 'adjustment' AND reference = $2";
    let replay = |row: tokio_postgres::Row| {
        if row.get::<_, i64>(0) != amount {
            return Err(ApiError::IdempotencyConflict);
        }
        Ok(answer(row.get(1), true))
    };
    if let Some(row) = client.query_opt(earlier, &[&reseller_pk, &reference]).await? {
        return replay(row);
    }

    let tx = client.transaction().await?;
    let epoch = crate::rebuild::fence(&tx).await?;
    let mut taken_from_hot = false;
    if amount < 0 {
        let mut redis = app.redis();
        let taken: i64 = HOT_DEBIT
            .key(app.keys.balance(reseller_pk))
            .key(app.keys.epoch())
            .arg(-amount)
            .arg(epoch)
            .invoke_async(&mut redis)
            .await?;
        if taken == 0 {
            return Err(ApiError::InsufficientBalance);
        }
        taken_from_hot = taken == 1;
    }
    let inserted = tx
        .query_opt(
            "INSERT INTO balance_ledger (reseller_id, amount, kind, reference, note, actor)
             VALUES ($1, $2, 'adjustment', $3, $4, $5)
             ON CONFLICT (reseller_id, kind, reference) DO NOTHING RETURNING id",
            &[&reseller_pk, &amount, &reference, &note, &actor.name],
        )
        .await;
    let give_back = || async {
        if taken_from_hot {
            hot_credit(app, reseller_pk, -amount, epoch).await
        } else {
            Ok(())
        }
    };
    let row = match inserted {
        Ok(row) => row,
        Err(e) => {
            give_back().await?;
            if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) {
                let constraint = e.as_db_error().and_then(|d| d.constraint());
                if constraint == Some("balance_bounded") {
                    return Err(ApiError::invalid(format!(
                        "amount: the balance would pass {MONEY_MAX_MINOR}"
                    )));
                }
                return Err(ApiError::InsufficientBalance);
            }
            return Err(e.into());
        }
    };
    let Some(row) = row else {
        // A concurrent call with the same reference won: answer as it did.
        give_back().await?;
        let row = tx
            .query_opt(earlier, &[&reseller_pk, &reference])
            .await?
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("ledger row vanished")))?;
        return replay(row);
    };
    // The AFTER trigger that moved the balance has run by now and recorded the result.
    let ledger_id: i64 = row.get(0);
    let balance_after: i64 = tx
        .query_one("SELECT balance_after FROM balance_ledger WHERE id = $1", &[&ledger_id])
        .await?
        .get(0);
    audit::record(
        &tx,
        actor,
        "balance.adjust",
        Some(reseller_id),
        None,
        serde_json::json!({"amount": amount, "reference": reference}),
    )
    .await?;
    if let Err(e) = tx.commit().await {
        give_back().await?;
        return Err(e.into());
    }
    if amount > 0 {
        hot_credit(app, reseller_pk, amount, epoch).await?;
    }
    metrics::counter!("cardgate_balance_adjustments_total", "direction" => if amount > 0 { "credit" } else { "debit" })
        .increment(1);
    Ok(answer(balance_after, false))
}
