//! Keeping every gateway's in-memory caches (API keys, catalogue) in step.
//!
//! A change is written to Postgres, then announced on a Redis channel; every gateway
//! (the announcer included) reloads on the message. A lost message (Redis restarting,
//! the subscriber reconnecting) is covered by a reload on every (re)subscription and a
//! periodic one, so a cache is never staler than `CACHE_REFRESH_SECS`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::app::App;

pub const CACHE_REFRESH_SECS: u64 = 30;
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(200);

pub fn channel(app: &App) -> String {
    format!("{}:invalidate", app.config.redis_prefix)
}

/// Reloads both caches. Errors are logged: the old cache stays in force meanwhile.
pub async fn reload(app: &App) {
    let (keys, catalogue) = tokio::join!(
        app.key_cache.reload(&app.pg_orders, &app.crypto),
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
        match app.redis_client.get_async_pubsub().await {
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
    }
}
