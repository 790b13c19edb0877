//! Operator balance adjustments: Postgres ledger first for credits, the Redis hot balance
//! first for debits.
//!
//! A credit's way: `POST /admin/v1/resellers/{id}/balance` -> `api/admin/resellers.rs`
//! `adjust_balance` (parses and bounds the request) -> [`adjust`] here (the ledger row,
//! its audit row and the pending credit in one transaction) -> [`crate::hot_balance`]
//! `settle` (the credit applied to the Redis hot balance exactly once).
//!
//! The hot balance is the Postgres balance less the orders in flight. A debit must not
//! take money an in-flight order already holds, so it is taken from the hot balance
//! before the ledger row is written (and given back if the row is not); a credit is
//! written to the ledger first and only then made spendable. Both hot-balance moves are
//! guarded by the Redis epoch the ledger transaction saw ([`crate::rebuild`]).

use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::error::ApiError;
use crate::hot_balance::{self, Held};
use crate::money::{self, MONEY_MAX_MINOR};

/// The largest credit or debit one adjustment may make: well inside the money bound, so
/// that a typo of a few digits is refused rather than booked.
pub const ADJUSTMENT_MAX_ABS: i64 = 1_000_000_000_000;
const _: () = assert!(ADJUSTMENT_MAX_ABS <= MONEY_MAX_MINOR);

/// `POST /admin/v1/resellers/{id}/balance`, bounded by the handler.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adjustment {
    pub amount: i64,
    /// Idempotency: one adjustment per reseller and reference.
    pub reference: String,
    pub note: Option<String>,
}

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

pub async fn adjust(app: &App, actor: &Actor, reseller_id: &str, a: &Adjustment) -> Result<Adjusted, ApiError> {
    let (amount, reference, note) = (a.amount, a.reference.as_str(), a.note.as_deref());
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
    let reseller_pk = crate::resellers::pk_of(&client, reseller_id).await?;
    // A debit may use the credit line as an order may; Postgres holds it to the limit as
    // it stands when the debit commits.
    let credit_limit: i64 = client
        .query_one("SELECT credit_limit FROM resellers WHERE id = $1", &[&reseller_pk])
        .await?
        .get(0);
    let earlier = "SELECT amount, balance_after FROM balance_ledger WHERE reseller_id = $1 AND kind = 'adjustment' AND reference = $2";
    let replay = |row: tokio_postgres::Row| {
        if row.get::<_, i64>(0) != amount {
            return Err(ApiError::IdempotencyConflict(
                "reference was already used for an adjustment of a different amount",
            ));
        }
        Ok(answer(row.get(1), true))
    };
    if let Some(row) = client.query_opt(earlier, &[&reseller_pk, &reference]).await? {
        drop(client);
        // The first call may have committed without reaching Redis: finish that now.
        hot_balance::settle(app, Some(reseller_pk)).await;
        return replay(row);
    }
    let debit = amount < 0;
    let recorded_epoch = if debit {
        let epoch: i64 = client.query_one("SELECT epoch FROM redis_epoch", &[]).await?.get(0);
        hot_balance::record_hold(&client, reseller_pk, reference, -amount, epoch).await?;
        Some(epoch)
    } else {
        None
    };

    let tx = Audited::begin(&mut client, actor, "balance.adjust", reseller_id).await?;
    let epoch = crate::rebuild::fence(&*tx).await?;
    let held = match recorded_epoch {
        None => Ok(Held::NotHeld),
        // A rebuild came between: nothing was taken, the caller retries.
        Some(e) if e != epoch => Err((hot_balance::balance_busy(), false)),
        // The record is locked before anything is taken: the background step skips a
        // locked record, so it cannot give back a hold this request is still deciding.
        // After a Redis error it is unknown whether the hold was taken.
        Some(_) => match hot_balance::lock_hold(&*tx, reseller_pk, reference).await {
            Err(e) => Err((e, false)),
            Ok(()) => hot_balance::take_hold(app, reseller_pk, reference, -amount, epoch, credit_limit)
                .await
                .map_err(|e| (ApiError::from(e), true)),
        },
    };
    let written = match held {
        Ok(Held::Short) => Err(ApiError::InsufficientBalance),
        Ok(Held::Marked) => Err(hot_balance::debit_in_progress()),
        Ok(_) => write(&tx, actor, reseller_pk, amount, reference, note, epoch, debit).await,
        Err((e, unknown)) => {
            let _ = tx.rollback().await;
            // If it may have been taken, the record stays and is given back once abandoned.
            if !unknown {
                hot_balance::forget_hold(&client, reseller_pk, reference).await;
            }
            return Err(e);
        }
    };
    // The transaction ends before the hold is dealt with: it may hold the record's lock.
    let written = match written {
        Ok(Written::New { balance_after }) => tx
            .commit(serde_json::json!({"amount": amount, "reference": reference}))
            .await
            .map(|()| Some(balance_after)),
        Ok(Written::Earlier) => tx.rollback().await.map(|()| None),
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    };
    if debit && !matches!(written, Ok(Some(_))) {
        if matches!(held, Ok(Held::Taken)) {
            hot_balance::release(&client, reseller_pk, reference).await;
        } else {
            hot_balance::forget_hold(&client, reseller_pk, reference).await;
        }
    }
    drop(client);
    let Some(balance_after) = written? else {
        // A concurrent call with the same reference won: answer as it did.
        let row = app
            .pg
            .get()
            .await?
            .query_opt(earlier, &[&reseller_pk, &reference])
            .await?
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("ledger row vanished")))?;
        return replay(row);
    };
    // A credit to apply, or a hold to give back: now if Redis answers.
    hot_balance::settle(app, Some(reseller_pk)).await;
    metrics::counter!("cardgate_balance_adjustments_total", "direction" => if amount > 0 { "credit" } else { "debit" })
        .increment(1);
    Ok(answer(balance_after, false))
}

