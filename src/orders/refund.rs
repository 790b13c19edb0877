//! Refunds: the amount back to the balance through the ledger, the codes voided so they
//! are never sold again, the audit row with them. Idempotent: a second refund of an order
//! answers the first. The `order.refunded` event comes from the `order_refunded` trigger
//! on the status change (`callbacks::events`). Only a fulfilled order is refunded: an
//! upstream order still `processing` or already `failed` (its money returned) is `409`.

use serde::Serialize;

use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::error::ApiError;

#[derive(Debug, Serialize)]
pub struct Refunded {
    pub order_id: String,
    pub reseller_id: String,
    pub amount: i64,
    pub currency: String,
    pub status: &'static str,
    pub refunded_at: String,
    pub reason: Option<String>,
    #[serde(skip)]
    pub replayed: bool,
}

pub async fn refund(app: &App, actor: &Actor, order_id: &str, reason: Option<&str>) -> Result<Refunded, ApiError> {
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "order.refund", order_id).await?;
    let epoch = crate::rebuild::fence(&*tx).await?;
    let row = tx
        .query_opt(
            "SELECT o.id, o.reseller_id, r.reseller_id, o.amount, o.currency, o.status, o.refunded_at, o.refund_reason
               FROM orders o JOIN resellers r ON r.id = o.reseller_id
              WHERE o.order_id = $1 FOR UPDATE OF o",
            &[&order_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("no such order"))?;
    let (pk, reseller_pk, amount): (i64, i64, i64) = (row.get(0), row.get(1), row.get(3));
    let answer = |at: time::OffsetDateTime, reason: Option<String>, replayed: bool| Refunded {
        order_id: order_id.to_string(),
        reseller_id: row.get(2),
        amount,
        currency: row.get(4),
        status: "refunded",
        refunded_at: crate::http::query::rfc3339(at),
        reason,
        replayed,
    };
    match row.get::<_, &str>(5) {
        "refunded" => {
            drop(tx);
            drop(client);
            crate::hot_balance::settle(app, Some(reseller_pk)).await;
            return Ok(answer(row.get(6), row.get(7), true));
        }
        // Its purchase may still deliver codes: refunding now would give the money back
        // for codes the reseller then receives. The purchase's end decides first.
        "processing" => {
            return Err(ApiError::Conflict(
                "the order is still being bought upstream (processing): nothing is delivered yet; refund it once it is fulfilled".into(),
            ))
        }
        "failed" => {
            return Err(ApiError::Conflict(
                "the order failed upstream: its amount was already returned to the balance (upstream_failed)".into(),
            ))
        }
        _ => {}
    }
    let at: time::OffsetDateTime = tx
        .query_one(
            "UPDATE orders SET status = 'refunded', refunded_at = now(), refund_reason = $2 WHERE id = $1 RETURNING refunded_at",
            &[&pk, &reason],
        )
        .await?
        .get(0);
    tx.execute(
        "UPDATE codes SET status = 'voided', voided_at = now()
          WHERE id IN (SELECT code_id FROM order_codes WHERE order_id = $1)",
        &[&pk],
    )
    .await?;
    if amount != 0 {
        let ledger_id: i64 = tx
            .query_one(
                "INSERT INTO balance_ledger (reseller_id, amount, kind, reference, note, actor)
                 VALUES ($1, $2, 'refund', $3, $4, $5) RETURNING id",
                &[&reseller_pk, &amount, &order_id, &reason, &actor.name],
            )
            .await?
            .get(0);
        crate::hot_balance::record_credit(&*tx, reseller_pk, ledger_id, amount, epoch).await?;
    }
    tx.commit(serde_json::json!({"amount": amount, "reason": reason}))
        .await?;
    drop(client);
    // Spendable only once recorded; if Redis misses it now, the background step applies it.
    crate::hot_balance::settle(app, Some(reseller_pk)).await;
    metrics::counter!("cardgate_refunds_total").increment(1);
    // Judged after the refund, which stands whatever the rule says.
    if let Err(e) = crate::risk::after_refund(app, reseller_pk).await {
        tracing::warn!(error = format!("{e:#}"), "refund rate not evaluated");
    }
    Ok(answer(at, reason.map(str::to_owned), false))
}
