//! Where a callback may go: public addresses only, unless
//! `callbacks.allow_private_targets` is set.
//!
//! A reseller's `callback_url` is chosen by whoever can edit the reseller, and the
//! gateway posts to it from inside the operator's network: without this guard it would
//! reach Redis, Postgres, a cloud metadata service or anything else only the gateway can
//! see. The URL is judged when it is set and again at every delivery, on the addresses
//! the delivery actually connects to, so a name that resolves somewhere public when set
//! and somewhere private later (DNS rebinding) is still refused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

/// How long the check made when a URL is set waits for its name to resolve.
pub const SET_TIME_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// IPv4 ranges that are not public (IANA's special-purpose registry, less the few
/// entries that are globally reachable anycast), each with what it is.
const V4_NOT_PUBLIC: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\" (unspecified)"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
];

/// IPv6 ranges that are not public. The forms that embed an IPv4 address (mapped, NAT64,
/// 6to4) are unwrapped before this table is consulted; whatever is left outside global
/// unicast (2000::/3) is refused as well, so the table names the common cases rather than
/// being the only line of defence.
const V6_NOT_PUBLIC: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001::/23", "IETF protocol assignment"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "SRv6 segment identifier"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

const V6_GLOBAL_UNICAST: &str = "2000::/3";

/// Why an address may not receive callbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotPublic {
    pub addr: IpAddr,
    pub kind: &'static str,
}

impl fmt::Display for NotPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is a {} address, not a public one", self.addr, self.kind)
    }
}

/// A delivery the guard stopped before it connected. Its text is what the attempt
/// records: the address and why, never the URL (its query may hold the merchant's token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "callback target refused: {} (callbacks.allow_private_targets is off)",
            self.0
        )
    }
}

impl std::error::Error for Refused {}

fn kind_of<N: std::str::FromStr>(
    table: &[(&str, &'static str)],
    contains: impl Fn(&N) -> bool,
) -> Option<&'static str> {
    table
        .iter()
        .find(|(net, _)| net.parse::<N>().is_ok_and(|n| contains(&n)))
        .map(|(_, kind)| *kind)
}

/// The IPv4 address an IPv6 one carries by a translation or tunnelling convention, if
/// any: IPv4-mapped (`::ffff:a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`).
/// Teredo (`2001::/32`) obfuscates its client address and is refused whole instead.
pub fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let seg = v6.segments();
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

/// `Ok` when `addr` is a public address a callback may be sent to.
pub fn check_ip(addr: IpAddr) -> Result<(), NotPublic> {
    let refuse = |kind| Err(NotPublic { addr, kind });
    match addr {
        IpAddr::V4(v4) => match kind_of(V4_NOT_PUBLIC, |n: &Ipv4Net| n.contains(&v4)) {
            Some(kind) => refuse(kind),
            None => Ok(()),
        },
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                // Judged as the IPv4 address it reaches, named as it was given.
                return check_ip(IpAddr::V4(v4)).or_else(|e| refuse(e.kind));
            }
            if let Some(kind) = kind_of(V6_NOT_PUBLIC, |n: &Ipv6Net| n.contains(&v6)) {
                return refuse(kind);
            }
            if kind_of(&[(V6_GLOBAL_UNICAST, "")], |n: &Ipv6Net| n.contains(&v6)).is_none() {
                return refuse("non-global IPv6");
            }
            Ok(())
        }
    }
}

/// Names that mean this machine whatever DNS says (RFC 6761), refused without a lookup.
fn is_local_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// Resolves `host` and checks every address it gives; any non-public one refuses the
/// whole name (the connector could pick any of them).
pub async fn resolve_public(host: &str, port: u16) -> Result<Vec<SocketAddr>, LookupError> {
    if is_local_name(host) {
        return Err(LookupError::Refused(Refused(format!("{host} names this machine"))));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| LookupError::Failed(e.to_string()))?
        .collect();
    for a in &addrs {
        check_ip(a.ip()).map_err(|e| LookupError::Refused(Refused(format!("{host} resolves to {e}"))))?;
    }
    Ok(addrs)
}

#[derive(Debug)]
pub enum LookupError {
    /// The name resolved to a non-public address.
    Refused(Refused),
    /// The name did not resolve.
    Failed(String),
}

/// What a URL's host says before any lookup: `Ok(None)` for a public IP literal,
/// `Ok(Some(name))` for a name still to resolve (with `resolve_public`), `Err` for an IP
/// literal that may not be used. The URL parser has already turned the numeric forms
/// browsers accept (`2130706433`, `0x7f.1`) into dotted IPv4.
pub fn check_host(url: &reqwest::Url) -> Result<Option<String>, Refused> {
    let host = url.host_str().ok_or_else(|| Refused("the URL has no host".into()))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => check_ip(ip).map(|()| None).map_err(|e| Refused(e.to_string())),
        Err(_) => Ok(Some(host.to_string())),
    }
}

