//! Shared state of one gateway process, built once at start-up.

use std::sync::Arc;

use anyhow::Context;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;

use crate::config::{Config, Validated};
use crate::store::{self, keys::Keys};
use crate::telemetry;

pub struct App {
    pub config: Config,
    pub settings: Validated,
    pub pg: Pool,
    pub redis: ConnectionManager,
    pub keys: Keys,
    pub metrics: PrometheusHandle,
}

impl App {
    /// Validates the configuration, migrates Postgres and connects to both stores.
    pub async fn build(config: Config) -> anyhow::Result<Arc<App>> {
        let settings = config.validate()?;
        let metrics = telemetry::prometheus();
        store::pg::migrate(&config).await?;
        let pg = store::pg::pool(&config)?;
        store::pg::ping(&pg)
            .await
            .context("Postgres is not answering")?;
        let redis = store::redis::connect(&config).await?;
        let keys = Keys::new(&config.redis_prefix);
        Ok(Arc::new(App {
            config,
            settings,
            pg,
            redis,
            keys,
            metrics,
        }))
    }

    /// A Redis handle for one request; clones share the one multiplexed connection.
    pub fn redis(&self) -> ConnectionManager {
        self.redis.clone()
    }
}
