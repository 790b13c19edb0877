//! Delivers due events: claims a few with a lease (`FOR UPDATE SKIP LOCKED`, so gateways
//! share the queue), posts each to its reseller's `callback_url`, records the attempt,
//! and schedules the next one with exponential backoff until `retry_until`.
//!
//! At least once: an event leaves `pending` only after a `2xx` is recorded, and one whose
//! dispatcher died mid-attempt is due again when its lease ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{watch, Semaphore};
use tokio_postgres::Row;

use super::target::{self, Refused};
use crate::app::App;
use crate::config::CallbacksConfig;
use crate::crypto::Purpose;

/// Bytes of a receiver's refusal kept with the attempt.
const ERROR_TEXT_MAX_BYTES: usize = 200;
/// Bytes of a refusing receiver's body that are read at all: a little more than is kept,
/// so that a character cut at the end does not shorten the kept text. The rest is never
/// read; the connection is dropped instead (a receiver may answer with gigabytes).
const RECEIVER_ANSWER_READ_MAX_BYTES: usize = 256;
const PURGE_EVERY: Duration = Duration::from_secs(600);

/// Delivers due callbacks until `stop` turns true: as many at once as
/// `callbacks.concurrency`, claiming more as deliveries finish. On stop it claims nothing
/// more and returns once the attempts in flight have ended (each within its timeout): an
/// event claimed and then dropped would wait out its lease before another gateway could
/// try it.
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let dispatcher = match Dispatcher::new(&app) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "callback HTTP client could not be built; callbacks stay queued");
            return;
        }
    };
    let cfg = &app.config.callbacks;
    let concurrency = cfg.concurrency.max(1);
    let slots = Arc::new(Semaphore::new(concurrency));
    let poll = Duration::from_millis(cfg.poll_ms);
    let mut next_purge = Instant::now();
    while !*stop.borrow() {
        if cfg.retention_days > 0 && Instant::now() >= next_purge {
            next_purge = Instant::now() + PURGE_EVERY;
            match purge(&app, cfg.retention_days).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "finished callback events past retention deleted"),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "purging old callback events failed"),
            }
        }
        // The slots first, then the claim: nothing waits between claiming an event and
        // starting its attempt.
        let free = slots.available_permits().max(1);
        let Ok(mut permits) = slots.clone().acquire_many_owned(free as u32).await else {
            return;
        };
        // A stop that came while waiting for a slot: claim nothing more.
        if *stop.borrow() {
            break;
        }
        let idle = match claim(&app, cfg, free).await {
            Ok(due) => {
                let idle = due.is_empty();
                for event in due {
                    let slot = permits.split(1);
                    let (app, client) = (app.clone(), dispatcher.client.clone());
                    tokio::spawn(async move {
                        deliver(&app, &client, event).await;
                        drop(slot);
                    });
                }
                idle
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming due callbacks failed");
                true
            }
        };
        drop(permits);
        if idle {
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                _ = stop.changed() => {}
            }
        }
    }
    // Every slot back: every attempt in flight has ended.
    let _ = slots.acquire_many(concurrency as u32).await;
}

/// The delivery side of callbacks: the HTTP client every attempt goes out through.
pub struct Dispatcher {
    client: reqwest::Client,
}

impl Dispatcher {
    pub fn new(app: &App) -> anyhow::Result<Dispatcher> {
        let cfg = &app.config.callbacks;
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(5_000)))
            // A redirect is the receiver's misconfiguration; following it would post the
            // signed body somewhere the operator never configured.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy from the environment would connect on our behalf to whatever address
            // the name gives it, past the resolver below.
            .no_proxy()
            .user_agent(concat!("cardgate-callbacks/", env!("CARGO_PKG_VERSION")));
        if !cfg.allow_private_targets {
            // Every name is resolved here and connected to only if all its addresses are
            // public: a name that turned private since it was set (DNS rebinding) is refused.
            builder = builder.dns_resolver(Arc::new(target::PublicOnly));
        }
        Ok(Dispatcher {
            client: builder.build()?,
        })
    }

    /// One round: claims the events due now (at most `callbacks.concurrency`) and attempts
    /// each, concurrently, returning when all are done: how many were attempted. Tests
    /// call it instead of waiting for the background loop.
    pub async fn step(&self, app: &App) -> anyhow::Result<usize> {
        let due = claim(app, &app.config.callbacks, app.config.callbacks.concurrency.max(1)).await?;
        let n = due.len();
        futures_util::future::join_all(due.into_iter().map(|e| deliver(app, &self.client, e))).await;
        Ok(n)
    }
}

