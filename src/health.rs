//! The stores' health, checked by [`watch`]: Redis is rebuilt when it has lost its state,
//! and whether Postgres answers is kept for the order path.
//!
//! Orders are refused at once while Postgres is down, instead of reserving stock and
//! money that cannot be committed and making every caller wait for the commit timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::rebuild;

const EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Health {
    postgres_up: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        metrics::gauge!("cardgate_postgres_up").set(1.0);
        Health {
            postgres_up: AtomicBool::new(true),
        }
    }
}

impl Health {
    pub fn postgres_up(&self) -> bool {
        self.postgres_up.load(Ordering::Relaxed)
    }

    /// Called by whoever last talked to Postgres (the probe, the ledger writers).
    pub fn set_postgres_up(&self, up: bool) {
        if self.postgres_up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("Postgres answers again");
            } else {
                tracing::warn!("Postgres is not answering; orders are refused until it does");
            }
            metrics::gauge!("cardgate_postgres_up").set(if up { 1.0 } else { 0.0 });
        }
    }
}

/// Runs [`check`] every half second, for the life of the server.
pub async fn watch(app: Arc<App>) {
    let app = &app;
    crate::every(EVERY, move || check(app)).await
}

/// Probes both stores and rebuilds Redis if it lost its state (or holds an older one
/// than Postgres's epoch, after a failover to a replica that lagged).
pub async fn check(app: &App) {
    let pg_epoch = app.probe.query_i64("SELECT epoch FROM redis_epoch");
    let mut redis = app.redis();
    let (pg_epoch, redis_epoch) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, pg_epoch),
        tokio::time::timeout(PROBE_TIMEOUT, rebuild::redis_epoch(&mut redis, app)),
    );
    let pg_epoch = pg_epoch.ok().flatten();
    app.health.set_postgres_up(pg_epoch.is_some());
    let ready = pg_epoch.is_some() && matches!(redis_epoch, Ok(Ok(_)));
    metrics::gauge!("cardgate_ready").set(if ready { 1.0 } else { 0.0 });
    let (Ok(Ok(redis_epoch)), Some(pg_epoch)) = (redis_epoch, pg_epoch) else {
        return; // a store is away: nothing to compare, nothing rebuilt without both
    };
    if redis_epoch != Some(pg_epoch) {
        if let Err(e) = rebuild::rebuild(app, false).await {
            tracing::error!(error = format!("{e:#}"), "rebuilding Redis failed; retrying");
        }
    }
}
