//! Verified key material, cached in memory so the signed hot path never asks Postgres.
//!
//! The whole table of live keys is held (thousands of keys are kilobytes), which also
//! means an unknown key is refused from memory exactly as fast as a known one: no
//! database round trip tells a caller whether a key exists. The cache is reloaded
//! whole when any gateway publishes a change (see `crate::sync`) and every
//! `CACHE_REFRESH_SECS` as a safety net against a lost message.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use deadpool_postgres::Pool;
use ipnet::IpNet;

use super::signing::Signer;
use crate::config::parse_cidr;
use crate::crypto::{Crypto, Purpose};

#[derive(Debug)]
pub struct Reseller {
    pub pk: i64,
    pub reseller_id: String,
    pub tier: String,
    pub suspended: bool,
    pub allowlist: Vec<IpNet>,
}

impl Reseller {
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allowlist.is_empty() || self.allowlist.iter().any(|n| n.contains(&ip))
    }
}

pub struct KeyEntry {
    pub signer: Signer,
    pub reseller: Arc<Reseller>,
}

#[derive(Default)]
pub struct KeyCache {
    // A std lock: held only to clone an Arc, never across an await.
    keys: RwLock<Arc<HashMap<String, Arc<KeyEntry>>>>,
}

impl KeyCache {
    pub fn get(&self, key_id: &str) -> Option<Arc<KeyEntry>> {
        let map = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        map.get(key_id).cloned()
    }

    pub async fn reload(&self, pg: &Pool, crypto: &Crypto) -> anyhow::Result<()> {
        let client = pg.get().await.context("loading API keys")?;
        let rows = client
            .query(
                "SELECT k.key_id, k.secret_enc, r.id, r.reseller_id, r.tier, r.status, r.ip_allowlist
                 FROM api_keys k JOIN resellers r ON r.id = k.reseller_id
                 WHERE k.revoked_at IS NULL",
                &[],
            )
            .await
            .context("loading API keys")?;
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
                    Arc::new(Reseller {
                        pk,
                        reseller_id: r.get(3),
                        tier: r.get(4),
                        suspended: r.get::<_, &str>(5) == "suspended",
                        allowlist: r
                            .get::<_, Vec<String>>(6)
                            .iter()
                            .filter_map(|c| parse_cidr(c))
                            .collect(),
                    })
                })
                .clone();
            keys.insert(
                key_id,
                Arc::new(KeyEntry {
                    signer: Signer::new(&secret),
                    reseller,
                }),
            );
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(())
    }
}