/// The delivery client's resolver: resolves with tokio and hands the connector only
/// addresses that passed `check_ip`, so what was checked is what is connected to.
/// reqwest does not call a resolver for IP-literal hosts; `check_host` covers those.
#[derive(Debug, Default, Clone, Copy)]
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port (or the scheme's) in its place.
            match resolve_public(&host, 0).await {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs),
                Err(LookupError::Refused(r)) => Err(Box::new(r) as Box<dyn std::error::Error + Send + Sync>),
                Err(LookupError::Failed(e)) => Err(format!("{host}: {e}").into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(addr: &str) -> Option<&'static str> {
        check_ip(addr.parse().unwrap()).err().map(|e| e.kind)
    }

    #[test]
    fn every_range_in_the_tables_is_a_valid_cidr() {
        for (net, _) in V4_NOT_PUBLIC {
            assert!(net.parse::<Ipv4Net>().is_ok(), "{net}");
        }
        for (net, _) in V6_NOT_PUBLIC.iter().chain(&[(V6_GLOBAL_UNICAST, "")]) {
            assert!(net.parse::<Ipv6Net>().is_ok(), "{net}");
        }
    }

    #[test]
    fn every_non_public_ipv4_range_is_refused_at_both_ends() {
        for (addr, expected) in [
            ("0.0.0.0", "\"this network\" (unspecified)"),
            ("0.255.255.255", "\"this network\" (unspecified)"),
            ("10.0.0.0", "private"),
            ("10.1.2.3", "private"),
            ("10.255.255.255", "private"),
            ("100.64.0.0", "shared (CGNAT)"),
            ("100.127.255.255", "shared (CGNAT)"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("169.254.169.254", "link-local"),
            ("169.254.0.0", "link-local"),
            ("172.16.0.0", "private"),
            ("172.31.255.255", "private"),
            ("192.0.0.0", "IETF protocol assignment"),
            ("192.0.0.255", "IETF protocol assignment"),
            ("192.0.2.1", "documentation"),
            ("192.88.99.1", "6to4 relay anycast (deprecated)"),
            ("192.168.0.1", "private"),
            ("192.168.255.255", "private"),
            ("198.18.0.0", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.255", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.254", "reserved"),
            ("255.255.255.255", "broadcast"),
        ] {
            assert_eq!(kind(addr), Some(expected), "{addr}");
        }
    }

    #[test]
    fn addresses_just_outside_the_ranges_are_public() {
        for addr in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450:4001::1",
        ] {
            assert_eq!(kind(addr), None, "{addr} is public");
        }
    }

    #[test]
    fn every_non_public_ipv6_range_is_refused() {
        for (addr, expected) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::7f00:1", "IPv4-compatible (deprecated)"),
            ("64:ff9b:1::a00:1", "local-use NAT64"),
            ("100::1", "discard-only"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:2::1", "IETF protocol assignment"),
            ("2001:1ff:ffff::1", "IETF protocol assignment"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("5f00::1", "SRv6 segment identifier"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("fec0::1", "site-local (deprecated)"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("4000::1", "non-global IPv6"),
            ("1::1", "non-global IPv6"),
        ] {
            assert_eq!(kind(addr), Some(expected), "{addr}");
        }
    }

    #[test]
    fn ipv6_forms_that_embed_ipv4_are_judged_by_the_ipv4_address() {
        for (addr, expected) in [
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.0.0.1", Some("private")),
            ("::ffff:169.254.169.254", Some("link-local")),
            ("::ffff:1.1.1.1", None),
            ("64:ff9b::127.0.0.1", Some("loopback")),
            ("64:ff9b::192.168.1.1", Some("private")),
            ("64:ff9b::1.1.1.1", None),
            ("2002:7f00:1::", Some("loopback")),
            ("2002:a9fe:a9fe::1", Some("link-local")),
            ("2002:0a00:0001::1", Some("private")),
            ("2002:0101:0101::1", None),
        ] {
            assert_eq!(kind(addr), expected, "{addr}");
        }
        assert_eq!(
            embedded_v4("2002:c000:0204::1".parse().unwrap()),
            Some(Ipv4Addr::new(192, 0, 2, 4))
        );
        // The refusal names the address as it was given.
        let e = check_ip("::ffff:127.0.0.1".parse().unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "::ffff:127.0.0.1 is a loopback address, not a public one"
        );
    }

    #[test]
    fn ip_literal_hosts_are_judged_before_any_lookup() {
        let host = |u: &str| check_host(&reqwest::Url::parse(u).unwrap());
        assert_eq!(host("https://1.1.1.1/cb"), Ok(None));
        assert_eq!(host("https://[2606:4700::1111]/cb"), Ok(None));
        assert_eq!(host("https://shop.example.com/cb"), Ok(Some("shop.example.com".into())));
        assert_eq!(host("http://localhost:8080/"), Ok(Some("localhost".into())));
        for refused in [
            "http://127.0.0.1:6379/",
            "http://[::1]:5432/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0/",
        ] {
            assert!(host(refused).is_err(), "{refused}");
        }
    }

    #[tokio::test]
    async fn names_are_judged_by_what_they_resolve_to() {
        for local in ["localhost", "LOCALHOST.", "api.localhost"] {
            let got = resolve_public(local, 80).await;
            assert!(matches!(got, Err(LookupError::Refused(_))), "{local}: {got:?}");
        }
        // A dotted literal resolves to itself without the network, as a name would.
        assert!(matches!(
            resolve_public("127.0.0.1", 80).await,
            Err(LookupError::Refused(_))
        ));
        assert!(matches!(
            resolve_public("::ffff:10.0.0.1", 80).await,
            Err(LookupError::Refused(_))
        ));
        assert!(matches!(resolve_public("1.1.1.1", 80).await, Ok(a) if a.len() == 1));
    }
}
