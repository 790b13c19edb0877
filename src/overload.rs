//! VIP priority under overload (docs/operations.md): when orders pile up, the lowest tiers are
//! refused first with `503 overloaded`, so the top tier keeps its latency.
//!
//! The signal is the number of this process's order requests in flight (a batch is one):
//! admitted and not yet answered, which includes the wait for the ledger's commit. By
//! Little's law it is the arrival rate times the latency, so it rises both when too many
//! orders arrive and when Redis or Postgres slow down, and it reacts at once.
//!
//! Bursts are not overload: the gateway starts shedding only once the count has stayed at
//! or above half of `max_in_flight_orders` for `standing_ms` (a standing queue, as CoDel
//! tells one from a burst), and stops only once it has stayed below that for as long.
//! Group commits make the count a sawtooth (a commit answers its whole batch at once), so
//! a gateway that stopped at the first dip would admit every tier again until the queue
//! had stood once more, a flood every time. While shedding, each tier below the top is
//! refused from its share of `max_in_flight_orders` by its rank in `priority`: with four
//! tiers the lowest from a third of it, the next from two thirds, the third from all of
//! it. The top tier is never refused here: what is shed makes room for it, and its own
//! volume is bounded by its rate limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Tier;
use crate::error::ApiError;

/// `above_since` or `below_since` while the count is on the other side of the floor.
const NEVER: u64 = u64::MAX;

pub struct Admission {
    in_flight: Arc<AtomicUsize>,
    /// Tier name -> in-flight count from which its orders are refused; absent: never.
    thresholds: HashMap<String, usize>,
    state: Arc<Standing>,
}

/// Whether the gateway is shedding, and since when (µs after `epoch`) the count has been at
/// or above `floor`, or below it.
struct Standing {
    floor: usize,
    epoch: Instant,
    above_since: AtomicU64,
    below_since: AtomicU64,
    shedding: AtomicBool,
    standing: u64,
}

impl Standing {
    fn new(floor: usize, standing: Duration) -> Standing {
        Standing {
            floor,
            epoch: Instant::now(),
            above_since: AtomicU64::new(NEVER),
            // Idle since the start: a standing queue, not the first dip, ends shedding.
            below_since: AtomicU64::new(0),
            shedding: AtomicBool::new(false),
            standing: standing.as_micros() as u64,
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn observe(&self, count: usize) {
        self.observe_at(count, self.now());
    }

    fn saturated(&self) -> bool {
        self.saturated_at(self.now())
    }

    fn observe_at(&self, count: usize, now: u64) {
        let (side, other) = if count < self.floor {
            (&self.below_since, &self.above_since)
        } else {
            (&self.above_since, &self.below_since)
        };
        other.store(NEVER, Ordering::Relaxed);
        if side.load(Ordering::Relaxed) == NEVER {
            let _ = side.compare_exchange(NEVER, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Shedding starts once the count has stood at or above the floor for `standing`, and
    /// stops once it has stood below it as long.
    fn saturated_at(&self, now: u64) -> bool {
        let stood = |since: &AtomicU64| {
            let since = since.load(Ordering::Relaxed);
            since != NEVER && now >= since.saturating_add(self.standing)
        };
        let shedding = self.shedding.load(Ordering::Relaxed);
        let flip = if shedding {
            stood(&self.below_since)
        } else {
            stood(&self.above_since)
        };
        if flip {
            // Whoever flips first decides; a caller that lost the race reads the outcome.
            return match self
                .shedding
                .compare_exchange(shedding, !shedding, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => !shedding,
                Err(now_shedding) => now_shedding,
            };
        }
        shedding
    }
}

/// Held while an order request is in flight; dropping it ends the request.
pub struct Slot {
    in_flight: Arc<AtomicUsize>,
    state: Arc<Standing>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let after = self.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        self.state.observe(after);
        metrics::gauge!("cardgate_orders_in_flight").decrement(1.0);
    }
}

impl Admission {
    pub fn new<'a>(
        tiers: impl IntoIterator<Item = (&'a String, &'a Tier)>,
        max_in_flight: usize,
        standing: Duration,
    ) -> Admission {
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
            in_flight: Arc::new(AtomicUsize::new(0)),
            thresholds,
            state: Arc::new(Standing::new((max_in_flight / 2).max(1), standing)),
        }
    }

    /// Admits one order request (single or batch) of `tier`, or refuses it when the
    /// gateway is saturated and `tier`'s share is taken.
    pub fn admit(&self, tier: &str) -> Result<Slot, ApiError> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        // Asked on every admission, whatever the tier, so that shedding also ends when no
        // order over its share comes along to ask.
        let saturated = self.state.saturated();
        let over_share = self.thresholds.get(tier).is_some_and(|limit| before >= *limit);
        if over_share && saturated {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("cardgate_orders_shed_total", "tier" => tier.to_owned()).increment(1);
            metrics::counter!("cardgate_orders_total", "outcome" => "overloaded", "tier" => tier.to_owned())
                .increment(1);
            return Err(ApiError::Overloaded { retry_after_secs: 1 });
        }
        self.state.observe(before + 1);
        metrics::gauge!("cardgate_orders_in_flight").increment(1.0);
        Ok(Slot {
            in_flight: self.in_flight.clone(),
            state: self.state.clone(),
        })
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
            upgrade_spend: None,
        }
    }

