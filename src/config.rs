//! Layered configuration: `config/default.toml` (compiled in), then the file named in
//! `CARDGATE_CONFIG`, then `CARDGATE_*` environment variables.
//!
//! The environment is passed in as a map rather than read here, so tests never touch
//! the process environment.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "CARDGATE";
const ENV_CONFIG_FILE: &str = "CARDGATE_CONFIG";
const ENV_TRUSTED_PROXIES: &str = "CARDGATE_HTTP__TRUSTED_PROXIES";

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn setting(name: &str, why: impl std::fmt::Display) -> Self {
        ConfigError(format!("{name}: {why}"))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub listen: String,
    /// `/admin/*` on this address only, off `listen` (an internal network).
    #[serde(default)]
    pub admin_listen: Option<String>,
    pub redis_url: SecretString,
    pub database_url: SecretString,
    pub master_key: Option<SecretString>,
    pub jwt_secret: Option<SecretString>,
    pub bootstrap_admin: Option<SecretString>,
    pub currency: String,
    pub redis_prefix: String,
    pub http: HttpConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub admin: AdminConfig,
    pub orders: OrdersConfig,
    pub overload: OverloadConfig,
    pub callbacks: CallbacksConfig,
    pub upstream: UpstreamConfig,
    pub vip: VipConfig,
    #[serde(default)]
    pub rebates: Vec<RebateBracket>,
    pub risk: RiskConfig,
    pub tiers: BTreeMap<String, Tier>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub window_days: u32,
    pub downgrade_grace_days: u32,
    pub rebate_close_delay_hours: u32,
}

/// What a risk rule does when it fires (docs/api.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RiskAction {
    Flag,
    Hold,
    Off,
}

impl RiskAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskAction::Flag => "flag",
            RiskAction::Hold => "hold",
            RiskAction::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskConfig {
    pub new_address: RiskAction,
    pub velocity: RiskAction,
    pub velocity_factor: f64,
    pub velocity_min_per_minute: u32,
    pub failed_signatures: RiskAction,
    pub failed_signatures_per_minute: u32,
    pub refund_rate: RiskAction,
    pub refund_rate_max: f64,
}

