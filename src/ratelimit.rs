//! Per-reseller rate limits by VIP tier, reads and order writes apart.
//!
//! The limit is held across every gateway together by one GCRA bucket per reseller and
//! class in Redis ([`global`]), which decides every answer and its `RateLimit-*` headers.
//! In front of it each gateway keeps a local shield at the tier's own rate and burst
//! (governor's GCRA, [`RateLimits`]): one gateway can never rightly take more than the
//! whole bucket, so a request its shield refuses is almost surely over the limit, and is
//! settled in Redis at once by a small script, before the handler's work (a flood of
//! orders never reaches the order path). The shield never answers on its own: it counts
//! requests the global bucket refused too (others took the tokens first), so it can be
//! emptier than the bucket, and then the bucket's answer, not the shield's, is given.
//!
//! One keyed limiter per (tier, class), keyed by reseller: a reseller moved to another
//! tier is simply looked up in that tier's limiter, so tier changes apply without a
//! restart. Keys idle long enough to be full again are swept periodically.

pub mod global;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::Tier;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Reads,
    Writes,
}

type Limiter<C> = RateLimiter<i64, DashMapStateStore<i64>, C, StateInformationMiddleware>;

/// What the `RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed(Headers),
    /// Refused: retry after this many whole seconds (at least 1).
    Refused {
        headers: Headers,
        retry_after_secs: u64,
    },
}

impl Outcome {
    pub fn headers(self) -> Headers {
        match self {
            Outcome::Allowed(h) | Outcome::Refused { headers: h, .. } => h,
        }
    }
}

/// One bucket kind of one tier: the keyed limiter, its rate and its burst.
struct Bucket<C: Clock> {
    limiter: Limiter<C>,
    rate: u32,
    burst: u32,
}

pub struct RateLimits<C: Clock = DefaultClock> {
    /// Keyed by tier name, so a request looks its tier up by `&str` without allocating.
    tiers: HashMap<String, [Bucket<C>; 2]>,
    clock: C,
}

impl Class {
    fn index(self) -> usize {
        match self {
            Class::Reads => 0,
            Class::Writes => 1,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Class::Reads => "reads",
            Class::Writes => "writes",
        }
    }
}

/// A tier's `(rate per second, burst)` for one class: the one reading of the config,
/// for the local shield and the global bucket alike.
pub fn quota(t: &Tier, class: Class) -> (u32, u32) {
    match class {
        Class::Reads => (t.reads_per_second, t.reads_burst),
        Class::Writes => (t.orders_per_second, t.orders_burst),
    }
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v.max(1)).unwrap_or(NonZeroU32::MIN)
}

impl RateLimits<DefaultClock> {
    pub fn new<'a>(tiers: impl IntoIterator<Item = (&'a String, &'a Tier)>) -> Self {
        Self::with_clock(tiers, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    pub fn with_clock<'a>(tiers: impl IntoIterator<Item = (&'a String, &'a Tier)>, clock: C) -> Self {
        let bucket = |rate: u32, burst: u32| {
            let quota = Quota::per_second(nz(rate)).allow_burst(nz(burst));
            let limiter: Limiter<C> = RateLimiter::<
                i64,
                DashMapStateStore<i64>,
                C,
                governor::middleware::NoOpMiddleware<C::Instant>,
            >::new(quota, DashMapStateStore::default(), clock.clone())
            .with_middleware::<StateInformationMiddleware>();
            Bucket {
                limiter,
                rate: rate.max(1),
                burst: burst.max(1),
            }
        };
        let tiers = tiers
            .into_iter()
            .map(|(name, t)| {
                (
                    name.clone(),
                    [Class::Reads, Class::Writes].map(|c| {
                        let (rate, burst) = quota(t, c);
                        bucket(rate, burst)
                    }),
                )
            })
            .collect();
        RateLimits { tiers, clock }
    }

    /// Takes `n` tokens for `reseller` (all or none), or says when to retry. An unknown
    /// tier is not limited: config validation makes every reseller's tier known.
    pub fn check(&self, tier: &str, class: Class, reseller: i64, n: u32) -> Option<Outcome> {
        let Bucket { limiter, rate, burst } = &self.tiers.get(tier)?[class.index()];
        let full_in = |remaining: u32| ((burst - remaining.min(*burst)) as u64).div_ceil(*rate as u64);
        let refused = |wait: Duration, remaining: u32| Outcome::Refused {
            headers: Headers {
                limit: *burst,
                remaining,
                reset_secs: full_in(remaining).max(1),
            },
            retry_after_secs: (wait.as_millis() as u64).div_ceil(1000).max(1),
        };
        Some(match limiter.check_key_n(&reseller, nz(n)) {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity();
                Outcome::Allowed(Headers {
                    limit: *burst,
                    remaining,
                    reset_secs: full_in(remaining),
                })
            }
            Ok(Err(not_until)) => refused(not_until.wait_time_from(self.clock.now()), 0),
            // More than the burst can ever hold: no wait helps; say a full bucket's time.
            Err(_) => refused(Duration::from_secs(full_in(0).max(1)), 0),
        })
    }

    /// Forgets resellers whose buckets are full again, bounding memory by recent callers.
    pub fn sweep(&self) {
        for bucket in self.tiers.values().flatten() {
            bucket.limiter.retain_recent();
            bucket.limiter.shrink_to_fit();
        }
    }

    pub fn tracked_keys(&self) -> usize {
        self.tiers.values().flatten().map(|b| b.limiter.len()).sum()
    }
}

