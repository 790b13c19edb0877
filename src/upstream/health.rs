//! Each supplier's health as this gateway sees it (docs/api.md §8): a circuit breaker,
//! the recent success rate and latency, and the balance the supplier reports.
//!
//! The view is per gateway and in memory, as Envoy's outlier detection or a Hystrix
//! breaker keep theirs: each gateway judges a supplier by the calls it made itself, and a
//! restart starts with every circuit closed. Sharing it through Redis would put a round
//! trip in front of every call for a judgement that a few calls of each gateway's own
//! rebuild anyway. Memory is bounded: `upstream.health_window` calls per supplier, and
//! suppliers are created by admins only.
//!
//! - **Outcomes.** A definite answer (codes or a refusal) is a success: the supplier
//!   answered. An unknown outcome (timeout, `5xx`, connection lost) is a failure. A call
//!   the answer window cut short (`upstream.answer_within_ms`) is not counted either way:
//!   it says how long the window is, not how the supplier is.
//! - **Circuit.** `closed`: every call goes through. After `upstream.circuit_failures`
//!   failures in a row it opens. `open`: no call goes through for
//!   `upstream.circuit_open_ms`; then `half_open`: one trial call goes through, and its
//!   success closes the circuit, its failure opens it again. The balance poll may be that
//!   trial (a definite answer shows the supplier answers), so a circuit closes when the
//!   supplier is back even if no order comes for it.
//! - **Recent success rate and latency**: over the last `upstream.health_window` calls;
//!   the latency is their median (p50), timeouts counted at the time they took, so it is
//!   what a purchase waits on a typical call.
//! - **Balance**: what the supplier last reported of the money the platform holds there
//!   ([`poll_balances`], every `upstream.balance_poll_ms`), and when it was read.
//!
//! When a circuit is open, `crate::upstream` skips the supplier for purchases that have
//! not yet asked it (nothing was sent, so moving on cannot buy twice), and makes one that
//! has asked it wait (the hard rule: only a definite refusal moves a purchase on).
//!
//! Times for the circuit come from the gateway's clock (`app.clock`), so tests move them
//! with a manual clock; a step of the wall clock only lengthens or shortens one cooldown.
//! Latencies are measured with the monotonic clock where the call is made.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;
use time::OffsetDateTime;

use super::{cardgate, Answer, Reported, Supplier};
use crate::app::App;
use crate::config::UpstreamConfig;
use crate::crypto::Purpose;

/// What a call to a supplier came to, for its health and its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Codes,
    Refused,
    Unknown,
}

impl Outcome {
    pub fn of(answer: &Answer) -> Outcome {
        match answer {
            Answer::Codes { .. } => Outcome::Codes,
            Answer::Refused(_) => Outcome::Refused,
            Answer::Unknown(_) => Outcome::Unknown,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Codes => "codes",
            Outcome::Refused => "refused",
            Outcome::Unknown => "unknown",
        }
    }

    /// A definite answer, whatever it said, shows the supplier works.
    fn ok(self) -> bool {
        self != Outcome::Unknown
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed,
    /// No call until then (Unix ms).
    Open {
        until_ms: i64,
    },
    /// The cooldown is over; `trial`: the one call let through is in flight.
    HalfOpen {
        trial: bool,
    },
}

/// The breaker alone, on times given to it: what the unit tests drive.
#[derive(Debug)]
struct Breaker {
    circuit: Circuit,
    failures_in_a_row: u32,
    failures_to_open: u32,
    open_ms: i64,
}

/// Whether a call may go, and if so whether it is the half-open circuit's trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Call,
    Trial,
    No,
}

impl Breaker {
    fn new(failures_to_open: u32, open_ms: u64) -> Breaker {
        Breaker {
            circuit: Circuit::Closed,
            failures_in_a_row: 0,
            failures_to_open: failures_to_open.max(1),
            open_ms: i64::try_from(open_ms).unwrap_or(i64::MAX),
        }
    }

