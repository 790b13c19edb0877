//! Bulkheads: heavy operator work (reports, searches, imports) runs a bounded number at a
//! time per gateway, so that no volume of it can take the CPU or Postgres from orders
//! (docs/invariants.md invariant 9). Past the bound the answer is `503 overloaded` at once, with
//! `Retry-After`: queueing would only hold connections and memory for work that is
//! already too much.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::AdminConfig;
use crate::error::ApiError;

/// One class of bounded work.
pub struct Bulkhead {
    name: &'static str,
    slots: Arc<Semaphore>,
}

impl Bulkhead {
    pub fn new(name: &'static str, slots: usize) -> Self {
        Bulkhead {
            name,
            slots: Arc::new(Semaphore::new(slots)),
        }
    }

    /// A slot for as long as the permit lives, or `503 overloaded` when all are taken.
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("cardgate_bulkhead_refused_total", "work" => self.name).increment(1);
            ApiError::Overloaded { retry_after_secs: 1 }
        })
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
        Bulkheads {
            reports: Bulkhead::new("reports", cfg.report_concurrency),
            imports: Bulkhead::new("imports", cfg.import_concurrency),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_its_slots_and_frees_them_with_the_permit() {
        let b = Bulkhead::new("t", 2);
        let one = b.enter().unwrap();
        let _two = b.enter().unwrap();
        assert!(matches!(b.enter(), Err(ApiError::Overloaded { retry_after_secs: 1 })));
        drop(one);
        assert!(b.enter().is_ok());
    }
}