/// Addresses an [`AddressLimiter`] tracks before it forgets those whose bucket is full
/// again on the next check, bounding its memory under a flood from many addresses
/// (each entry is tens of bytes) between the periodic sweeps.
const ADDRESS_LIMITER_KEYS_MAX: usize = 100_000;

type AddressLimiterInner<C> =
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, C, governor::middleware::NoOpMiddleware<<C as Clock>::Instant>>;

/// A GCRA bucket per client address, for logins, which must refuse a flood before doing
/// any work. Every attempt takes a token before its body is read, so neither a wave of
/// concurrent attempts nor clients that hang up mid-way get past it; a sign-in gives its
/// token back as a credit the address spends when its bucket is empty (governor cannot
/// return a token), so an operator, or a script that signs in often, is never refused
/// for signing in. An IPv6 client usually holds a whole /64, so one counts as one
/// address: otherwise it could take a fresh bucket for every request.
pub struct AddressLimiter<C: Clock = DefaultClock> {
    limiter: AddressLimiterInner<C>,
    /// Sign-ins not yet spent again, per address, with when the last was given: at most
    /// the burst, forgotten once the bucket would be full again anyway.
    credits: std::sync::Mutex<HashMap<IpAddr, (u32, C::Instant)>>,
    burst: u32,
    /// How long an empty bucket takes to fill.
    refill: Duration,
    clock: C,
}

impl AddressLimiter<DefaultClock> {
    pub fn per_minute(rate: u32, burst: u32) -> Self {
        Self::with_clock(rate, burst, DefaultClock::default())
    }
}

impl<C: Clock + Clone> AddressLimiter<C> {
    pub fn with_clock(per_minute: u32, burst: u32, clock: C) -> Self {
        let quota = Quota::per_minute(nz(per_minute)).allow_burst(nz(burst));
        AddressLimiter {
            limiter: RateLimiter::new(quota, DashMapStateStore::default(), clock.clone()),
            credits: Default::default(),
            burst: burst.max(1),
            refill: quota.replenish_interval() * burst.max(1),
            clock,
        }
    }