    fn admission(tiers: &[(&str, u32)], max: usize, standing: Duration) -> Admission {
        let tiers: Vec<(String, Tier)> = tiers.iter().map(|(n, p)| (n.to_string(), tier(*p))).collect();
        Admission::new(tiers.iter().map(|(n, t)| (n, t)), max, standing)
    }

    const TIERS: &[(&str, u32)] = &[("standard", 10), ("silver", 20), ("gold", 30), ("diamond", 40)];

    #[test]
    fn a_burst_is_admitted_whole() {
        let a = admission(TIERS, 6, Duration::from_secs(3600));
        let held: Vec<_> = (0..20)
            .map(|_| a.admit("standard").expect("no standing queue yet"))
            .collect();
        assert_eq!(a.in_flight(), 20);
        drop(held);
        assert_eq!(a.in_flight(), 0);
    }

    #[test]
    fn with_a_standing_queue_lower_tiers_are_refused_first_and_the_top_tier_never() {
        let a = admission(TIERS, 6, Duration::ZERO);
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(a.admit("standard").expect("below a third"));
        }
        // 2 in flight is below the floor (3): a queue that small is not saturation.
        held.push(a.admit("standard").expect("not saturated"));
        assert!(matches!(a.admit("standard"), Err(ApiError::Overloaded { .. })));
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
        assert_eq!(a.in_flight(), 0, "refusals and finished requests give their slot back");
        assert!(a.admit("standard").is_ok(), "the queue drained: no longer saturated");
    }

    #[test]
    fn shedding_outlasts_the_dips_of_a_standing_queue_and_ends_once_it_has_drained() {
        const MS: u64 = 1_000;
        let s = Standing::new(32, Duration::from_millis(100));
        s.observe_at(40, 0);
        assert!(!s.saturated_at(99 * MS), "a burst shorter than standing_ms is admitted");
        assert!(s.saturated_at(100 * MS), "a queue that stood 100 ms is overload");
        // A commit answers its batch at once: the count dips, then the queue is back.
        s.observe_at(5, 110 * MS);
        assert!(s.saturated_at(111 * MS), "one dip does not end shedding");
        s.observe_at(50, 150 * MS);
        s.observe_at(10, 160 * MS);
        assert!(s.saturated_at(259 * MS), "below the floor for 99 ms: still shedding");
        assert!(!s.saturated_at(260 * MS), "below it for 100 ms: drained");
        s.observe_at(40, 300 * MS);
        assert!(
            !s.saturated_at(350 * MS),
            "back above it: a new standing_ms before shedding again"
        );
        assert!(s.saturated_at(400 * MS));
    }

    #[test]
    fn shedding_ends_once_the_queue_has_drained_whichever_tier_comes_next() {
        // Floor 2 (half of 4); the lower tiers' shares: 1, 2, 4.
        let a = admission(TIERS, 4, Duration::from_millis(30));
        let held: Vec<_> = (0..4).map(|_| a.admit("diamond").unwrap()).collect();
        std::thread::sleep(Duration::from_millis(40));
        assert!(a.admit("gold").is_err(), "a queue that stood: shedding");
        drop(held);
        std::thread::sleep(Duration::from_millis(40));
        // Only gold asks, from below its share: the drained queue still ends shedding, and a
        // burst after it is admitted whole, as a burst.
        let burst: Vec<_> = (0..6)
            .map(|_| a.admit("gold").expect("drained: a burst is admitted"))
            .collect();
        assert_eq!(burst.len(), 6);
    }

    #[test]
    fn equal_priorities_share_a_rank_and_one_tier_is_never_shed() {
        let a = admission(&[("a", 1), ("b", 1), ("top", 5)], 3, Duration::ZERO);
        let _x = (a.admit("a").unwrap(), a.admit("b").unwrap(), a.admit("a").unwrap());
        assert!(a.admit("b").is_err() && a.admit("a").is_err());
        let solo = admission(&[("only", 1)], 1, Duration::ZERO);
        let _held: Vec<_> = (0..10).map(|_| solo.admit("only").unwrap()).collect();
    }
}
