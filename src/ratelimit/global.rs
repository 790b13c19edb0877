//! Tier rate limits held across every gateway together (docs/api.md §3 "Rate limits",
//! §9): one GCRA bucket per reseller and class in Redis (`gcra.lua`), charged by the
//! command that spends the request's nonce, so the limit costs no round trip of its own.
//! The reads of one coalesced pipeline spend their nonces and take their tokens in one
//! `admit.lua` call (one per hash slot on a Redis Cluster); an order's
//! reservation script charges the write bucket itself (`reserve.lua`); a request with no
//! Redis work of its own (a refusal, a batch before its orders run) runs `admit.lua`
//! alone, the round trip its nonce needed anyway. The bucket's answer is authoritative,
//! and the `RateLimit-*` headers are read from it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, OnceLock};

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, RedisError, Script, Value};

use super::{quota, Class, Headers, Outcome};
use crate::auth::signing::NONCE_TTL_SECS;
use crate::config::Tier;
use crate::error::ApiError;
use crate::store::keys::Keys;

/// The bucket's code, shared with the scripts that charge it (`reserve.lua` too).
static ADMIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("gcra.lua"), include_str!("admit.lua"))));

const MICROS: u64 = 1_000_000;

/// A tier's quota for one class, as the bucket counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// How long one token takes to come back, in microseconds; rounded up, so a rate that
    /// does not divide a second is never exceeded.
    pub interval_us: u64,
    pub burst: u32,
}

impl Quota {
    pub fn per_second(rate: u32, burst: u32) -> Quota {
        Quota {
            interval_us: MICROS.div_ceil(u64::from(rate.max(1))),
            burst: burst.max(1),
        }
    }
}

/// The tokens one request takes from its reseller's bucket of one class.
#[derive(Debug, Clone)]
pub struct Charge {
    pub reseller: i64,
    pub class: Class,
    pub n: u32,
    pub quota: Quota,
    /// The metric's label.
    tier: String,
}

impl Charge {
    /// `None` for a tier the config does not define, which is not limited (config
    /// validation makes every reseller's tier known).
    pub fn new(tiers: &BTreeMap<String, Tier>, tier: &str, class: Class, reseller: i64, n: u32) -> Option<Charge> {
        let (rate, burst) = quota(tiers.get(tier)?, class);
        Some(Charge {
            reseller,
            class,
            n: n.max(1),
            quota: Quota::per_second(rate, burst),
            tier: tier.to_string(),
        })
    }
}

/// Reads a bucket as `take()` in `gcra.lua` reports it: `Some(None)` when nothing was
/// charged (`''`), `None` when the reply is malformed.
pub fn parse_bucket(reply: &[u8]) -> Option<Option<Outcome>> {
    if reply.is_empty() {
        return Some(None);
    }
    let text = std::str::from_utf8(reply).ok()?;
    let mut fields = text.split(' ');
    let limit: u32 = fields.next()?.parse().ok()?;
    let remaining: u32 = fields.next()?.parse().ok()?;
    let reset_us: u64 = fields.next()?.parse().ok()?;
    let retry_us: u64 = fields.next()?.parse().ok()?;
    if fields.next().is_some() {
        return None;
    }
    Some(Some(outcome(limit, remaining, reset_us, retry_us)))
}

/// The headers' whole seconds, rounded up: a client that waits as long as they say finds
/// the tokens there.
fn outcome(limit: u32, remaining: u32, reset_us: u64, retry_us: u64) -> Outcome {
    let headers = Headers {
        limit,
        remaining,
        reset_secs: reset_us.div_ceil(MICROS),
    };
    if retry_us == 0 {
        Outcome::Allowed(headers)
    } else {
        Outcome::Refused {
            headers,
            retry_after_secs: retry_us.div_ceil(MICROS).max(1),
        }
    }
}

/// What `admit.lua` answered for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    /// False: the nonce was spent before (a replay).
    pub nonce_fresh: bool,
    /// The bucket after the charge; `None` when nothing was charged.
    pub bucket: Option<Outcome>,
}

fn parse_spent(reply: &[Vec<u8>]) -> Option<Spent> {
    let [status, bucket] = reply else { return None };
    let bucket = parse_bucket(bucket)?;
    let refused = matches!(bucket, Some(Outcome::Refused { .. }));
    let nonce_fresh = match status.as_slice() {
        b"ok" if !refused => true,
        b"rate_limited" if refused => true,
        b"nonce_reused" => false,
        _ => return None,
    };
    Some(Spent { nonce_fresh, bucket })
}

/// One request's nonce to spend and tokens to take, with the keys named: what a
/// coalesced pipeline carries for each of its reads.
#[derive(Debug, Clone)]
pub struct Admit {
    nonce_key: String,
    /// The bucket's key, the tokens to take and its quota.
    bucket: Option<(String, u32, Quota)>,
}

impl Admit {
    pub fn new(keys: &Keys, nonce_key: &str, charge: Option<&Charge>) -> Admit {
        Admit {
            nonce_key: nonce_key.to_string(),
            bucket: charge.map(|c| (keys.rate(c.reseller, c.class), c.n, c.quota)),
        }
    }

