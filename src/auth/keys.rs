//! Verified key material, cached in memory so the signed hot path never asks Postgres.
//!
//! The whole table of live keys is held (thousands of keys are kilobytes), which also
//! means an unknown key is refused from memory exactly as fast as a known one: no
//! database round trip tells a caller whether a key exists. The cache is reloaded
//! whole when any gateway publishes a change (see `crate::sync`) and every
//! `CACHE_REFRESH_SECS` as a safety net against a lost message.
//!
//! A key's expiry is judged against the gateway's clock when a request comes
//! ([`KeyEntry::live_at`]), not when the cache was loaded: a key expires on time on every
//! gateway without any reload.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use deadpool_postgres::Pool;
use ipnet::IpNet;

use super::scopes::Scopes;
use super::signing::Signer;
use crate::clock::Clock;
use crate::config::parse_cidr;
use crate::crypto::{Crypto, Purpose};
use crate::sync::Latest;

#[derive(Debug)]
pub struct Reseller {
    pub pk: i64,
    pub reseller_id: String,
    pub tier: String,
    pub suspended: bool,
    pub allowlist: Allowlist,
    /// Orders may take the balance down to `-credit_limit` (docs/api.md §6).
    pub credit_limit: i64,
    /// Minor units per UTC day (docs/api.md §7), counted by the reservation script.
    pub daily_spend_limit: Option<i64>,
}

impl Reseller {
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allowlist.allows(ip)
    }
}

/// A reseller's IP allow-list as stored: empty allows every address; otherwise only the
/// networks it names. An entry that does not parse (written around the API's check)
/// names no address: it is never dropped, since dropping every entry of a list would
/// turn it into the empty list that allows all.
#[derive(Debug, Default)]
pub struct Allowlist {
    nets: Vec<IpNet>,
    restricted: bool,
}

impl Allowlist {
    pub fn parse(entries: &[String]) -> Allowlist {
        Allowlist {
            nets: entries.iter().filter_map(|c| parse_cidr(c)).collect(),
            restricted: !entries.is_empty(),
        }
    }

    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        !self.restricted || self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Entries that did not parse, and so allow nothing.
    pub fn unparsed(&self, entries: &[String]) -> usize {
        entries.len() - self.nets.len()
    }
}

/// A key's own settings: chosen when it is made and carried over whole to the key that
/// replaces it in a rotation (`crate::resellers::rotate_key`). Per-key limits belong here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySettings {
    pub scopes: Scopes,
    pub label: Option<String>,
    /// Minor units per UTC day this key may spend (docs/api.md §7); `None`: no limit.
    pub daily_spend_limit: Option<i64>,
}

impl Default for KeySettings {
    fn default() -> Self {
        KeySettings {
            scopes: Scopes::ALL,
            label: None,
            daily_spend_limit: None,
        }
    }
}

impl KeySettings {
    /// The settings' columns of `api_keys` aliased `k`, in the order [`KeySettings::from_row`]
    /// reads them.
    pub const COLUMNS: &'static str = "k.scopes, k.label, k.daily_spend_limit";

    /// Reads [`KeySettings::COLUMNS`] from `row`, starting at column `at`.
    pub fn from_row(row: &tokio_postgres::Row, at: usize) -> KeySettings {
        KeySettings {
            scopes: Scopes::from_stored(&row.get::<_, Vec<String>>(at)),
            label: row.get(at + 1),
            daily_spend_limit: row.get(at + 2),
        }
    }
}

pub struct KeyEntry {
    pub signer: Signer,
    pub reseller: Arc<Reseller>,
    pub settings: KeySettings,
    /// Unix milliseconds from which the key is refused; `None`: it does not expire.
    pub expires_at_ms: Option<i64>,
}

impl KeyEntry {
    /// Whether the key may still sign at `now_ms` (the gateway's clock).
    pub fn live_at(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_none_or(|end| now_ms < end)
    }
}

#[derive(Default)]
pub struct KeyCache {
    keys: Latest<HashMap<String, Arc<KeyEntry>>>,
}

