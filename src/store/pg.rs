//! Postgres: the connection pool and the migrations applied at start-up.

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::ExposeSecret;
use tokio_postgres::NoTls;

use crate::config::Config;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Serialises migrations when several gateways start at once.
const MIGRATION_LOCK_ID: i64 = 0x6361_7264_6761_7465; // "cardgate"

pub(crate) fn pg_config(config: &Config) -> anyhow::Result<tokio_postgres::Config> {
    let mut pg: tokio_postgres::Config = config
        .database_url
        .expose_secret()
        .parse()
        .context("database_url is not a valid Postgres URL")?;
    pg.connect_timeout(Duration::from_millis(config.postgres.connect_timeout_ms));
    pg.application_name("cardgate");
    // A statement stuck behind a lock or a sick server must not hold a request forever.
    pg.options(format!("-c statement_timeout={}", config.postgres.statement_timeout_ms));
    Ok(pg)
}

/// A pool of at most `size` connections; the gateway keeps two (`App::pg_orders`, `App::pg`).
pub fn pool(config: &Config, size: usize) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        pg_config(config)?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let wait = Duration::from_millis(config.postgres.connect_timeout_ms);
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(wait))
        .recycle_timeout(Some(wait))
        .build()
        .context("building the Postgres pool")
}

/// Applies pending migrations on a dedicated connection, under an advisory lock.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let (mut client, connection) = pg_config(config)?
        .connect(NoTls)
        .await
        .context("connecting to Postgres (database_url) to migrate")?;
    let driver = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_ID])
        .await?;
    let report = embedded::migrations::runner().run_async(&mut client).await;
    if report.is_ok() {
        // The event triggers name the configured currency (`platform` in
        // migrations/V1__baseline.sql, seeded with a placeholder).
        client
            .execute("UPDATE platform SET currency = $1", &[&config.currency])
            .await?;
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_ID])
        .await?;
    drop(client);
    let _ = driver.await;
    let report = report.context("applying migrations")?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied migration");
    }
    Ok(())
}

/// A round trip that proves the pool can reach Postgres.
pub async fn ping(pool: &Pool) -> anyhow::Result<()> {
    let client = pool.get().await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}

/// Whether `e` is only a wait for a pool connection that timed out: the pool is busy, and
/// Postgres may be answering every connection it has.
pub fn is_pool_busy(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<deadpool_postgres::PoolError>(),
        Some(deadpool_postgres::PoolError::Timeout(
            deadpool_postgres::TimeoutType::Wait
        ))
    )
}

/// A connection of its own for the health probe, outside both pools: however busy they
/// are, the probe asks Postgres itself, so a busy pool is never read as a store that is
/// down. Reconnects after any failure.
pub struct Probe {
    config: tokio_postgres::Config,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Probe {
    pub fn new(config: &Config) -> anyhow::Result<Probe> {
        Ok(Probe {
            config: pg_config(config)?,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// Runs one query returning one `bigint`; `None` when Postgres did not answer.
    pub async fn query_i64(&self, sql: &str) -> Option<i64> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = self.config.connect(NoTls).await.ok()?;
            tokio::spawn(connection);
            *slot = Some(client);
        }
        let client = slot.as_ref()?;
        match client.query_one(sql, &[]).await {
            Ok(row) => row.try_get(0).ok(),
            Err(_) => {
                *slot = None;
                None
            }
        }
    }
}