    /// The nonce's key, in its reseller's cell as the bucket is: requests whose nonces
    /// share a hash tag may share one [`admit_cmd`] on a Redis Cluster.
    pub fn nonce_key(&self) -> &str {
        &self.nonce_key
    }
}

/// `admit.lua`'s `EVALSHA`: spends each request's nonce and takes its tokens, in order.
/// On a Redis Cluster the requests' keys must share one hash slot.
pub fn admit_cmd(admits: &[&Admit]) -> Cmd {
    // Each bucket once, in the order first asked; a pipeline may hold hundreds of reads.
    let mut buckets: Vec<&str> = Vec::new();
    let mut places: HashMap<&str, usize> = HashMap::new();
    let mut args: Vec<u64> = Vec::with_capacity(admits.len() * 4);
    for a in admits {
        match &a.bucket {
            Some((key, n, quota)) => {
                let at = *places.entry(key).or_insert_with(|| {
                    buckets.push(key);
                    buckets.len()
                });
                args.extend([at as u64, u64::from(*n), quota.interval_us, u64::from(quota.burst)]);
            }
            None => args.extend([0, 0, 0, 0]),
        }
    }
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(ADMIT.get_hash()).arg(admits.len() + buckets.len());
    for a in admits {
        cmd.arg(&a.nonce_key);
    }
    cmd.arg(&buckets).arg(NONCE_TTL_SECS).arg(admits.len()).arg(&args);
    cmd
}

/// Reads the reply of an [`admit_cmd`] for `n` requests, one [`Spent`] each, in order.
pub fn read_admit(reply: Value, n: usize) -> Result<Vec<Spent>, RedisError> {
    let reply: Vec<Vec<u8>> = redis::from_redis_value(reply)?;
    if reply.len() != 2 * n {
        return Err(malformed());
    }
    reply.chunks(2).map(|r| parse_spent(r).ok_or_else(malformed)).collect()
}

/// Runs an [`admit_cmd`] for one request on its own round trip.
pub async fn admit<C: ConnectionLike>(conn: &mut C, admit: &Admit) -> Result<Spent, RedisError> {
    let reply: Value = crate::store::redis::evalsha(conn, &ADMIT, &admit_cmd(&[admit])).await?;
    read_admit(reply, 1)?.pop().ok_or_else(malformed)
}

/// Loads `admit.lua`, for a pipeline Redis refused with `NOSCRIPT` (a restarted Redis
/// has no scripts).
pub async fn load<C: ConnectionLike>(conn: &mut C) -> Result<(), RedisError> {
    ADMIT.prepare_invoke().load_async(conn).await.map(drop)
}

fn malformed() -> RedisError {
    RedisError::from((ErrorKind::Parse, "unexpected reply from a rate-limit script"))
}

/// One request's charge, and what its bucket said when the tokens were taken: the source
/// of the answer's `RateLimit-*` headers.
#[derive(Debug)]
pub struct Tokens {
    charge: Option<Charge>,
    seen: OnceLock<Outcome>,
}

impl Tokens {
    pub fn new(charge: Option<Charge>) -> Tokens {
        Tokens {
            charge,
            seen: OnceLock::new(),
        }
    }

    pub fn charge(&self) -> Option<&Charge> {
        self.charge.as_ref()
    }

    /// Notes what the bucket answered. A request is charged once (with its nonce), so the
    /// first answer is the one.
    pub fn record(&self, bucket: Option<Outcome>) {
        if let Some(b) = bucket {
            let _ = self.seen.set(b);
        }
    }

    /// What the bucket said, once a command charged it.
    pub fn outcome(&self) -> Option<Outcome> {
        self.seen.get().copied()
    }

    pub fn headers(&self) -> Option<Headers> {
        self.outcome().map(Outcome::headers)
    }

    /// The `429` for the bucket's refusal, with its wait, counted in
    /// `cardgate_rate_limited_total`.
    pub fn limited(&self) -> ApiError {
        let retry_after_secs = match self.seen.get() {
            Some(Outcome::Refused { retry_after_secs, .. }) => *retry_after_secs,
            _ => 1,
        };
        if let Some(c) = &self.charge {
            metrics::counter!("cardgate_rate_limited_total", "tier" => c.tier.clone(), "class" => c.class.label())
                .increment(1);
        }
        ApiError::RateLimited { retry_after_secs }
    }