impl KeyCache {
    pub fn get(&self, key_id: &str) -> Option<Arc<KeyEntry>> {
        self.keys.get().get(key_id).cloned()
    }

    /// Loads every key that is neither revoked nor expired by `clock` now (one that expires
    /// later is still refused on time, by [`KeyEntry::live_at`]).
    pub async fn reload(&self, pg: &Pool, crypto: &Crypto, clock: &Clock) -> anyhow::Result<()> {
        let ticket = self.keys.ticket();
        let client = pg.get().await.context("loading API keys")?;
        let sql = format!(
            "SELECT k.key_id, k.secret_enc, r.id, r.reseller_id, r.tier, r.status, r.ip_allowlist, r.credit_limit,
                    r.daily_spend_limit, k.expires_at, {}
             FROM api_keys k JOIN resellers r ON r.id = k.reseller_id
             WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $1)",
            KeySettings::COLUMNS
        );
        let rows = client.query(&sql, &[&clock.now()]).await.context("loading API keys")?;
        let mut resellers: HashMap<i64, Arc<Reseller>> = HashMap::new();
        let mut keys = HashMap::with_capacity(rows.len());
        for r in rows {
            let key_id: String = r.get(0);
            let Ok(secret) = crypto.decrypt(Purpose::ApiSecret { key_id: &key_id }, r.get(1)) else {
                // Sealed under another master key: unusable, and said once per reload.
                tracing::error!(
                    key_id,
                    "an API key's secret does not decrypt under the configured master key"
                );
                continue;
            };
            let pk: i64 = r.get(2);
            let reseller = resellers
                .entry(pk)
                .or_insert_with(|| {
                    let reseller_id: String = r.get(3);
                    let entries: Vec<String> = r.get(6);
                    let allowlist = Allowlist::parse(&entries);
                    if allowlist.unparsed(&entries) > 0 {
                        tracing::error!(
                            reseller_id,
                            unparsed = allowlist.unparsed(&entries),
                            "ip_allowlist entries that are not an IP or CIDR allow no address"
                        );
                    }
                    Arc::new(Reseller {
                        pk,
                        reseller_id,
                        tier: r.get(4),
                        suspended: r.get::<_, &str>(5) == "suspended",
                        allowlist,
                        credit_limit: r.get(7),
                        daily_spend_limit: r.get(8),
                    })
                })
                .clone();
            let expires_at: Option<time::OffsetDateTime> = r.get(9);
            keys.insert(
                key_id,
                Arc::new(KeyEntry {
                    signer: Signer::new(&secret),
                    reseller,
                    settings: KeySettings::from_row(&r, 10),
                    expires_at_ms: expires_at.map(unix_ms),
                }),
            );
        }
        self.keys.install(ticket, keys);
        Ok(())
    }
}

fn unix_ms(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_refused_from_the_millisecond_it_expires() {
        let entry = |expires_at_ms| KeyEntry {
            signer: Signer::new(b"secret"),
            reseller: Arc::new(Reseller {
                pk: 1,
                reseller_id: "rs_1".into(),
                tier: "gold".into(),
                suspended: false,
                allowlist: Allowlist::default(),
                credit_limit: 0,
                daily_spend_limit: None,
            }),
            settings: KeySettings::default(),
            expires_at_ms,
        };
        assert!(entry(None).live_at(i64::MAX));
        let ends = entry(Some(1_700_000_000_000));
        assert!(ends.live_at(1_699_999_999_999));
        assert!(!ends.live_at(1_700_000_000_000) && !ends.live_at(1_700_000_000_001));
    }

    #[test]
    fn an_entry_that_does_not_parse_narrows_the_list_never_widens_it() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(Allowlist::parse(&[]).allows(ip("203.0.113.9")));
        let bad = Allowlist::parse(&["not-an-ip".to_string()]);
        assert!(!bad.allows(ip("203.0.113.9")) && !bad.allows(ip("127.0.0.1")));
        let mixed = Allowlist::parse(&["198.51.100.0/24".to_string(), "10.0.0.999".to_string()]);
        assert!(mixed.allows(ip("198.51.100.7")) && !mixed.allows(ip("203.0.113.9")));
    }
}
