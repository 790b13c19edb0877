//! Wall-clock time, read in one place that tests can control.
//!
//! Every read of the calendar time in the gateway goes through the [`Clock`] the gateway
//! was built with (`App::clock`): the signing window, order timestamps, operator token
//! expiry, report ranges, callback signatures, retention cut-offs and suppliers' circuit
//! cooldowns. Tests build a gateway on a [`ManualClock`] and move it with `set` and
//! `advance`, so behaviour that depends on the date is tested without waiting and
//! without racing the real clock.
//! `clippy.toml` refuses `SystemTime::now` and `OffsetDateTime::now_utc` everywhere else.
//!
//! Not here, on purpose:
//! - Durations (latencies, timeouts, pacing) are measured with the monotonic
//!   `std::time::Instant` and tokio's timers where they are taken: they must not jump when
//!   the wall clock is stepped, and they are not what a manual clock stands for.
//! - Times Postgres and Redis write themselves (`now()`, `clock_timestamp()`, stream ids,
//!   key expiry) stay theirs: a login's token is issued at Postgres's time so that it
//!   compares with `password_changed_at`, written by the same clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

const MS_PER_SEC: i64 = 1_000;

/// Where the gateway reads the time of day. Cheap to clone: a manual clock's clones share
/// one time, so the test holding one moves the gateway's.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The operating system's clock: what a gateway in service runs on.
    #[default]
    System,
    /// A time that moves only when told to (tests).
    Manual(ManualClock),
}

impl Clock {
    /// Unix time in milliseconds.
    pub fn now_unix_ms(&self) -> i64 {
        match self {
            Clock::System => system_unix_ms(),
            Clock::Manual(m) => m.unix_ms.load(Ordering::SeqCst),
        }
    }

    /// Unix time in whole seconds, rounded down (as a signed request's timestamp is).
    pub fn now_unix_secs(&self) -> i64 {
        self.now_unix_ms().div_euclid(MS_PER_SEC)
    }

    /// The time as a UTC date and time, to the millisecond.
    pub fn now(&self) -> OffsetDateTime {
        let ms = self.now_unix_ms();
        // Any i64 of milliseconds is within `time`'s range, so the fallback is never taken.
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

impl From<ManualClock> for Clock {
    fn from(m: ManualClock) -> Clock {
        Clock::Manual(m)
    }
}

/// A clock that stands still until `set` or `advance` moves it; clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    unix_ms: Arc<AtomicI64>,
}

impl ManualClock {
    /// Stopped at `unix_ms` (Unix time in milliseconds).
    pub fn at_unix_ms(unix_ms: i64) -> ManualClock {
        ManualClock {
            unix_ms: Arc::new(AtomicI64::new(unix_ms)),
        }
    }

    /// Stopped at the system clock's time now: a start that real time agrees with.
    pub fn at_system_now() -> ManualClock {
        ManualClock::at_unix_ms(system_unix_ms())
    }

    pub fn set(&self, unix_ms: i64) {
        self.unix_ms.store(unix_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `by` (never backward: that is `set`).
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.unix_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| Some(t.saturating_add(ms)))
            .ok();
    }

    pub fn now_unix_ms(&self) -> i64 {
        self.unix_ms.load(Ordering::SeqCst)
    }
}

#[allow(clippy::disallowed_methods, reason = "the one read of the system's wall clock")]
fn system_unix_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        // A clock set before 1970 is a broken host; reading it as the epoch keeps the
        // gateway answering, and every window check then refuses.
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_share_the_time() {
        let m = ManualClock::at_unix_ms(1_700_000_000_500);
        let clock = Clock::from(m.clone());
        assert_eq!(clock.now_unix_secs(), 1_700_000_000);
        assert_eq!(clock.now().unix_timestamp(), 1_700_000_000);
        assert_eq!(clock.now().millisecond(), 500);
        m.advance(Duration::from_millis(700));
        assert_eq!(clock.now_unix_ms(), 1_700_000_001_200);
        m.set(-1);
        assert_eq!(clock.now_unix_secs(), -1, "before the epoch rounds down");
    }

    #[test]
    fn the_system_clock_agrees_with_itself() {
        let a = Clock::System.now_unix_ms();
        let b = Clock::System.now().unix_timestamp() * MS_PER_SEC;
        assert!((b - a).abs() < 5 * MS_PER_SEC, "{a} vs {b}");
    }
}
