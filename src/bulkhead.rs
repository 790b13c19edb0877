//! Bulkheads: heavy operator work (reports, searches, imports) runs a bounded number at a
//! time per gateway, so that no volume of it can take the CPU or Postgres from orders
//! (docs/invariants.md invariant 9). A few more callers may wait a bounded time for a
//! turn, so two operators (or a script's parallel calls) are served one after the other
//! rather than one of them refused; past that queue, or that wait, the answer is `503
//! overloaded` with `Retry-After`. The queue is short on purpose: a longer one would only
//! hold connections for work that is already too much.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::AdminConfig;
use crate::error::ApiError;

/// One class of bounded work.
pub struct Bulkhead {
    name: &'static str,
    slots: Arc<Semaphore>,
    /// Places to wait for a slot: a permit rather than a counter, so a caller that goes
    /// away while it waits (its client gone, the gateway stopping) gives its place back.
    queue: Arc<Semaphore>,
    wait: Duration,
}

impl Bulkhead {
    pub fn new(name: &'static str, slots: usize, queue: usize, wait: Duration) -> Self {
        Bulkhead {
            name,
            slots: Arc::new(Semaphore::new(slots)),
            queue: Arc::new(Semaphore::new(queue)),
            wait,
        }
    }

    /// A slot for as long as the permit lives; `503 overloaded` when every slot is taken
    /// and the queue is full, or no slot came free within the wait.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let Ok(_place) = self.queue.clone().try_acquire_owned() else {
            return Err(self.refused());
        };
        match tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(self.refused()),
        }
    }

    fn refused(&self) -> ApiError {
        metrics::counter!("cardgate_bulkhead_refused_total", "work" => self.name).increment(1);
        ApiError::Overloaded { retry_after_secs: 1 }
    }
}

pub struct Bulkheads {
    /// Reports, reconciliation, order and audit searches (and their CSV).
    pub reports: Bulkhead,
    /// Code imports and voids.
    pub imports: Bulkhead,
}

impl Bulkheads {
    pub fn new(cfg: &AdminConfig) -> Self {
        let wait = Duration::from_millis(cfg.heavy_work_wait_ms);
        Bulkheads {
            reports: Bulkhead::new("reports", cfg.report_concurrency, cfg.heavy_work_queue, wait),
            imports: Bulkhead::new("imports", cfg.import_concurrency, cfg.heavy_work_queue, wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_its_slots_a_caller_waits_in_a_short_queue_and_is_refused_past_it() {
        let wait = Duration::from_millis(200);
        let b = Arc::new(Bulkhead::new("t", 2, 1, wait));
        let one = b.enter().await.unwrap();
        let _two = b.enter().await.unwrap();
        // The third waits for a slot; a fourth finds the queue full and is refused at once.
        let third = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.enter().await.map(drop) }
        });
        while b.queue.available_permits() == 1 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            b.enter().await,
            Err(ApiError::Overloaded { retry_after_secs: 1 })
        ));
        drop(one);
        assert!(
            third.await.unwrap().is_ok(),
            "a slot freed within the wait goes to the caller waiting"
        );
        // Nobody frees a slot: the waiter is refused when the wait is over, and leaves the
        // queue to the next.
        let _three = b.enter().await.unwrap();
        let waited = std::time::Instant::now();
        assert!(matches!(b.enter().await, Err(ApiError::Overloaded { .. })));
        assert!(waited.elapsed() >= wait, "{:?}", waited.elapsed());
        assert_eq!(b.queue.available_permits(), 1);
        // A caller that goes away while it waits gives its place back.
        let gone = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.enter().await.map(drop) }
        });
        while b.queue.available_permits() == 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        assert_eq!(
            b.queue.available_permits(),
            1,
            "the place of a caller gone is free again"
        );
    }
}