/// Deletes delivered and failed events created more than `days` ago, with their
/// attempts, a slice at a time so no transaction holds many rows. Pending events stay
/// whatever their age. Events are numbered in the order they were created, so the first
/// one inside the window bounds the scan.
async fn purge(app: &App, days: u32) -> anyhow::Result<u64> {
    let client = app.pg.get().await?;
    let cutoff = app.clock.now() - time::Duration::days(days.into());
    let bound: i64 = client
        .query_opt(
            "SELECT id FROM events WHERE created_at >= $1 ORDER BY id LIMIT 1",
            &[&cutoff],
        )
        .await?
        .map_or(i64::MAX, |r| r.get(0));
    let mut purged = 0;
    loop {
        let n = client
            .execute(
                "WITH doomed AS (
                     SELECT id FROM events WHERE id < $1 AND status <> 'pending' ORDER BY id LIMIT 5000
                 ), attempts AS (
                     DELETE FROM event_deliveries WHERE event_id IN (SELECT id FROM doomed)
                 )
                 DELETE FROM events WHERE id IN (SELECT id FROM doomed)",
                &[&bound],
            )
            .await?;
        purged += n;
        metrics::counter!("cardgate_callback_events_purged_total").increment(n);
        if n < 5000 {
            return Ok(purged);
        }
    }
}

struct Due {
    pk: i64,
    event_id: String,
    kind: String,
    data: serde_json::Value,
    created_at: time::OffsetDateTime,
    attempt: i32,
    reseller_id: String,
    url: Option<String>,
    secret_enc: Vec<u8>,
}

impl Due {
    fn from_row(r: &Row) -> Due {
        Due {
            pk: r.get(0),
            event_id: r.get(1),
            kind: r.get(2),
            data: r.get(3),
            created_at: r.get(4),
            attempt: r.get(5),
            reseller_id: r.get(6),
            url: r.get(7),
            secret_enc: r.get(8),
        }
    }
}

async fn claim(app: &App, cfg: &CallbacksConfig, n: usize) -> anyhow::Result<Vec<Due>> {
    // Long enough for the attempt to end by itself: the request times out first.
    let lease_ms = (cfg.timeout_ms + 30_000) as i64;
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "UPDATE events e SET attempts = e.attempts + 1, next_attempt_at = now() + $2::bigint * interval '1 millisecond'
               FROM resellers r
              WHERE e.id IN (SELECT id FROM events WHERE status = 'pending' AND next_attempt_at <= now()
                              ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                AND r.id = e.reseller_id
             RETURNING e.id, e.event_id, e.type, e.data, e.created_at, e.attempts, r.reseller_id, r.callback_url,
                       r.webhook_secret_enc",
            &[&(n as i64), &lease_ms],
        )
        .await?;
    Ok(rows.iter().map(Due::from_row).collect())
}

/// How one attempt ended.
struct Attempt {
    delivered: bool,
    status_code: Option<i32>,
    error: Option<String>,
    outcome: &'static str,
}

async fn deliver(app: &App, client: &reqwest::Client, event: Due) {
    let started = Instant::now();
    let attempt = post(app, client, &event).await;
    let duration_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
    metrics::counter!("cardgate_callback_attempts_total", "outcome" => attempt.outcome).increment(1);
    let backoff_ms = backoff(&app.config.callbacks, event.attempt).as_millis() as i64;
    let recorded = async {
        let client = app.pg.get().await?;
        let row = client
            .query_opt(
                "WITH attempt AS (
                     INSERT INTO event_deliveries (event_id, attempt, status_code, error, duration_ms)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING)
                 UPDATE events SET
                        status = CASE WHEN $6 THEN 'delivered'
                                      WHEN now() + $7::bigint * interval '1 millisecond' > retry_until THEN 'failed'
                                      ELSE 'pending' END,
                        delivered_at = CASE WHEN $6 THEN now() END,
                        next_attempt_at = now() + $7::bigint * interval '1 millisecond'
                  WHERE id = $1 AND status = 'pending'
                 RETURNING status",
                &[
                    &event.pk,
                    &event.attempt,
                    &attempt.status_code,
                    &attempt.error,
                    &duration_ms,
                    &attempt.delivered,
                    &backoff_ms,
                ],
            )
            .await?;
        anyhow::Ok(row.map(|r| r.get::<_, String>(0)))
    }
    .await;
    match recorded {
        Ok(Some(s)) if s == "failed" => {
            metrics::counter!("cardgate_callbacks_abandoned_total").increment(1);
            tracing::warn!(event_id = %event.event_id, reseller_id = %event.reseller_id,
                           attempts = event.attempt, "callback abandoned after its retry window");
        }
        Ok(_) => {}
        // The lease runs out and the event is tried again: at least once.
        Err(e) => tracing::warn!(event_id = %event.event_id, error = %e, "recording a callback attempt failed"),
    }
}

