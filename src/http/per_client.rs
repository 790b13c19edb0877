//! Connections per client address, capped so that one client holding slow connections
//! cannot take every slot of `http.connections_max`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

/// The unit one client is counted by: an IPv4 address, or an IPv6 /64 (what one
/// subscriber is usually given, so a client cannot escape the cap by rotating
/// addresses inside its own network).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

pub struct PerClient {
    max: usize,
    exempt: Vec<IpNet>,
    // A std Mutex: held for one map operation, never across an await.
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of a client; dropping it frees the slot.
pub struct Slot {
    table: Arc<PerClient>,
    key: Option<IpAddr>,
}

impl PerClient {
    /// Peers in `exempt` (trusted proxies, which speak for many clients) are not capped.
    pub fn new(max: usize, exempt: Vec<IpNet>) -> Arc<Self> {
        Arc::new(PerClient {
            max,
            exempt,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `peer`, or `None` when that client has `max` open.
    pub fn enter(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let peer = peer.to_canonical();
        if self.exempt.iter().any(|n| n.contains(&peer)) {
            return Some(Slot {
                table: self.clone(),
                key: None,
            });
        }
        let key = client_key(peer);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            table: self.clone(),
            key: Some(key),
        })
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        // Entries go with their last connection: the map holds only clients with one open.
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_client_and_forgets_it_when_its_last_connection_closes() {
        let t = PerClient::new(2, vec!["10.0.0.0/8".parse().unwrap()]);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let (s1, s2) = (t.enter(a).unwrap(), t.enter(a).unwrap());
        assert!(t.enter(a).is_none());
        assert!(t.enter("127.0.0.3".parse().unwrap()).is_some());
        // The same IPv4 client arriving on a dual-stack socket.
        assert!(t.enter("::ffff:127.0.0.2".parse().unwrap()).is_none());
        drop(s1);
        let s3 = t.enter(a).unwrap();
        drop((s2, s3));
        assert_eq!(t.clients(), 0);
        // A trusted proxy speaks for many clients.
        let p: IpAddr = "10.1.2.3".parse().unwrap();
        let _p: Vec<_> = (0..5).map(|_| t.enter(p).unwrap()).collect();
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let t = PerClient::new(1, vec![]);
        let _s = t.enter("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(t.enter("2001:db8:1:2:ffff::9".parse().unwrap()).is_none());
        assert!(t.enter("2001:db8:1:3::1".parse().unwrap()).is_some());
    }
}
