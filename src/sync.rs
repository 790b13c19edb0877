//! Keeping every gateway's in-memory caches (API keys, catalogue) in step.
//!
//! A change is written to Postgres, then announced on a Redis channel; every gateway
//! (the announcer included) reloads on the message. A lost message (Redis restarting,
//! the subscriber reconnecting) is covered by a reload on every (re)subscription and a
//! periodic one, so a cache is never staler than `CACHE_REFRESH_SECS`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;

use crate::app::App;

pub const CACHE_REFRESH_SECS: u64 = 30;
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(200);

/// A cache's snapshot, replaced whole by reloads that may overlap (an announcement, a
/// resubscription and the periodic refresh can all be running): each reload takes a
/// ticket before it reads, and its snapshot is installed only if no reload that started
/// later has installed one already. A reload that started after a commit read that
/// commit, so once it is installed no older snapshot can undo it (a revocation coming
/// back for up to `CACHE_REFRESH_SECS`), and reloads never wait for one another.
pub struct Latest<T> {
    next_ticket: AtomicU64,
    // A std lock: held only to compare a ticket and swap an Arc, never across an await.
    current: RwLock<(u64, Arc<T>)>,
}

/// When a reload began, relative to the others of its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

impl<T: Default> Default for Latest<T> {
    fn default() -> Self {
        Latest {
            next_ticket: AtomicU64::new(1),
            current: RwLock::new((0, Arc::new(T::default()))),
        }
    }
}

impl<T> Latest<T> {
    pub fn get(&self) -> Arc<T> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// Taken by a reload before it reads its source.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.next_ticket.fetch_add(1, Ordering::Relaxed))
    }

    /// Installs `value` unless a reload with a later ticket did already; says which.
    pub fn install(&self, ticket: Ticket, value: T) -> bool {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if ticket.0 <= current.0 {
            return false;
        }
        *current = (ticket.0, Arc::new(value));
        true
    }
}

pub fn channel(app: &App) -> String {
    format!("{}:invalidate", app.config.redis_prefix)
}

/// Reloads both caches. Errors are logged: the old cache stays in force meanwhile.
pub async fn reload(app: &App) {
    let (keys, catalogue) = tokio::join!(
        app.key_cache.reload(&app.pg_orders, &app.crypto, &app.clock),
        app.catalogue.reload(&app.pg_orders)
    );
    for r in [keys, catalogue] {
        if let Err(e) = r {
            tracing::warn!(
                error = format!("{e:#}"),
                "cache reload failed; keeping the previous one"
            );
        }
    }
}

/// Reloads here at once, then tells the other gateways.
pub async fn changed(app: &App) {
    reload(app).await;
    let mut redis = app.redis();
    if let Err(e) = redis::cmd("PUBLISH")
        .arg(channel(app))
        .arg("reload")
        .query_async::<()>(&mut redis)
        .await
    {
        tracing::warn!(error = %e, "could not announce a change; other gateways catch up within the refresh period");
    }
}

/// Listens for announcements until the task is aborted: cache changes, and orders
/// another gateway's ledger writer settled for requests waiting here.
pub async fn listen(app: Arc<App>) {
    let settled = crate::ledger::channel(&app.config.redis_prefix);
    loop {
        match app.redis_client.pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&[channel(&app), settled.clone()]).await.is_ok() {
                    // Anything announced while we were not subscribed is covered by this.
                    reload(&app).await;
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        if msg.get_channel_name() == settled {
                            let text: String = msg.get_payload().unwrap_or_default();
                            for (order_id, s) in crate::ledger::parse_message(&text) {
                                app.waiters.notify(order_id, s);
                            }
                        } else {
                            reload(&app).await;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cache subscriber cannot reach Redis"),
        }
        tokio::time::sleep(RESUBSCRIBE_DELAY).await;
    }
}

pub async fn refresh_periodically(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(CACHE_REFRESH_SECS));
    tick.tick().await;
    loop {
        tick.tick().await;
        reload(&app).await;
        app.rate_limits.sweep();
        app.login_limiter.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_reload_finishing_last_does_not_replace_a_newer_one() {
        let cache: Latest<&str> = Latest::default();
        // The first reload reads before a revocation, the second after it; the first is
        // slow and finishes last.
        let before = cache.ticket();
        let after = cache.ticket();
        assert!(cache.install(after, "revoked"));
        assert!(!cache.install(before, "still live"));
        assert_eq!(*cache.get(), "revoked");
        // In order, each replaces the one before.
        let next = cache.ticket();
        assert!(cache.install(next, "next"));
        assert_eq!(*cache.get(), "next");
    }
}
