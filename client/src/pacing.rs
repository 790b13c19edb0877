//! Client-side pacing: a token bucket at `--rate` orders per second, plus the pauses the
//! server asks for (`Retry-After`, `RateLimit-Remaining: 0`).
//!
//! Pacing on our side keeps most requests from being refused at all: a refused batch
//! costs a round trip and, with the gateway's all-or-nothing batch tokens, delays every
//! order in it. The bucket only computes waits from the instants it is given, so tests
//! drive it with made-up instants instead of sleeping.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Longest pause taken on the server's word: a wrong or hostile header must not park a
/// reseller's script for hours. Longer answers are treated as this.
pub const SERVER_PAUSE_MAX: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub struct TokenBucket {
    rate_per_sec: f64,
    capacity: f64,
    /// May go negative: a batch larger than what is available is taken at once and paid
    /// back over time, so a batch bigger than the bucket still goes out (after its wait).
    tokens: f64,
    updated: Instant,
    /// No request before this instant, whatever the tokens say (the server's pauses).
    not_before: Instant,
}

impl TokenBucket {
    /// Starts full, with one second's worth of orders (at least one token) as its burst.
    pub fn new(rate_per_sec: f64, now: Instant) -> TokenBucket {
        let rate_per_sec = if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            1.0
        };
        let capacity = rate_per_sec.max(1.0);
        TokenBucket {
            rate_per_sec,
            capacity,
            tokens: capacity,
            updated: now,
            not_before: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// Takes `n` tokens and says how long to wait before sending them. Reserving at once
    /// (rather than waiting and re-checking) keeps the arithmetic in one place.
    pub fn reserve(&mut self, n: u32, now: Instant) -> Duration {
        self.refill(now);
        let until_paused = self.not_before.saturating_duration_since(now);
        // Tokens accrue during a server pause too; they are only spendable after it.
        let tokens_at_resume = (self.tokens + until_paused.as_secs_f64() * self.rate_per_sec).min(self.capacity);
        let deficit = f64::from(n) - tokens_at_resume;
        self.tokens -= f64::from(n);
        if deficit <= 0.0 {
            until_paused
        } else {
            until_paused + Duration::from_secs_f64(deficit / self.rate_per_sec)
        }
    }

    /// Gives back tokens taken for a batch that was refused whole (nothing was spent on
    /// the server), so that its retry is not charged twice.
    pub fn refund(&mut self, n: u32, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + f64::from(n)).min(self.capacity);
    }

    /// The server asked for a pause: nothing goes out before `now + pause`, and the
    /// bucket restarts empty from there so the end of the pause is not a burst.
    pub fn pause(&mut self, pause: Duration, now: Instant) {
        self.refill(now);
        let until = now + pause.min(SERVER_PAUSE_MAX);
        if until > self.not_before {
            self.not_before = until;
        }
        // Empty at `until`: the tokens that would accrue during the pause are owed.
        let owed = self.not_before.saturating_duration_since(now).as_secs_f64() * self.rate_per_sec;
        self.tokens = self.tokens.min(-owed);
    }

    /// How long until the server's pause ends (zero if none).
    pub fn paused_for(&self, now: Instant) -> Duration {
        self.not_before.saturating_duration_since(now)
    }
}

/// `Retry-After` plus up to a quarter of it (at least 250 ms, at most 5 s) of random
/// extra, never less than asked: many scripts refused in the same second must not all
/// come back in the same millisecond.
pub fn retry_after_with_jitter(retry_after: Duration, rng: &mut impl Rng) -> Duration {
    let retry_after = retry_after.min(SERVER_PAUSE_MAX);
    let spread = (retry_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    retry_after + spread.mul_f64(rng.gen_range(0.0..=1.0))
}

/// Exponential backoff for failures the server did not time for us (transport errors,
/// 5xx without `Retry-After`): half fixed, half random, doubling per attempt from
/// `BACKOFF_BASE` up to `BACKOFF_MAX`.
pub fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    const BACKOFF_BASE: Duration = Duration::from_millis(250);
    const BACKOFF_MAX: Duration = Duration::from_secs(30);
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let ceiling = exp.min(BACKOFF_MAX);
    ceiling / 2 + (ceiling / 2).mul_f64(rng.gen_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_micros(10)
    }

    #[test]
    fn a_full_bucket_sends_its_burst_then_paces_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(20.0, t0);
        // One second of orders goes at once.
        assert_eq!(b.reserve(20, t0), Duration::ZERO);
        // Then each batch waits for its own tokens: 10 orders at 20/s is half a second.
        assert!(close(b.reserve(10, t0), ms(500)));
        // Reservations queue up behind each other.
        assert!(close(b.reserve(10, t0), ms(1000)));
        // Time passing pays the debt back.
        assert!(close(b.reserve(10, t0 + ms(1000)), ms(500)));
    }

    #[test]
    fn a_batch_larger_than_the_bucket_still_goes_after_its_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5.0, t0);
        assert!(close(b.reserve(50, t0), Duration::from_secs(9)));
    }

    #[test]
    fn idle_time_refills_only_up_to_the_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, t0);
        assert_eq!(b.reserve(10, t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.reserve(10, later), Duration::ZERO);
        assert!(close(b.reserve(1, later), ms(100)));
    }

    #[test]
    fn a_server_pause_holds_everything_and_restarts_empty() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, t0);
        b.pause(Duration::from_secs(2), t0);
        assert_eq!(b.paused_for(t0), Duration::from_secs(2));
        // Even with a full bucket before the pause, the first orders after it wait for
        // the pause, then for their own tokens.
        assert!(close(b.reserve(5, t0), ms(2500)));
        // A shorter pause never shortens a longer one.
        b.pause(ms(100), t0 + ms(10));
        assert_eq!(b.paused_for(t0 + ms(10)), ms(1990));
    }

    #[test]
    fn a_refused_batch_gets_its_tokens_back() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, t0);
        assert_eq!(b.reserve(10, t0), Duration::ZERO);
        b.refund(10, t0);
        assert_eq!(b.reserve(10, t0), Duration::ZERO);
    }

    #[test]
    fn server_pauses_are_bounded() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, t0);
        b.pause(Duration::from_secs(86_400), t0);
        assert_eq!(b.paused_for(t0), SERVER_PAUSE_MAX);
    }

    #[test]
    fn jitter_never_goes_below_retry_after_and_stays_bounded() {
        let mut rng = StdRng::seed_from_u64(7);
        for secs in [1, 2, 10, 100, 100_000] {
            let ra = Duration::from_secs(secs);
            for _ in 0..100 {
                let w = retry_after_with_jitter(ra, &mut rng);
                let asked = ra.min(SERVER_PAUSE_MAX);
                assert!(w >= asked && w <= asked + Duration::from_secs(5), "{secs}: {w:?}");
            }
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 1..=40u32 {
            let ceiling = (ms(250) * 2u32.pow(attempt.min(20) - 1)).min(Duration::from_secs(30));
            let w = backoff(attempt, &mut rng);
            assert!(w >= ceiling / 2 && w <= ceiling, "attempt {attempt}: {w:?}");
        }
    }
}