    /// Takes one token (or a credit) for an attempt from `ip`, or says how many whole
    /// seconds (at least 1) to wait.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        if self.limiter.len() >= ADDRESS_LIMITER_KEYS_MAX {
            self.limiter.retain_recent();
        }
        let key = crate::http::per_client::client_key(ip);
        self.limiter.check_key(&key).or_else(|not_until| {
            let now = self.clock.now();
            if let Some((n, _)) = self.credits().get_mut(&key).filter(|c| self.usable(c, now)) {
                *n -= 1;
                return Ok(());
            }
            Err((not_until.wait_time_from(now).as_millis() as u64).div_ceil(1000).max(1))
        })
    }

    /// An attempt from `ip` signed in: its token comes back, as a credit.
    pub fn signed_in(&self, ip: IpAddr) {
        let now = self.clock.now();
        let mut credits = self.credits();
        if credits.len() >= ADDRESS_LIMITER_KEYS_MAX {
            self.forget_spent(&mut credits, now);
        }
        let c = credits
            .entry(crate::http::per_client::client_key(ip))
            .or_insert((0, now));
        *c = ((c.0 + 1).min(self.burst), now);
    }

    fn credits(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, C::Instant)>> {
        self.credits.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A credit left and younger than a refill. An older one stood beside a bucket full
    /// again: spent, it would let a burst through twice.
    fn usable(&self, (n, at): &(u32, C::Instant), now: C::Instant) -> bool {
        *n > 0 && Duration::from(now.duration_since(*at)) < self.refill
    }

    fn forget_spent(&self, credits: &mut HashMap<IpAddr, (u32, C::Instant)>, now: C::Instant) {
        credits.retain(|_, c| self.usable(c, now));
    }

    /// Forgets addresses whose buckets are full again.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let now = self.clock.now();
        self.forget_spent(&mut self.credits(), now);
    }

    pub fn tracked_keys(&self) -> usize {
        self.limiter.len() + self.credits().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::collections::BTreeMap;

    pub(super) fn tiers() -> BTreeMap<String, Tier> {
        let t = Tier {
            priority: 1,
            orders_per_second: 2,
            orders_burst: 4,
            reads_per_second: 10,
            reads_burst: 3,
            max_quantity: 1,
            max_batch: 1,
            upgrade_spend: None,
        };
        BTreeMap::from([("basic".to_string(), t)])
    }

    #[test]
    fn admits_exactly_the_burst_then_refuses_until_tokens_return() {
        let clock = FakeRelativeClock::default();
        let t = tiers();
        let rl = RateLimits::with_clock(&t, clock.clone());
        for left in (0..3).rev() {
            match rl.check("basic", Class::Reads, 1, 1).unwrap() {
                Outcome::Allowed(h) => assert_eq!((h.limit, h.remaining), (3, left)),
                o => panic!("{o:?}"),
            }
        }
        match rl.check("basic", Class::Reads, 1, 1).unwrap() {
            Outcome::Refused {
                retry_after_secs,
                headers,
            } => {
                assert_eq!(retry_after_secs, 1);
                assert_eq!(headers.remaining, 0);
            }
            o => panic!("{o:?}"),
        }
        // Another reseller and the other class have buckets of their own.
        assert!(matches!(
            rl.check("basic", Class::Reads, 2, 1),
            Some(Outcome::Allowed(_))
        ));
        assert!(matches!(
            rl.check("basic", Class::Writes, 1, 4),
            Some(Outcome::Allowed(_))
        ));
        clock.advance(Duration::from_millis(100));
        assert!(matches!(
            rl.check("basic", Class::Reads, 1, 1),
            Some(Outcome::Allowed(_))
        ));
    }

    #[test]
    fn a_batch_takes_all_its_tokens_or_none() {
        let clock = FakeRelativeClock::default();
        let t = tiers();
        let rl = RateLimits::with_clock(&t, clock.clone());
        assert!(matches!(rl.check("basic", Class::Writes, 1, 3), Some(Outcome::Allowed(h)) if h.remaining == 1));
        assert!(matches!(
            rl.check("basic", Class::Writes, 1, 2),
            Some(Outcome::Refused { .. })
        ));
        // The refused batch took nothing: one token is still there.
        assert!(matches!(rl.check("basic", Class::Writes, 1, 1), Some(Outcome::Allowed(h)) if h.remaining == 0));
        // Larger than the burst: refused outright.
        assert!(matches!(
            rl.check("basic", Class::Writes, 2, 5),
            Some(Outcome::Refused { .. })
        ));
    }

    #[test]
    fn addresses_are_limited_apart_and_an_ipv6_64_is_one_address() {
        let clock = FakeRelativeClock::default();
        let limiter = AddressLimiter::with_clock(20, 2, clock.clone());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(limiter.check(ip("192.0.2.1")).is_ok() && limiter.check(ip("192.0.2.1")).is_ok());
        // 20 a minute: the next token comes in 3 s.
        assert_eq!(limiter.check(ip("192.0.2.1")), Err(3));
        assert!(limiter.check(ip("192.0.2.2")).is_ok());
        assert!(limiter.check(ip("2001:db8:1:2::1")).is_ok() && limiter.check(ip("2001:db8:1:2:ffff::9")).is_ok());
        assert!(limiter.check(ip("2001:db8:1:2:abcd::1")).is_err());
        assert!(limiter.check(ip("2001:db8:1:3::1")).is_ok());
        // An IPv4-mapped address is the IPv4 one.
        assert!(limiter.check(ip("::ffff:192.0.2.1")).is_err());
        clock.advance(Duration::from_secs(3));
        assert!(limiter.check(ip("192.0.2.1")).is_ok());
        clock.advance(Duration::from_secs(60));
        limiter.sweep();
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[test]
    fn a_sign_in_gives_its_token_back_and_failures_do_not() {
        let clock = FakeRelativeClock::default();
        let limiter = AddressLimiter::with_clock(20, 2, clock.clone());
        let me: IpAddr = "192.0.2.1".parse().unwrap();
        // Sign-ins one after another, far past the burst.
        for _ in 0..50 {
            assert!(limiter.check(me).is_ok());
            limiter.signed_in(me);
        }
        // Failures spend the credits, then the bucket refuses.
        assert!(limiter.check(me).is_ok() && limiter.check(me).is_ok());
        assert_eq!(limiter.check(me), Err(3));
        // A sign-in gives back one attempt, no more than the burst in all.
        for _ in 0..5 {
            limiter.signed_in(me);
        }
        assert!(limiter.check(me).is_ok() && limiter.check(me).is_ok());
        assert!(limiter.check(me).is_err());
        // Credits are no good once the bucket would be full again, and then forgotten.
        for _ in 0..2 {
            limiter.signed_in(me);
        }
        clock.advance(Duration::from_secs(6));
        assert!(limiter.check(me).is_ok() && limiter.check(me).is_ok());
        assert!(
            limiter.check(me).is_err(),
            "the refilled burst, without the old credits"
        );
        clock.advance(Duration::from_secs(60));
        limiter.sweep();
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[test]
    fn idle_keys_are_swept() {
        let clock = FakeRelativeClock::default();
        let t = tiers();
        let rl = RateLimits::with_clock(&t, clock.clone());
        for r in 0..100 {
            rl.check("basic", Class::Reads, r, 1);
        }
        assert_eq!(rl.tracked_keys(), 100);
        clock.advance(Duration::from_secs(10));
        rl.sweep();
        assert_eq!(rl.tracked_keys(), 0);
    }
}
