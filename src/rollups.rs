//! The report rollups' pending additions (`sales_pending`, migrations/V1__baseline.sql),
//! folded into `reseller_daily` and `product_daily` (`sales_fold`) every few seconds by
//! each gateway, so that ledger commits only ever append and reports fold what little is
//! left.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::GenericClient;

use crate::app::App;

const EVERY: Duration = Duration::from_secs(2);

pub async fn run(app: Arc<App>) {
    let app = &app;
    crate::every(EVERY, move || async move {
        if let Err(e) = step(app).await {
            tracing::debug!(error = format!("{e:#}"), "report rollups not folded");
        }
    })
    .await
}

/// One fold on a pooled connection: how many pending rows it moved.
pub async fn step(app: &App) -> anyhow::Result<i64> {
    Ok(fold(&app.pg.get().await?).await?)
}

/// Moves every pending addition into the rollups; returns how many rows it moved. In a
/// transaction, the rollup rows it moved stay locked until that ends.
pub async fn fold(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(client.query_one("SELECT sales_fold()", &[]).await?.get(0))
}
