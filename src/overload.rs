//! VIP priority under overload (DESIGN.md): when orders pile up, the lowest tiers are
//! refused first with `503 overloaded`, so the top tier keeps its latency.
//!
//! The signal is the number of this process's order requests in flight (a batch is one):
//! admitted and not yet answered, which includes the wait for the ledger's commit. By Little's law it is the
//! arrival rate times the latency, so it rises both when too many orders arrive and when
//! Redis or Postgres slow down, and it reacts at once, unlike a latency average. Each tier
//! below the top has a share of `max_in_flight_orders` by its rank in `priority`: with
//! four tiers the lowest is refused from a third of it, the next from two thirds, the
//! third from all of it. The top tier is never refused here: what is shed makes room for
//! it, and its own volume is bounded by its rate limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Tier;
use crate::error::ApiError;

pub struct Admission {
    in_flight: AtomicUsize,
    /// Tier name -> in-flight count from which its orders are refused; absent: never.
    thresholds: HashMap<String, usize>,
}

/// Held while an order is in flight; dropping it ends the order.
pub struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("cardgate_orders_in_flight").decrement(1.0);
    }
}

impl Admission {
    pub fn new<'a>(tiers: impl IntoIterator<Item = (&'a String, &'a Tier)>, max_in_flight: usize) -> Admission {
        let tiers: Vec<(&String, u32)> = tiers.into_iter().map(|(n, t)| (n, t.priority)).collect();
        let mut ranks: Vec<u32> = tiers.iter().map(|(_, p)| *p).collect();
        ranks.sort_unstable();
        ranks.dedup();
        let top = ranks.len().saturating_sub(1);
        let thresholds = tiers
            .into_iter()
            .filter_map(|(name, priority)| {
                let rank = ranks.iter().position(|p| *p == priority)?;
                (rank < top).then(|| (name.clone(), (max_in_flight * (rank + 1) / top).max(1)))
            })
            .collect();
        Admission {
            in_flight: AtomicUsize::new(0),
            thresholds,
        }
    }

    /// Admits one order request (single or batch) of `tier`, or refuses it when the gateway is too busy for that tier.
    pub fn admit(&self, tier: &str) -> Result<Slot<'_>, ApiError> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if self.thresholds.get(tier).is_some_and(|limit| before >= *limit) {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("cardgate_orders_shed_total", "tier" => tier.to_owned()).increment(1);
            metrics::counter!("cardgate_orders_total", "outcome" => "overloaded", "tier" => tier.to_owned())
                .increment(1);
            return Err(ApiError::Overloaded { retry_after_secs: 1 });
        }
        metrics::gauge!("cardgate_orders_in_flight").increment(1.0);
        Ok(Slot(&self.in_flight))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(priority: u32) -> Tier {
        Tier {
            priority,
            orders_per_second: 1,
            orders_burst: 1,
            reads_per_second: 1,
            reads_burst: 1,
            max_quantity: 1,
            max_batch: 1,
        }
    }

    fn admission(tiers: &[(&str, u32)], max: usize) -> Admission {
        let tiers: Vec<(String, Tier)> = tiers.iter().map(|(n, p)| (n.to_string(), tier(*p))).collect();
        Admission::new(tiers.iter().map(|(n, t)| (n, t)), max)
    }

    #[test]
    fn lower_tiers_are_refused_first_and_the_top_tier_never() {
        let a = admission(&[("standard", 10), ("silver", 20), ("gold", 30), ("diamond", 40)], 6);
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(a.admit("standard").expect("below a third"));
        }
        assert!(matches!(a.admit("standard"), Err(ApiError::Overloaded { .. })));
        held.push(a.admit("silver").unwrap());
        held.push(a.admit("silver").unwrap());
        assert!(matches!(a.admit("silver"), Err(ApiError::Overloaded { .. })));
        held.push(a.admit("gold").unwrap());
        held.push(a.admit("gold").unwrap());
        assert!(matches!(a.admit("gold"), Err(ApiError::Overloaded { .. })));
        for _ in 0..100 {
            held.push(a.admit("diamond").expect("the top tier is not shed"));
        }
        assert_eq!(a.in_flight(), 106);
        held.clear();
        assert_eq!(a.in_flight(), 0, "refusals and finished orders give their slot back");
        assert!(a.admit("standard").is_ok());
    }

    #[test]
    fn equal_priorities_share_a_rank_and_one_tier_is_never_shed() {
        let a = admission(&[("a", 1), ("b", 1), ("top", 5)], 3);
        let _x = (a.admit("a").unwrap(), a.admit("b").unwrap(), a.admit("a").unwrap());
        assert!(a.admit("b").is_err() && a.admit("a").is_err());
        let solo = admission(&[("only", 1)], 1);
        let _held: Vec<_> = (0..10).map(|_| solo.admit("only").unwrap()).collect();
    }
}
