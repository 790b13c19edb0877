//! Gauges of state shared by every gateway (stock, balances, the callback queue, orders
//! waiting on suppliers), read
//! from the stores every few seconds rather than on the paths that change them. Every
//! gateway exports the same values; dashboards and alerts take the max or min.

use std::sync::Arc;
use std::time::Duration;

use crate::app::App;

const EVERY: Duration = Duration::from_secs(5);

pub async fn run(app: Arc<App>) {
    let app = &app;
    crate::every(EVERY, move || async move {
        if let Err(e) = step(app).await {
            tracing::debug!(error = format!("{e:#}"), "gauges not refreshed");
        }
    })
    .await
}

/// Reads every gauge once.
pub async fn step(app: &App) -> anyhow::Result<()> {
    let client = app.pg.get().await?;
    let products = client
        .query("SELECT id, sku, low_stock_threshold FROM products ORDER BY id", &[])
        .await?;
    let ids: Vec<i64> = products.iter().map(|p| p.get(0)).collect();
    let lengths = crate::stock::mover::available(&mut app.redis(), &app.keys, &ids).await?;
    for (p, len) in products.iter().zip(lengths) {
        let sku: String = p.get(1);
        if let Some(t) = p.get::<_, Option<i32>>(2) {
            metrics::gauge!("cardgate_stock_low_threshold", "sku" => sku.clone()).set(t as f64);
        }
        metrics::gauge!("cardgate_stock_available", "sku" => sku).set(len as f64);
    }

    // Low is judged on what can be spent, the credit line included (docs/api.md §6).
    let money = client
        .query_one(
            "SELECT count(*) FILTER (WHERE r.status = 'active' AND b.balance + r.credit_limit < r.low_balance_threshold),
                    coalesce(sum(greatest(0, -b.balance)), 0)::float8, count(*) FILTER (WHERE b.balance < 0)
               FROM resellers r JOIN balances b ON b.reseller_id = r.id",
            &[],
        )
        .await?;
    metrics::gauge!("cardgate_resellers_low_balance").set(money.get::<_, i64>(0) as f64);
    metrics::gauge!("cardgate_credit_in_use").set(money.get::<_, f64>(1));
    metrics::gauge!("cardgate_resellers_in_credit").set(money.get::<_, i64>(2) as f64);

    backlog(
        &client,
        "events WHERE status = 'pending'",
        "cardgate_callbacks_pending",
        "cardgate_callbacks_oldest_pending_seconds",
    )
    .await?;
    // Orders waiting on suppliers, money held: a purchase waits as long as the source it
    // asked, or passed over, stays unable to answer (docs/api.md §8).
    backlog(
        &client,
        "purchases WHERE state = 'open'",
        "cardgate_upstream_open_purchases",
        "cardgate_upstream_oldest_open_purchase_seconds",
    )
    .await
}

/// A queue's length and the age of its oldest row, as the gauges `count` and `oldest`:
/// `rows` is a table and the condition of the rows waiting in it.
async fn backlog(
    client: &deadpool_postgres::Object,
    rows: &'static str,
    count: &'static str,
    oldest: &'static str,
) -> anyhow::Result<()> {
    let sql = format!("SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM {rows}");
    let r = client.query_one(&sql, &[]).await?;
    metrics::gauge!(count).set(r.get::<_, i64>(0) as f64);
    metrics::gauge!(oldest).set(r.get::<_, f64>(1));
    Ok(())
}