    fn admit(&mut self, now_ms: i64) -> Admit {
        match self.circuit {
            Circuit::Closed => Admit::Call,
            Circuit::Open { until_ms } if now_ms >= until_ms => {
                self.circuit = Circuit::HalfOpen { trial: true };
                Admit::Trial
            }
            Circuit::HalfOpen { trial: false } => {
                self.circuit = Circuit::HalfOpen { trial: true };
                Admit::Trial
            }
            Circuit::Open { .. } | Circuit::HalfOpen { trial: true } => Admit::No,
        }
    }

    /// Like [`Breaker::admit`], but only the half-open trial: the balance poll probes a
    /// circuit that is not closed and leaves a closed one alone.
    fn admit_trial(&mut self, now_ms: i64) -> bool {
        self.circuit != Circuit::Closed && self.admit(now_ms) == Admit::Trial
    }

    /// A call's outcome. Only the trial decides a half-open circuit; calls admitted
    /// before the circuit opened and answering after do not move it.
    fn settle(&mut self, ok: bool, trial: bool, now_ms: i64) {
        match (self.circuit, trial) {
            (Circuit::HalfOpen { .. }, true) => {
                self.circuit = if ok {
                    self.failures_in_a_row = 0;
                    Circuit::Closed
                } else {
                    self.open_at(now_ms)
                };
            }
            (Circuit::Closed, _) if ok => self.failures_in_a_row = 0,
            (Circuit::Closed, _) => {
                self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
                if self.failures_in_a_row >= self.failures_to_open {
                    self.circuit = self.open_at(now_ms);
                }
            }
            _ => {}
        }
    }

    /// The trial was let through but never answered (its purchase's window cut it short):
    /// the next call is the trial instead.
    fn release_trial(&mut self) {
        if self.circuit == (Circuit::HalfOpen { trial: true }) {
            self.circuit = Circuit::HalfOpen { trial: false };
        }
    }

    fn open_at(&self, now_ms: i64) -> Circuit {
        Circuit::Open {
            until_ms: now_ms.saturating_add(self.open_ms),
        }
    }

    fn is_closed(&self) -> bool {
        self.circuit == Circuit::Closed
    }

    /// As shown: an open circuit whose cooldown is over is `half_open`, since the next
    /// call will be its trial.
    fn name(&self, now_ms: i64) -> &'static str {
        match self.circuit {
            Circuit::Closed => "closed",
            Circuit::Open { until_ms } if now_ms < until_ms => "open",
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Call {
    ok: bool,
    latency_ms: u64,
}

#[derive(Debug)]
struct State {
    breaker: Breaker,
    /// The last `health_window` calls, oldest first.
    calls: VecDeque<Call>,
    /// The balance last reported, and when it was read.
    balance: Option<(i64, OffsetDateTime)>,
}

/// Every supplier's health in this gateway, by public supplier id.
pub struct Suppliers {
    failures_to_open: u32,
    open_ms: u64,
    window: usize,
    states: Mutex<HashMap<String, State>>,
}

/// A supplier's health as the operator API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HealthView {
    /// `closed`, `open` or `half_open`.
    pub circuit: &'static str,
    /// Definite answers among the recent calls, 0 to 1; `None` before any call.
    pub success_rate: Option<f64>,
    /// The recent calls' median latency.
    pub latency_ms: Option<u64>,
    /// How many recent calls the two above are over.
    pub calls: usize,
    pub balance: Option<i64>,
    pub balance_at: Option<String>,
}

impl Suppliers {
    pub fn new(c: &UpstreamConfig) -> Suppliers {
        Suppliers {
            failures_to_open: c.circuit_failures,
            open_ms: c.circuit_open_ms,
            window: c.health_window.max(1) as usize,
            states: Mutex::new(HashMap::new()),
        }
    }