    /// Records what `admit.lua` answered: a replay is told so first, then a refusal.
    pub fn settle(&self, spent: Spent) -> Result<(), ApiError> {
        self.record(spent.bucket);
        if !spent.nonce_fresh {
            return Err(ApiError::NonceReused);
        }
        match spent.bucket {
            Some(Outcome::Refused { .. }) => Err(self.limited()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_never_lets_more_than_its_rate_through() {
        assert_eq!(Quota::per_second(1, 5).interval_us, 1_000_000);
        assert_eq!(Quota::per_second(200, 400).interval_us, 5_000);
        // A third of a second, rounded up: just under 3 a second, never over.
        assert_eq!(Quota::per_second(3, 1).interval_us, 333_334);
        // Zeros are read as ones, as the local shield reads them.
        assert_eq!(Quota::per_second(0, 0), Quota::per_second(1, 1));
        assert_eq!(Quota::per_second(u32::MAX, 1).interval_us, 1);
    }

    #[test]
    fn buckets_read_back_with_their_waits_rounded_up_to_whole_seconds() {
        let h = |limit, remaining, reset_secs| Headers {
            limit,
            remaining,
            reset_secs,
        };
        assert_eq!(parse_bucket(b""), Some(None));
        assert_eq!(parse_bucket(b"5 4 1000000 0"), Some(Some(Outcome::Allowed(h(5, 4, 1)))));
        assert_eq!(parse_bucket(b"5 2 2982574 0"), Some(Some(Outcome::Allowed(h(5, 2, 3)))));
        // Refused: the tokens left are said as they are (a batch may find some, not all).
        assert_eq!(
            parse_bucket(b"5 2 2982574 982574"),
            Some(Some(Outcome::Refused {
                headers: h(5, 2, 3),
                retry_after_secs: 1
            }))
        );
        // A wait under a microsecond's rounding still says a whole second.
        assert_eq!(
            parse_bucket(b"40 0 4000000 1"),
            Some(Some(Outcome::Refused {
                headers: h(40, 0, 4),
                retry_after_secs: 1
            }))
        );
        assert_eq!(
            parse_bucket(b"5 4 1000000 2000001").map(|b| b.map(|o| o.headers())),
            Some(Some(h(5, 4, 1)))
        );
        for bad in [
            &b"5 4 1000000"[..],
            b"5 4 1000000 0 9",
            b"5 -1 0 0",
            b"x 4 1 0",
            b"5  4 1 0",
        ] {
            assert_eq!(parse_bucket(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn admit_replies_must_agree_with_their_bucket() {
        let b = |s: &str| s.as_bytes().to_vec();
        assert_eq!(
            parse_spent(&[b("ok"), b("")]),
            Some(Spent {
                nonce_fresh: true,
                bucket: None
            })
        );
        assert!(parse_spent(&[b("ok"), b("5 4 1000000 0")]).is_some_and(|s| s.nonce_fresh));
        assert!(parse_spent(&[b("rate_limited"), b("5 0 5000000 1000")]).is_some_and(|s| s.nonce_fresh));
        // A replay is counted like any request, admitted or not.
        assert!(parse_spent(&[b("nonce_reused"), b("5 0 5000000 1000")]).is_some_and(|s| !s.nonce_fresh));
        assert!(parse_spent(&[b("nonce_reused"), b("")]).is_some_and(|s| !s.nonce_fresh));
        assert_eq!(parse_spent(&[b("ok"), b("5 0 5000000 1000")]), None);
        assert_eq!(parse_spent(&[b("rate_limited"), b("5 4 1000000 0")]), None);
        assert_eq!(parse_spent(&[b("rate_limited"), b("")]), None);
        assert_eq!(parse_spent(&[b("ok")]), None);
        assert_eq!(parse_spent(&[b("what"), b("")]), None);
    }

    #[test]
    fn a_request_reports_the_bucket_it_was_charged_by_and_a_replay_before_a_refusal() {
        // The local limiter's tiers: both count from the same quota.
        let tiers = crate::ratelimit::tests::tiers();
        assert!(Charge::new(&tiers, "unknown", Class::Reads, 1, 1).is_none());
        let c = Charge::new(&tiers, "basic", Class::Writes, 7, 3).unwrap();
        assert_eq!((c.n, c.quota), (3, Quota::per_second(2, 4)));

        let refused = parse_bucket(b"4 1 1500000 500000").unwrap();
        let t = Tokens::new(Some(c));
        assert_eq!(
            t.settle(Spent {
                nonce_fresh: false,
                bucket: refused
            })
            .unwrap_err()
            .code(),
            "nonce_reused"
        );
        assert_eq!(t.headers().map(|h| h.remaining), Some(1));

        let t = Tokens::new(Charge::new(&tiers, "basic", Class::Reads, 7, 1));
        let e = t
            .settle(Spent {
                nonce_fresh: true,
                bucket: parse_bucket(b"3 0 3000000 2500000").unwrap(),
            })
            .unwrap_err();
        assert_eq!(e.retry_after_secs(), Some(3));
        assert_eq!(e.code(), "rate_limited");
        // The first answer stands: the one command that took the tokens.
        t.record(parse_bucket(b"3 3 0 0").unwrap());
        assert_eq!(t.headers().map(|h| (h.remaining, h.reset_secs)), Some((0, 3)));

        let unlimited = Tokens::new(None);
        assert!(unlimited
            .settle(Spent {
                nonce_fresh: true,
                bucket: None
            })
            .is_ok());
        assert_eq!(unlimited.headers(), None);
    }
}