enum Written {
    New {
        balance_after: i64,
    },
    /// Another call with this reference wrote it first.
    Earlier,
}

/// The ledger row and, for a credit, the record that makes it spendable, in the
/// adjustment's transaction (which commits with its audit row); for a debit, the hold it
/// made final.
#[allow(clippy::too_many_arguments)]
async fn write(
    tx: &Audited<'_>,
    actor: &Actor,
    reseller_pk: i64,
    amount: i64,
    reference: &str,
    note: Option<&str>,
    epoch: i64,
    debit: bool,
) -> Result<Written, ApiError> {
    let inserted = tx
        .query_opt(
            "INSERT INTO balance_ledger (reseller_id, amount, kind, reference, note, actor)
             VALUES ($1, $2, 'adjustment', $3, $4, $5)
             ON CONFLICT (reseller_id, kind, reference) DO NOTHING RETURNING id",
            &[&reseller_pk, &amount, &reference, &note, &actor.name],
        )
        .await
        .map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) {
                let constraint = e.as_db_error().and_then(|d| d.constraint());
                if constraint == Some("balance_bounded") {
                    ApiError::invalid(format!("amount: the balance would pass {MONEY_MAX_MINOR}"))
                } else {
                    ApiError::InsufficientBalance
                }
            } else {
                e.into()
            }
        })?;
    let Some(row) = inserted else {
        return Ok(Written::Earlier);
    };
    if debit {
        hot_balance::keep_hold(&**tx, reseller_pk, reference).await?;
    }
    // The AFTER trigger that moved the balance has run by now and recorded the result.
    let ledger_id: i64 = row.get(0);
    let balance_after: i64 = tx
        .query_one("SELECT balance_after FROM balance_ledger WHERE id = $1", &[&ledger_id])
        .await?
        .get(0);
    if amount > 0 {
        hot_balance::record_credit(&**tx, reseller_pk, ledger_id, amount, epoch).await?;
    }
    Ok(Written::New { balance_after })
}
