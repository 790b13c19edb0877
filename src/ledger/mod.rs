//! From the outbox into Postgres: the ledger writer ([`writer`]) group-commits reserved
//! fulfilments, and the requests waiting on them ([`Waiters`]) are released together.

pub mod writer;

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// How a reserved order ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// In Postgres: the codes are the caller's.
    Committed,
    /// Postgres already holds another order with this merchant_order_no (Redis had lost
    /// its record): the reservation was undone; answer with the recorded order.
    Duplicate,
    /// Postgres refused a code as delivered or voided already (the last guard): the
    /// reservation was undone without that code; reserve again from other stock.
    LastGuard,
    /// Reserved in a Redis state rebuilt since: not recorded; the rebuild gave its codes
    /// and money back. Reserve again.
    Stale,
    /// Postgres refused the order for another reason: undone, nothing charged.
    Failed,
}

impl Settled {
    pub fn as_str(self) -> &'static str {
        match self {
            Settled::Committed => "committed",
            Settled::Duplicate => "duplicate",
            Settled::LastGuard => "last_guard",
            Settled::Stale => "stale",
            Settled::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Settled> {
        Some(match s {
            "committed" => Settled::Committed,
            "duplicate" => Settled::Duplicate,
            "last_guard" => Settled::LastGuard,
            "stale" => Settled::Stale,
            "failed" => Settled::Failed,
            _ => return None,
        })
    }
}

/// Requests of this process waiting for their order to settle, by order id; and this
/// process's writers, told when one of those orders reached an outbox.
#[derive(Default)]
pub struct Waiters {
    orders: Mutex<HashMap<String, oneshot::Sender<Settled>>>,
    reserved: tokio::sync::Notify,
}

/// One request's wait; dropping it (answered, timed out, client gone) unregisters it.
pub struct Waiter<'a> {
    waiters: &'a Waiters,
    order_id: String,
    rx: oneshot::Receiver<Settled>,
}

impl Waiter<'_> {
    /// The outcome, or `None` if the writers were stopped first.
    pub async fn settled(&mut self) -> Option<Settled> {
        (&mut self.rx).await.ok()
    }
}

impl Waiters {
    /// Registers before the reservation runs, so a writer that commits quickly cannot
    /// settle the order before anyone waits for it.
    pub fn register(&self, order_id: &str) -> Waiter<'_> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(order_id.to_string(), tx);
        Waiter {
            waiters: self,
            order_id: order_id.to_string(),
            rx,
        }
    }

    /// Wakes the request waiting for `order_id` here; false if none does.
    pub fn notify(&self, order_id: &str, settled: Settled) -> bool {
        match self.lock().remove(order_id) {
            Some(tx) => {
                let _ = tx.send(settled);
                true
            }
            None => false,
        }
    }

    /// An order of this process went into an outbox: wakes one writer that waits in
    /// [`Waiters::next_reservation`], or the next one to wait.
    pub fn reserved(&self) {
        self.reserved.notify_one();
    }

    /// Until an order of this process goes into an outbox (at once if one did since the
    /// last call returned).
    pub async fn next_reservation(&self) {
        self.reserved.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Settled>>> {
        self.orders.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.waiters.lock().remove(&self.order_id);
    }
}

/// The channel on which a writer tells other gateways that orders they wait for settled.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:settled")
}

/// `order_id outcome` lines, as published on [`channel`].
pub fn parse_message(msg: &str) -> impl Iterator<Item = (&str, Settled)> {
    msg.lines().filter_map(|l| {
        let (id, s) = l.split_once(' ')?;
        Some((id, Settled::parse(s)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_is_woken_once_and_unregisters_when_dropped() {
        let w = Waiters::default();
        let mut a = w.register("ord_a");
        assert!(w.notify("ord_a", Settled::Committed));
        assert_eq!(a.settled().await, Some(Settled::Committed));
        assert!(!w.notify("ord_a", Settled::Committed), "woken once");
        drop(w.register("ord_b"));
        assert!(!w.notify("ord_b", Settled::Committed), "dropped waiters are gone");
        assert!(w.lock().is_empty());
    }

    #[tokio::test]
    async fn a_reservation_made_before_a_writer_waits_is_not_missed() {
        let w = Waiters::default();
        w.reserved();
        let woke = tokio::time::timeout(std::time::Duration::from_secs(1), w.next_reservation()).await;
        assert!(
            woke.is_ok(),
            "the writer slept through a reservation made before it waited"
        );
        let again = tokio::time::timeout(std::time::Duration::from_millis(50), w.next_reservation()).await;
        assert!(again.is_err(), "one reservation wakes one wait");
    }

    #[test]
    fn messages_round_trip() {
        let msg = format!(
            "ord_a {}\nord_b {}\nbad\nord_c nonsense",
            Settled::Committed.as_str(),
            Settled::LastGuard.as_str()
        );
        let got: Vec<_> = parse_message(&msg).collect();
        assert_eq!(got, vec![("ord_a", Settled::Committed), ("ord_b", Settled::LastGuard)]);
    }
}
