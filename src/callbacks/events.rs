//! The events merchants are called back with: where each type is queued, listing a
//! reseller's events, and redelivery.
//!
//! Each event type is queued in exactly one place, by the transaction that makes it
//! happen, so it commits (or not) with its cause:
//!
//! - `order.fulfilled`: `ledger_commit()` (migrations/V1__baseline.sql), as it records the
//!   orders of a batch;
//! - `order.refunded`: the `order_refunded` trigger on `orders` (a refund's status change);
//! - `balance.low`: the `balance_low` trigger on `balances` (crossing the threshold down);
//! - `product.restocked`: the `codes_restocked` trigger on `codes` (a SKU's first available
//!   code again);
//! - `balance.rebate_credited`: `rebates::close`, with the month's ledger credits;
//! - `product.price_changed`: [`product_price_changed`] here, because its cause is either
//!   a product repriced (`catalogue::products`) or a reseller moved to another tier
//!   (`resellers`).
//! - `reseller.tier_changed`: [`tier_changed`] here, by an operator's change
//!   (`resellers`) or an automatic one (`growth`);
//!
//! Delivery is `dispatcher`'s.

use deadpool_postgres::GenericClient;

use super::{event_json, EVENT_COLUMNS};
use crate::app::App;
use crate::audit::{Actor, Audited};
use crate::error::ApiError;
use crate::http::query::{page, Page};

/// What each reseller with a callback paid for a product before it was repriced.
#[derive(Default)]
pub struct PricesBefore {
    resellers: Vec<i64>,
    prices: Vec<i64>,
}

impl PricesBefore {
    /// Read in the repricing's transaction, before the change.
    pub async fn read<C: GenericClient>(c: &C, sku: &str) -> Result<PricesBefore, ApiError> {
        let (resellers, prices) = c
            .query(
                "SELECT cp.reseller_id, cp.price FROM products p CROSS JOIN LATERAL callback_prices(p.id) cp WHERE p.sku = $1",
                &[&sku],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unzip();
        Ok(PricesBefore { resellers, prices })
    }
}

/// Why prices moved.
pub enum Repricing<'a> {
    /// The product's base or tier prices changed; `before` was read ahead of the change.
    Product { product_id: i64, before: &'a PricesBefore },
    /// A reseller moved from one tier to another: a new price list.
    Tier {
        reseller_pk: i64,
        from: &'a str,
        to: &'a str,
    },
}

/// `product.price_changed`, one event for each reseller with a callback (active, for a
/// tier move) and product on sale whose price for it moved.
pub async fn product_price_changed<C: GenericClient>(
    c: &C,
    why: Repricing<'_>,
    currency: &str,
) -> Result<(), ApiError> {
    match why {
        Repricing::Product { product_id, before } => {
            if before.resellers.is_empty() {
                return Ok(());
            }
            c.execute(
                "INSERT INTO events (reseller_id, type, data)
                 SELECT n.reseller_id, 'product.price_changed',
                        jsonb_build_object('sku', p.sku, 'name', p.name, 'price', n.price, 'previous_price', o.price,
                                           'currency', $4::text)
                   FROM products p CROSS JOIN LATERAL callback_prices(p.id) n
                   JOIN unnest($2::bigint[], $3::bigint[]) AS o(r, price) ON o.r = n.reseller_id
                  WHERE p.id = $1 AND n.price <> o.price",
                &[&product_id, &before.resellers, &before.prices, &currency],
            )
            .await?;
        }
        Repricing::Tier { reseller_pk, from, to } => {
            c.execute(
                "INSERT INTO events (reseller_id, type, data)
                 SELECT r.id, 'product.price_changed',
                        jsonb_build_object('sku', p.sku, 'name', p.name, 'price', coalesce(np.price, p.base_price),
                                           'previous_price', coalesce(op.price, p.base_price), 'currency', $4::text)
                   FROM resellers r CROSS JOIN products p
                   LEFT JOIN product_tier_prices op ON op.product_id = p.id AND op.tier = $2
                   LEFT JOIN product_tier_prices np ON np.product_id = p.id AND np.tier = $3
                  WHERE r.id = $1 AND r.callback_url IS NOT NULL AND r.status = 'active' AND p.status = 'on_sale'
                    AND coalesce(np.price, p.base_price) <> coalesce(op.price, p.base_price)
                  ORDER BY p.sku",
                &[&reseller_pk, &from, &to, &currency],
            )
            .await?;
        }
    }
    Ok(())
}

/// `reseller.tier_changed`, for a reseller with a callback; `reason` is `upgrade`,
/// `downgrade` or `operator`.
pub async fn tier_changed<C: GenericClient>(
    c: &C,
    reseller_pk: i64,
    previous: &str,
    tier: &str,
    reason: &str,
) -> Result<(), ApiError> {
    c.execute(
        "INSERT INTO events (reseller_id, type, data)
         SELECT r.id, 'reseller.tier_changed', jsonb_build_object('previous_tier', $2::text, 'tier', $3::text, 'reason', $4::text)
           FROM resellers r WHERE r.id = $1 AND r.callback_url IS NOT NULL",
        &[&reseller_pk, &previous, &tier, &reason],
    )
    .await?;
    Ok(())
}

/// A reseller's events, newest first, one page of them, deliveries included.
pub async fn list(app: &App, reseller_id: &str, cursor: Option<i64>, limit: i64) -> Result<Page, ApiError> {
    let client = app.pg.get().await?;
    let pk = crate::resellers::pk_of(&client, reseller_id).await?;
    let mut rows = client
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events e
                  WHERE e.reseller_id = $1 AND ($2::bigint IS NULL OR e.id < $2)
                  ORDER BY e.id DESC LIMIT $3"
            ),
            &[&pk, &cursor, &(limit + 1)],
        )
        .await?;
    let more = page(&mut rows, limit);
    Ok(Page::of(&rows, more, 8, event_json))
}

/// Makes an event due now, with a fresh 24-hour retry window, whatever its state (a
/// receiver may have lost an event it acknowledged); audited with the change. Answers
/// the event as listed.
pub async fn redeliver(app: &App, actor: &Actor, event_id: &str) -> Result<serde_json::Value, ApiError> {
    let mut client = app.pg.get().await?;
    let tx = Audited::begin(&mut client, actor, "event.redeliver", event_id).await?;
    let n = tx
        .execute(
            "UPDATE events SET status = 'pending', next_attempt_at = now(), retry_until = now() + interval '24 hours',
                    delivered_at = NULL
              WHERE event_id = $1",
            &[&event_id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("no such event"));
    }
    tx.commit(serde_json::json!({})).await?;
    let row = client
        .query_one(
            &format!("SELECT {EVENT_COLUMNS} FROM events e WHERE e.event_id = $1"),
            &[&event_id],
        )
        .await?;
    Ok(event_json(&row))
}
