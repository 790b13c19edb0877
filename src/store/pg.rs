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

fn pg_config(config: &Config) -> anyhow::Result<tokio_postgres::Config> {
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

pub fn pool(config: &Config) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        pg_config(config)?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let wait = Duration::from_millis(config.postgres.connect_timeout_ms);
    Pool::builder(manager)
        .max_size(config.postgres.pool_size)
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
        // The event triggers name the configured currency (migrations/V8).
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