async fn post(app: &App, client: &reqwest::Client, event: &Due) -> Attempt {
    let failed = |outcome, error: String| Attempt {
        delivered: false,
        status_code: None,
        error: Some(error),
        outcome,
    };
    let Some(url) = &event.url else {
        return failed("error", "the reseller has no callback_url".into());
    };
    let secret = match app.crypto.decrypt(
        Purpose::WebhookSecret {
            reseller_id: &event.reseller_id,
        },
        &event.secret_enc,
    ) {
        Ok(s) => s,
        Err(_) => return failed("error", "the webhook secret could not be decrypted".into()),
    };
    // reqwest calls no resolver for an IP-literal host, so those are judged here.
    if !app.config.callbacks.allow_private_targets {
        if let Err(refused) = reqwest::Url::parse(url).map_or(Ok(None), |u| target::check_host(&u)) {
            return failed("refused", refused.to_string());
        }
    }
    let body = super::envelope(&event.event_id, &event.kind, event.created_at, &event.data);
    let t = app.clock.now_unix_secs();
    let sent = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("cg-signature", super::signature(&secret, t, &body))
        .header("cg-event-id", &event.event_id)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => Attempt {
            delivered: true,
            status_code: Some(resp.status().as_u16() as i32),
            error: None,
            outcome: "delivered",
        },
        Ok(resp) => {
            let status = resp.status();
            let text = answer_start(resp).await;
            Attempt {
                delivered: false,
                status_code: Some(status.as_u16() as i32),
                error: (!text.is_empty()).then_some(text),
                outcome: "http_error",
            }
        }
        Err(e) => match refusal(&e) {
            Some(refused) => failed("refused", refused.to_string()),
            // Without the URL: its query string may hold the merchant's own token.
            None if e.is_timeout() => failed("timeout", e.without_url().to_string()),
            None => failed("error", e.without_url().to_string()),
        },
    }
}

/// The guard's refusal, when that is why a request failed: reqwest reports it only as
/// the source of a connect error.
fn refusal(e: &reqwest::Error) -> Option<&Refused> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Refused>() {
            return Some(r);
        }
        cause = c.source();
    }
    None
}

/// The start of a refusing receiver's body, as text fit to store: at most
/// `RECEIVER_ANSWER_READ_MAX_BYTES` are read, then the response is dropped, which closes
/// the connection rather than draining the rest into memory or the pool.
async fn answer_start(mut resp: reqwest::Response) -> String {
    let mut head = Vec::with_capacity(RECEIVER_ANSWER_READ_MAX_BYTES);
    while head.len() < RECEIVER_ANSWER_READ_MAX_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = RECEIVER_ANSWER_READ_MAX_BYTES - head.len();
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            // A body that ends early or breaks off: what came is what is kept.
            Ok(None) | Err(_) => break,
        }
    }
    drop(resp);
    // Postgres text holds no NUL, and control characters make a poor log line.
    let mut text: String = String::from_utf8_lossy(&head)
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect();
    truncate(&mut text, ERROR_TEXT_MAX_BYTES);
    text
}

/// Delay after the `attempt`th failure: `backoff_base_ms` doubling up to `backoff_max_ms`,
/// less up to a fifth at random, so that a receiver coming back is not hit by every
/// event at the same instant.
pub fn backoff(cfg: &CallbacksConfig, attempt: i32) -> Duration {
    let doublings = attempt.clamp(1, 31) as u32 - 1;
    let ms = cfg
        .backoff_base_ms
        .saturating_mul(1u64 << doublings)
        .min(cfg.backoff_max_ms);
    let jitter = rand::thread_rng().gen_range(0..=ms / 5);
    Duration::from_millis(ms - jitter)
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let cut = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        let cfg = CallbacksConfig {
            timeout_ms: 1000,
            concurrency: 1,
            poll_ms: 100,
            backoff_base_ms: 10_000,
            backoff_max_ms: 3_600_000,
            retention_days: 30,
            allow_private_targets: false,
        };
        for (attempt, full) in [
            (1, 10_000),
            (2, 20_000),
            (5, 160_000),
            (12, 3_600_000),
            (1000, 3_600_000),
        ] {
            let d = backoff(&cfg, attempt).as_millis() as u64;
            assert!((full - full / 5..=full).contains(&d), "attempt {attempt}: {d} ms");
        }
    }
}
