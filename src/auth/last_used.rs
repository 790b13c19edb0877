//! When each API key was last used, without a Postgres write per request: a request whose
//! signature verifies notes its key's time in this gateway's memory ([`LastUsed::record`]),
//! and [`flush`] writes what was noted since the last flush in one statement, every
//! [`FLUSH_EVERY`] (`run`) and once more at shutdown. Postgres keeps the latest time any
//! gateway wrote: a gateway flushing an older use never moves it back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::app::App;

/// How stale `last_used_at` may be, besides a gateway's last moments before a crash.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// Uses noted since the last flush: key id to Unix milliseconds.
#[derive(Default)]
pub struct LastUsed {
    // A std lock: held for one map operation, never across an await.
    pending: Mutex<HashMap<String, i64>>,
}

impl LastUsed {
    /// Notes a use of `key_id` at `at_ms`; the key id is copied only the first time it is
    /// used since the last flush.
    pub fn record(&self, key_id: &str, at_ms: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.get_mut(key_id) {
            Some(t) => *t = (*t).max(at_ms),
            None => {
                pending.insert(key_id.to_owned(), at_ms);
            }
        }
    }

    fn take(&self) -> HashMap<String, i64> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back uses a flush could not write, beside those noted meanwhile.
    fn restore(&self, uses: HashMap<String, i64>) {
        for (key_id, at_ms) in uses {
            self.record(&key_id, at_ms);
        }
    }
}

/// Writes the uses noted since the last flush; answers how many keys' `last_used_at`
/// moved. Uses it could not write are kept for the next one.
pub async fn flush(app: &App) -> anyhow::Result<u64> {
    let uses = app.last_used.take();
    if uses.is_empty() {
        return Ok(0);
    }
    match write(app, &uses).await {
        Ok(n) => Ok(n),
        Err(e) => {
            app.last_used.restore(uses);
            Err(e)
        }
    }
}

async fn write(app: &App, uses: &HashMap<String, i64>) -> anyhow::Result<u64> {
    let key_ids: Vec<&str> = uses.keys().map(String::as_str).collect();
    let ats = uses
        .values()
        .map(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(*ms) * 1_000_000))
        .collect::<Result<Vec<_>, _>>()
        .context("a key use's time")?;
    let client = app.pg.get().await.context("writing keys' last use")?;
    // The rows are locked in key order first, so that gateways flushing the same keys at
    // once wait for each other instead of deadlocking; the later time wins either way.
    client
        .execute(
            "WITH locked AS MATERIALIZED (
                 SELECT k.key_id, u.at FROM api_keys k
                   JOIN unnest($1::text[], $2::timestamptz[]) AS u(key_id, at) ON u.key_id = k.key_id
                  WHERE k.last_used_at IS NULL OR k.last_used_at < u.at
                  ORDER BY k.key_id FOR UPDATE OF k)
             UPDATE api_keys k SET last_used_at = greatest(k.last_used_at, locked.at)
               FROM locked WHERE k.key_id = locked.key_id",
            &[&key_ids, &ats],
        )
        .await
        .context("writing keys' last use")
}

/// Runs [`flush`] every [`FLUSH_EVERY`], for the life of the server.
pub async fn run(app: Arc<App>) {
    let app = &app;
    crate::every(FLUSH_EVERY, move || async move {
        if let Err(e) = flush(app).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "keys' last use not written; kept for the next flush"
            );
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_use_is_kept_and_what_a_failed_flush_held_is_put_back() {
        let uses = LastUsed::default();
        uses.record("ak_a", 20);
        uses.record("ak_a", 10);
        uses.record("ak_b", 5);
        let taken = uses.take();
        assert_eq!(taken, HashMap::from([("ak_a".into(), 20), ("ak_b".into(), 5)]));
        assert!(uses.take().is_empty(), "taken once");
        // Noted while the failed flush was writing: the later of the two stays.
        uses.record("ak_a", 30);
        uses.record("ak_b", 1);
        uses.restore(taken);
        assert_eq!(uses.take(), HashMap::from([("ak_a".into(), 30), ("ak_b".into(), 5)]));
    }
}