/// One `[[rebates]]` bracket: a month's spend of at least `min_spend` earns `rate_bp`
/// basis points of all of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebateBracket {
    pub min_spend: i64,
    pub rate_bp: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub json_body_max_bytes: usize,
    pub import_body_max_bytes: u64,
    pub header_read_timeout_ms: u64,
    pub header_max_bytes: usize,
    pub body_read_timeout_ms: u64,
    pub import_read_timeout_ms: u64,
    pub connections_max: usize,
    pub connections_per_client_max: usize,
    pub linger_ms: u64,
    pub linger_max_bytes: u64,
    pub shutdown_grace_ms: u64,
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub pool_size: usize,
    pub order_pool_size: usize,
    pub connect_timeout_ms: u64,
    pub statement_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis_url` names a Redis Cluster even with a single seed node (several seeds,
    /// comma-separated, always do).
    #[serde(default)]
    pub cluster: bool,
    pub connect_timeout_ms: u64,
    pub response_timeout_ms: u64,
    pub rebuild_recent_orders: u64,
    /// Home cells resellers are spread over (docs/design.md, "Scale-out"); each is one
    /// hash tag, so a Redis Cluster can place them on different nodes. 1: one tag.
    pub cells: u32,
    /// How often the stock mover rebalances the cells' pools, in milliseconds.
    pub mover_interval_ms: u64,
    /// How long a sell-out found is trusted (`crate::stock::sold_out`), in milliseconds.
    pub sold_out_trust_ms: u64,
    /// Catalogues of more products than this are counted by a shared fetch
    /// (`crate::stock::counts`), each count used for `catalogue_counts_ms`.
    pub catalogue_live_max: usize,
    pub catalogue_counts_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub token_ttl_secs: u64,
    pub report_concurrency: usize,
    pub import_concurrency: usize,
    /// Callers that may wait for a turn at heavy work (`crate::bulkhead`), and how long.
    pub heavy_work_queue: usize,
    pub heavy_work_wait_ms: u64,
    pub login_per_address_per_minute: u32,
    pub login_per_address_burst: u32,
    pub password_hash_concurrency: usize,
    pub password_hash_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersConfig {
    pub commit_timeout_ms: u64,
    pub ledger_batch_max: usize,
    pub ledger_writers: usize,
    pub idempotency_ttl_secs: u64,
    pub claim_idle_ms: u64,
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverloadConfig {
    pub max_in_flight_orders: usize,
    pub standing_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbacksConfig {
    pub timeout_ms: u64,
    pub concurrency: usize,
    pub poll_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub retention_days: u32,
    /// Lets `callback_url` reach loopback, private and other non-public addresses.
    pub allow_private_targets: bool,
}

/// Upstream sourcing (docs/api.md §8).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// How long an order waits for a supplier's codes before it is answered `202`.
    pub answer_within_ms: u64,
    /// How long a gateway holds an open purchase it works on; past it, any gateway may
    /// resume the purchase.
    pub lease_ms: u64,
    /// Between two rounds of asking the sources of a purchase still open.
    pub retry_ms: u64,
    /// Orders of this gateway that may wait on suppliers at once; the rest are answered
    /// `202` without waiting, so a slow supplier cannot hold sockets and memory without
    /// bound.
    pub max_in_flight: usize,
    /// Supplier URLs may be loopback or private addresses (a supplier is often on a
    /// private network); `false` holds them to the callback guard.
    pub allow_private_targets: bool,
    /// Unknown outcomes in a row (timeouts, `5xx`, lost connections) that open a
    /// supplier's circuit in this gateway.
    pub circuit_failures: u32,
    /// How long an open circuit stays open before one trial call is let through.
    pub circuit_open_ms: u64,
    /// Recent calls per supplier kept for its success rate and latency (memory: a few
    /// bytes each, per supplier).
    pub health_window: u32,
    /// How often each supplier's reported balance is read.
    pub balance_poll_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub priority: u32,
    pub orders_per_second: u32,
    pub orders_burst: u32,
    pub reads_per_second: u32,
    pub reads_burst: u32,
    pub max_quantity: u32,
    pub max_batch: u32,
    /// Spend over the `[vip]` window that earns this tier; `None`: operators only.
    #[serde(default)]
    pub upgrade_spend: Option<i64>,
}

/// Settings checked and decoded once at start-up.
#[derive(Debug, Clone)]
pub struct Validated {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub master_key: [u8; 32],
    pub trusted_proxies: Vec<IpNet>,
}

impl Config {
    /// Loads from the process environment. Only `main` calls this.
    pub fn from_process_env() -> Result<Self, ConfigError> {
        Self::load(&std::env::vars().collect())
    }

    pub fn load(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut defaults: toml::Table = DEFAULT_TOML
            .parse()
            .map_err(|e| ConfigError::setting("config/default.toml", e))?;
        let mut file = None;
        if let Some(path) = env.get(ENV_CONFIG_FILE).filter(|p| !p.is_empty()) {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::setting(ENV_CONFIG_FILE, format!("cannot read {path}: {e}")))?;
            let table: toml::Table = text
                .parse()
                .map_err(|e| ConfigError::setting(ENV_CONFIG_FILE, format!("{path} is not valid TOML: {e}")))?;
            // A tier table in the override file replaces the default one whole, instead of
            // being merged key by key: an operator who writes [tiers.gold] means that table.
            // The environment still overrides it, as it does every other setting.
            if let (Some(toml::Value::Table(theirs)), Some(toml::Value::Table(ours))) =
                (table.get("tiers"), defaults.get_mut("tiers"))
            {
                for name in theirs.keys() {
                    ours.remove(name);
                }
            }
            file = Some(text);
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(&defaults.to_string(), config::FileFormat::Toml));
        if let Some(text) = &file {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        // Only our own names: CARDGATE_CONFIG and the dev script's helpers are not settings.
        let mut env_settings: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("CARDGATE_") && *k != ENV_CONFIG_FILE && !k.starts_with("CARDGATE_DEV_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Values stay strings until each is read as its setting's type: parsed early, a
        // master key of decimal digits became a number and lost its zeros. The one list
        // is split here.
        if let Some(list) = env_settings.remove(ENV_TRUSTED_PROXIES) {
            let items: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect();
            builder = builder.set_override("http.trusted_proxies", items).map_err(describe)?;
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .separator("__")
                .prefix_separator("_")
                .source(Some(env_settings)),
        );
        let raw = builder.build().map_err(describe)?;
        raw.try_deserialize().map_err(describe)
    }

    /// Checks every setting and decodes the ones used in binary form. Messages name the
    /// setting and never echo a secret's value.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        // A hash slot per cell at most: Redis Cluster has 16384.
        if !(1..=16384).contains(&self.redis.cells) {
            return Err(ConfigError::setting(
                "redis.cells (CARDGATE_REDIS__CELLS)",
                "must be between 1 and 16384",
            ));
        }
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| ConfigError::setting("listen (CARDGATE_LISTEN)", "must be an address like 127.0.0.1:8080"))?;
        let admin_listen = match self.admin_listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                ConfigError::setting(
                    "admin_listen (CARDGATE_ADMIN_LISTEN)",
                    "must be an address like 10.0.0.5:8081",
                )
            })?),
        };
        self.validate_redis_url()?;
        if self.upstream.max_in_flight > 100_000 {
            return Err(ConfigError::setting("upstream.max_in_flight", "must be at most 100000"));
        }
        if self
            .database_url
            .expose_secret()
            .parse::<tokio_postgres::Config>()
            .is_err()
        {
            return Err(ConfigError::setting(
                "database_url (CARDGATE_DATABASE_URL)",
                "must be a postgres:// URL or a libpq connection string",
            ));
        }
        let master_key = self
            .master_key
            .as_ref()
            .ok_or_else(|| ConfigError::setting("master_key (CARDGATE_MASTER_KEY)", "is required"))
            .and_then(|k| {
                parse_master_key(k.expose_secret()).ok_or_else(|| {
                    ConfigError::setting(
                        "master_key (CARDGATE_MASTER_KEY)",
                        "must be 64 hexadecimal characters (32 bytes)",
                    )
                })
            })?;
        match &self.jwt_secret {
            None => return Err(ConfigError::setting("jwt_secret (CARDGATE_JWT_SECRET)", "is required")),
            Some(secret) if secret.expose_secret().len() < 32 => {
                return Err(ConfigError::setting(
                    "jwt_secret (CARDGATE_JWT_SECRET)",
                    "must be at least 32 characters",
                ))
            }
            Some(_) => {}
        }
        if let Some(admin) = &self.bootstrap_admin {
            match admin.expose_secret().split_once(':') {
                Some((user, pass)) if !user.is_empty() && pass.len() >= 8 => {}
                _ => {
                    return Err(ConfigError::setting(
                        "bootstrap_admin (CARDGATE_BOOTSTRAP_ADMIN)",
                        "must be user:password with a password of at least 8 characters",
                    ))
                }
            }
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::setting(
                "currency",
                "must be a three-letter upper-case code such as CNY",
            ));
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}']) {
            return Err(ConfigError::setting(
                "redis_prefix",
                "must be non-empty and free of braces",
            ));
        }
        let h = &self.http;
        positive("http.json_body_max_bytes", h.json_body_max_bytes as u64)?;
        positive("http.import_body_max_bytes", h.import_body_max_bytes)?;
        positive("http.header_read_timeout_ms", h.header_read_timeout_ms)?;
        positive("http.header_max_bytes", h.header_max_bytes as u64)?;
        positive("http.body_read_timeout_ms", h.body_read_timeout_ms)?;
        positive("http.import_read_timeout_ms", h.import_read_timeout_ms)?;
        positive("http.connections_max", h.connections_max as u64)?;
        positive("http.connections_per_client_max", h.connections_per_client_max as u64)?;
        positive("http.linger_ms", h.linger_ms)?;
        positive("http.linger_max_bytes", h.linger_max_bytes)?;
        positive("postgres.pool_size", self.postgres.pool_size as u64)?;
        // The ledger writers each hold one; the rest serve order lookups and the rebuild.
        if self.postgres.order_pool_size <= self.orders.ledger_writers {
            return Err(ConfigError::setting(
                "postgres.order_pool_size",
                "must be more than orders.ledger_writers",
            ));
        }
        positive("admin.report_concurrency", self.admin.report_concurrency as u64)?;
        positive("admin.import_concurrency", self.admin.import_concurrency as u64)?;
        positive("admin.heavy_work_wait_ms", self.admin.heavy_work_wait_ms)?;
        positive("postgres.connect_timeout_ms", self.postgres.connect_timeout_ms)?;
        positive("postgres.statement_timeout_ms", self.postgres.statement_timeout_ms)?;
        positive("redis.connect_timeout_ms", self.redis.connect_timeout_ms)?;
        positive("redis.response_timeout_ms", self.redis.response_timeout_ms)?;
        let a = &self.admin;
        positive("admin.token_ttl_secs", a.token_ttl_secs)?;
        positive(
            "admin.login_per_address_per_minute",
            a.login_per_address_per_minute as u64,
        )?;
        positive("admin.login_per_address_burst", a.login_per_address_burst as u64)?;
        positive("admin.password_hash_concurrency", a.password_hash_concurrency as u64)?;
        positive("admin.password_hash_wait_ms", a.password_hash_wait_ms)?;
        let o = &self.orders;
        positive("orders.commit_timeout_ms", o.commit_timeout_ms)?;
        positive("orders.idempotency_ttl_secs", o.idempotency_ttl_secs)?;
        positive("orders.claim_idle_ms", o.claim_idle_ms)?;
        positive("orders.drain_timeout_ms", o.drain_timeout_ms)?;
        if !(1..=64).contains(&o.ledger_writers) {
            return Err(ConfigError::setting("orders.ledger_writers", "must be 1 to 64"));
        }
        if !(1..=10_000).contains(&o.ledger_batch_max) {
            return Err(ConfigError::setting("orders.ledger_batch_max", "must be 1 to 10000"));
        }
        let u = &self.upstream;
        positive("upstream.circuit_failures", u.circuit_failures as u64)?;
        positive("upstream.circuit_open_ms", u.circuit_open_ms)?;
        positive("upstream.balance_poll_ms", u.balance_poll_ms)?;
        if !(1..=10_000).contains(&u.health_window) {
            return Err(ConfigError::setting("upstream.health_window", "must be 1 to 10000"));
        }
        let trusted_proxies = h
            .trusted_proxies
            .iter()
            .map(|p| {
                parse_cidr(p)
                    .ok_or_else(|| ConfigError::setting("http.trusted_proxies", format!("{p:?} is not an IP or CIDR")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.tiers.is_empty() {
            return Err(ConfigError::setting("tiers", "at least one tier is needed"));
        }
        for (name, t) in &self.tiers {
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ConfigError::setting(
                    &format!("tiers.{name}"),
                    "tier names use [A-Za-z0-9_-]",
                ));
            }
            for (field, v) in [
                ("orders_per_second", t.orders_per_second),
                ("orders_burst", t.orders_burst),
                ("reads_per_second", t.reads_per_second),
                ("reads_burst", t.reads_burst),
                ("max_quantity", t.max_quantity),
                ("max_batch", t.max_batch),
            ] {
                positive(&format!("tiers.{name}.{field}"), v as u64)?;
            }
            if t.max_batch > 100 {
                return Err(ConfigError::setting(&format!("tiers.{name}.max_batch"), "at most 100"));
            }
            if let Some(s) = t.upgrade_spend {
                if !(1..=crate::money::MONEY_MAX_MINOR).contains(&s) {
                    return Err(ConfigError::setting(
                        &format!("tiers.{name}.upgrade_spend"),
                        format!("between 1 and {}", crate::money::MONEY_MAX_MINOR),
                    ));
                }
            }
        }
        positive("vip.window_days", self.vip.window_days as u64)?;
        let r = &self.risk;
        // Bad signatures can come from anyone who knows a key_id: a rule they drive must
        // never lock the reseller out.
        if r.failed_signatures == RiskAction::Hold {
            return Err(ConfigError::setting(
                "risk.failed_signatures",
                "can only flag or be off: bad signatures may come from anyone who knows a key_id",
            ));
        }
        if !(r.velocity_factor.is_finite() && r.velocity_factor > 0.0) {
            return Err(ConfigError::setting("risk.velocity_factor", "a positive number"));
        }
        positive("risk.velocity_min_per_minute", r.velocity_min_per_minute as u64)?;
        positive(
            "risk.failed_signatures_per_minute",
            r.failed_signatures_per_minute as u64,
        )?;
        if !(0.0..=1.0).contains(&r.refund_rate_max) {
            return Err(ConfigError::setting("risk.refund_rate_max", "between 0 and 1"));
        }
        for (i, b) in self.rebates.iter().enumerate() {
            if !(0..=crate::money::MONEY_MAX_MINOR).contains(&b.min_spend) || b.rate_bp > 10_000 {
                return Err(ConfigError::setting(
                    &format!("rebates[{i}]"),
                    "min_spend between 0 and 10^15, rate_bp at most 10000",
                ));
            }
        }
        Ok(Validated {
            listen,
            admin_listen,
            master_key,
            trusted_proxies,
        })
    }

    /// One `redis://` URL, or a Redis Cluster's seed nodes, comma-separated.
    fn validate_redis_url(&self) -> Result<(), ConfigError> {
        const SETTING: &str = "redis_url (CARDGATE_REDIS_URL)";
        let url = self.redis_url.expose_secret();
        let seeds = crate::store::redis::seed_urls(url);
        if seeds.is_empty() || seeds.len() != url.split(',').count() {
            return Err(ConfigError::setting(
                SETTING,
                "must be a redis:// URL, or a Redis Cluster's nodes as redis:// URLs separated by commas",
            ));
        }
        let mut databases = Vec::new();
        for seed in &seeds {
            let client = redis::Client::open(*seed)
                .ok()
                .filter(|_| seed.starts_with("redis://") || seed.starts_with("rediss://"));
            let Some(client) = client else {
                return Err(ConfigError::setting(
                    SETTING,
                    "must be a redis:// URL (each one, for a cluster)",
                ));
            };
            databases.push(client.get_connection_info().redis_settings().db());
        }
        if seeds.len() > 1 || self.redis.cluster {
            // A cluster has database 0 only: a node asked for another would refuse at start-up.
            if databases.iter().any(|db| *db != 0) {
                return Err(ConfigError::setting(
                    SETTING,
                    "names a Redis Cluster, which has database 0 only",
                ));
            }
            redis::cluster::ClusterClient::new(seeds.clone())
                .map_err(|_| ConfigError::setting(SETTING, "is not a valid list of Redis Cluster nodes"))?;
        }
        Ok(())
    }

    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

fn positive(name: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::setting(name, "must be greater than zero"));
    }
    Ok(())
}

fn parse_master_key(hex_key: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key.trim(), &mut key).ok()?;
    Some(key)
}

/// An address or a CIDR block; a bare address is a /32 or /128.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// The `config` crate's errors name the key and the expected type; values of secret
/// settings are strings, so a type error never carries one, but a parse failure is
/// rephrased to be sure nothing beyond the key leaks.
fn describe(e: config::ConfigError) -> ConfigError {
    let text = e.to_string();
    for secret in [
        "master_key",
        "jwt_secret",
        "bootstrap_admin",
        "database_url",
        "redis_url",
    ] {
        if text.contains(secret) {
            return ConfigError::setting(secret, "has an invalid value");
        }
    }
    ConfigError(text)
}