    /// The supplier's state, created closed on first sight (its gauge then reads 0).
    fn with<T>(&self, supplier: &str, f: impl FnOnce(&mut State) -> T) -> T {
        let mut states = self.lock();
        if !states.contains_key(supplier) {
            metrics::gauge!("cardgate_supplier_circuit_open", "supplier" => supplier.to_owned()).set(0.0);
        }
        let state = states.entry(supplier.to_owned()).or_insert_with(|| State {
            breaker: Breaker::new(self.failures_to_open, self.open_ms),
            calls: VecDeque::with_capacity(self.window),
            balance: None,
        });
        f(state)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, State>> {
        // A panic elsewhere while holding it left plain numbers behind: still usable.
        self.states.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// May a purchase call `supplier` now? `None`: its circuit is open (or its half-open
    /// trial is in flight).
    pub fn admit<'a>(&'a self, supplier: &'a str, now_ms: i64) -> Option<Permit<'a>> {
        let trial = match self.with(supplier, |s| s.breaker.admit(now_ms)) {
            Admit::Call => false,
            Admit::Trial => true,
            Admit::No => return None,
        };
        Some(Permit {
            suppliers: self,
            supplier,
            trial,
            settled: false,
        })
    }

    /// A purchase moved past `supplier` without asking it (its circuit was open).
    pub fn skipped(&self, supplier: &str) {
        metrics::counter!("cardgate_supplier_calls_total", "supplier" => supplier.to_owned(), "outcome" => "skipped")
            .increment(1);
    }

    fn settle(&self, supplier: &str, ok: bool, trial: bool, call: Option<Call>, now_ms: i64) {
        let open = self.with(supplier, |s| {
            let was_closed = s.breaker.is_closed();
            s.breaker.settle(ok, trial, now_ms);
            if let Some(call) = call {
                if s.calls.len() >= self.window {
                    s.calls.pop_front();
                }
                s.calls.push_back(call);
            }
            let closed = s.breaker.is_closed();
            if was_closed != closed {
                // Under the lock, so that two transitions cannot leave the gauge reversed.
                let v = if closed { 0.0 } else { 1.0 };
                metrics::gauge!("cardgate_supplier_circuit_open", "supplier" => supplier.to_owned()).set(v);
            }
            (was_closed != closed).then_some(!closed)
        });
        match open {
            Some(true) => tracing::warn!(supplier, "supplier circuit opened: purchases not yet asking it skip it"),
            Some(false) => tracing::info!(supplier, "supplier circuit closed"),
            None => {}
        }
    }

    fn release_trial(&self, supplier: &str) {
        self.with(supplier, |s| s.breaker.release_trial());
    }

    fn set_balance(&self, supplier: &str, balance: i64, at: OffsetDateTime) {
        self.with(supplier, |s| s.balance = Some((balance, at)));
        metrics::gauge!("cardgate_supplier_balance", "supplier" => supplier.to_owned()).set(balance as f64);
    }

    /// The supplier's health at `now_ms` (a supplier not called yet: closed, no figures).
    pub fn view(&self, supplier: &str, now_ms: i64) -> HealthView {
        self.with(supplier, |s| {
            let calls = s.calls.len();
            let ok = s.calls.iter().filter(|c| c.ok).count();
            let mut latencies: Vec<u64> = s.calls.iter().map(|c| c.latency_ms).collect();
            latencies.sort_unstable();
            HealthView {
                circuit: s.breaker.name(now_ms),
                success_rate: (calls > 0).then(|| ok as f64 / calls as f64),
                latency_ms: latencies.get(calls / 2).copied(),
                calls,
                balance: s.balance.map(|(b, _)| b),
                balance_at: s.balance.map(|(_, at)| crate::http::query::rfc3339(at)),
            }
        })
    }
}

/// A call let through by the circuit. Settled with its outcome; dropped unsettled (the
/// answer window cut the call short), it counts for nothing and gives the half-open
/// trial, if it was that, to the next call.
pub struct Permit<'a> {
    suppliers: &'a Suppliers,
    supplier: &'a str,
    trial: bool,
    settled: bool,
}

impl Permit<'_> {
    /// A purchase's call: counted in the supplier's recent calls and metrics.
    pub fn record(mut self, outcome: Outcome, took: Duration, now_ms: i64) {
        self.settled = true;
        let latency_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let call = Call {
            ok: outcome.ok(),
            latency_ms,
        };
        let supplier = self.supplier.to_owned();
        metrics::counter!("cardgate_supplier_calls_total", "supplier" => supplier.clone(), "outcome" => outcome.label())
            .increment(1);
        metrics::histogram!("cardgate_supplier_call_seconds", "supplier" => supplier).record(took.as_secs_f64());
        self.suppliers
            .settle(self.supplier, outcome.ok(), self.trial, Some(call), now_ms);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.trial && !self.settled {
            self.suppliers.release_trial(self.supplier);
        }
    }
}

/// One round of reading every supplier's balance (the background loop's step; tests
/// call it once). A supplier whose circuit is due its trial is probed by this read: a
/// definite answer closes the circuit, an unknown one opens it again. Other reads leave
/// the circuit and the recent calls alone (they are purchases'). Returns how many
/// suppliers reported a balance.
pub async fn poll_balances(app: &App) -> anyhow::Result<usize> {
    let client = app.pg.get().await?;
    let rows = client
        .query(
            "SELECT supplier_id, base_url, key_id, secret_enc, timeout_ms FROM suppliers ORDER BY id",
            &[],
        )
        .await?;
    drop(client);
    let mut adapters = Vec::with_capacity(rows.len());
    for r in &rows {
        let supplier_id: String = r.get(0);
        let secret = match app.crypto.decrypt(
            Purpose::SupplierSecret {
                supplier_id: &supplier_id,
            },
            r.get(3),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(supplier = supplier_id, error = %e, "supplier secret does not open");
                continue;
            }
        };
        let adapter = cardgate::Cardgate {
            base_url: r.get(1),
            key_id: r.get(2),
            signer: crate::auth::signing::Signer::new(&secret),
            timeout: Duration::from_millis(r.get::<_, i32>(4).max(1) as u64),
            client: super::client(),
        };
        adapters.push((supplier_id, adapter));
    }
    let polls = adapters
        .iter()
        .map(|(supplier, adapter)| poll_one(app, supplier, adapter));
    Ok(join_all(polls).await.into_iter().filter(|&reported| reported).count())
}

async fn poll_one(app: &App, supplier: &str, adapter: &cardgate::Cardgate) -> bool {
    let h = &app.supplier_health;
    let trial = h.with(supplier, |s| s.breaker.admit_trial(app.clock.now_unix_ms()));
    let reported = adapter.balance(app.clock.now_unix_secs()).await;
    let now_ms = app.clock.now_unix_ms();
    if trial {
        h.settle(supplier, !matches!(reported, Reported::Unknown(_)), true, None, now_ms);
    }
    match reported {
        Reported::Balance(b) => {
            h.set_balance(supplier, b, app.clock.now());
            true
        }
        Reported::Refused(why) | Reported::Unknown(why) => {
            tracing::debug!(supplier, why, "supplier balance not read");
            false
        }
    }
}

/// The background loop of [`poll_balances`].
pub async fn run(app: Arc<App>) {
    let every = Duration::from_millis(app.config.upstream.balance_poll_ms.max(1000));
    crate::every(every, || async {
        if let Err(e) = poll_balances(&app).await {
            tracing::warn!(error = format!("{e:#}"), "supplier balances not read");
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: u64 = 30_000;

    #[test]
    fn the_circuit_opens_after_n_failures_in_a_row_and_a_success_resets_the_count() {
        let mut b = Breaker::new(3, COOLDOWN);
        for _ in 0..2 {
            assert_eq!(b.admit(0), Admit::Call);
            b.settle(false, false, 0);
        }
        // A definite answer in between: the count starts again.
        b.settle(true, false, 0);
        for _ in 0..2 {
            b.settle(false, false, 0);
        }
        assert_eq!(b.name(0), "closed");
        b.settle(false, false, 10);
        assert_eq!(b.name(10), "open");
        assert_eq!(b.admit(10), Admit::No);
        assert_eq!(b.admit(10 + COOLDOWN as i64 - 1), Admit::No, "still cooling down");
    }

    #[test]
    fn after_the_cooldown_one_trial_goes_through_and_closes_or_reopens_the_circuit() {
        let mut b = Breaker::new(1, COOLDOWN);
        b.settle(false, false, 0);
        let due = COOLDOWN as i64;
        assert_eq!(b.name(due), "half_open", "shown half-open once the cooldown is over");
        assert_eq!(b.admit(due), Admit::Trial);
        assert_eq!(b.admit(due), Admit::No, "one trial at a time");
        // A call admitted before the circuit opened, answering now, decides nothing.
        b.settle(true, false, due);
        assert_eq!(b.name(due), "half_open");
        b.settle(false, true, due + 5);
        assert_eq!(b.name(due + 5), "open", "a failed trial re-opens it");
        assert_eq!(
            b.admit(due + 5 + COOLDOWN as i64 - 1),
            Admit::No,
            "for a whole cooldown"
        );
        let due = due + 5 + COOLDOWN as i64;
        assert_eq!(b.admit(due), Admit::Trial);
        b.settle(true, true, due);
        assert_eq!(b.name(due), "closed", "a successful trial closes it");
        assert_eq!(b.admit(due), Admit::Call);
        assert_eq!(b.admit(due), Admit::Call);
    }

    #[test]
    fn a_trial_cut_short_hands_the_trial_to_the_next_call() {
        let mut b = Breaker::new(1, COOLDOWN);
        b.settle(false, false, 0);
        assert_eq!(b.admit(COOLDOWN as i64), Admit::Trial);
        b.release_trial();
        assert_eq!(b.admit(COOLDOWN as i64), Admit::Trial);
        // The balance poll probes only a circuit that is not closed.
        b.settle(true, true, COOLDOWN as i64);
        assert!(!b.admit_trial(COOLDOWN as i64));
        assert_eq!(b.admit(COOLDOWN as i64), Admit::Call);
    }

    fn config(failures: u32, window: u32) -> UpstreamConfig {
        UpstreamConfig {
            answer_within_ms: 3000,
            lease_ms: 30_000,
            retry_ms: 2000,
            max_in_flight: 256,
            allow_private_targets: true,
            circuit_failures: failures,
            circuit_open_ms: COOLDOWN,
            health_window: window,
            balance_poll_ms: 30_000,
        }
    }

    #[test]
    fn the_view_counts_the_recent_window_only_and_takes_the_median_latency() {
        let h = Suppliers::new(&config(100, 4));
        let v = h.view("sp_a", 0);
        assert_eq!(
            (v.circuit, v.success_rate, v.latency_ms, v.calls),
            ("closed", None, None, 0)
        );
        for (outcome, ms) in [
            (Outcome::Unknown, 9000),
            (Outcome::Codes, 10),
            (Outcome::Refused, 30),
            (Outcome::Unknown, 5000),
            (Outcome::Codes, 20),
        ] {
            h.admit("sp_a", 0)
                .unwrap()
                .record(outcome, Duration::from_millis(ms), 0);
        }
        let v = h.view("sp_a", 0);
        // The first call (9000 ms) has left the window of 4.
        assert_eq!(v.calls, 4);
        assert_eq!(v.success_rate, Some(0.75));
        assert_eq!(v.latency_ms, Some(30), "median of 10, 20, 30, 5000");
        assert_eq!(h.view("sp_b", 0).calls, 0, "each supplier its own");
    }

    #[test]
    fn a_permit_dropped_unsettled_gives_the_trial_back_and_counts_nothing() {
        // As the gateway reads it: from its clock, here a manual one.
        let m = crate::clock::ManualClock::at_unix_ms(1_700_000_000_000);
        let clock = crate::clock::Clock::from(m.clone());
        let h = Suppliers::new(&config(1, 10));
        h.admit("sp_a", clock.now_unix_ms()).unwrap().record(
            Outcome::Unknown,
            Duration::from_millis(1),
            clock.now_unix_ms(),
        );
        assert!(h.admit("sp_a", clock.now_unix_ms()).is_none(), "open");
        assert_eq!(h.view("sp_a", clock.now_unix_ms()).circuit, "open");
        m.advance(Duration::from_millis(COOLDOWN));
        assert_eq!(h.view("sp_a", clock.now_unix_ms()).circuit, "half_open");
        let trial = h.admit("sp_a", clock.now_unix_ms()).unwrap();
        assert!(h.admit("sp_a", clock.now_unix_ms()).is_none(), "the trial is in flight");
        drop(trial);
        assert_eq!(
            h.view("sp_a", clock.now_unix_ms()).calls,
            1,
            "a dropped permit counts nothing"
        );
        let trial = h.admit("sp_a", clock.now_unix_ms()).unwrap();
        trial.record(Outcome::Refused, Duration::from_millis(1), clock.now_unix_ms());
        assert_eq!(
            h.view("sp_a", clock.now_unix_ms()).circuit,
            "closed",
            "a refusal is an answer"
        );
    }
}
