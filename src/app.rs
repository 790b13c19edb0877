//! Shared state of one gateway process, built once at start-up.

use std::sync::Arc;

use anyhow::Context;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::ExposeSecret;

use crate::auth::admin::{Passwords, Tokens};
use crate::auth::keys::KeyCache;
use crate::auth::last_used::LastUsed;
use crate::bulkhead::Bulkheads;
use crate::catalogue::Catalogue;
use crate::clock::Clock;
use crate::config::{Config, Validated};
use crate::crypto::Crypto;
use crate::health::Health;
use crate::ledger::Waiters;
use crate::overload::Admission;
use crate::ratelimit::{AddressLimiter, RateLimits};
use crate::store::{self, coalesce::Coalescer, keys::Keys};
use crate::telemetry;

pub struct App {
    pub config: Config,
    pub settings: Validated,
    /// Everything but the order path: operator routes, callbacks, rollups, gauges.
    pub pg: Pool,
    /// The order path's own (docs/invariants.md invariant 9): ledger writers, order lookups, key
    /// and catalogue reloads, the Redis rebuild. No other route can take its connections.
    pub pg_orders: Pool,
    /// Heavy operator work, bounded so that it cannot crowd out orders.
    pub bulkheads: Bulkheads,
    pub redis: store::redis::Redis,
    /// Signed reads' Redis commands, many requests to a pipeline.
    pub coalescer: Coalescer,
    pub pool_counts: crate::stock::mover::PoolCounts,
    /// A large catalogue's counts, shared by the reads of a moment.
    pub catalogue_counts: crate::stock::counts::CatalogueCounts,
    pub keys: Keys,
    pub metrics: PrometheusHandle,
    pub crypto: Crypto,
    pub tokens: Tokens,
    /// Argon2id work of logins and password changes, bounded on its own.
    pub passwords: Passwords,
    /// Logins per client address, refused before any work is done.
    pub login_limiter: AddressLimiter,
    /// For connections of their own (pub/sub), apart from the shared multiplexed one.
    pub redis_client: store::redis::Client,
    pub key_cache: KeyCache,
    /// Keys' uses not yet written to Postgres (`crate::auth::last_used`).
    pub last_used: LastUsed,
    pub catalogue: Catalogue,
    pub rate_limits: RateLimits,
    /// Order requests of this process waiting for the ledger writer.
    pub waiters: Waiters,
    pub health: Health,
    /// The health probe's own Postgres connection.
    pub probe: store::pg::Probe,
    pub admission: Admission,
    /// The time of day, for everything that reads it (`crate::clock`).
    pub clock: Clock,
    /// What the risk rules saw, for the background task to record (`crate::risk`).
    pub risk: crate::risk::Queue,
    /// Orders waiting on a supplier inside their answer window (`crate::upstream`): past
    /// `upstream.max_in_flight`, an order is answered `202` at once instead of waiting.
    pub upstream_slots: Arc<tokio::sync::Semaphore>,
    /// Every supplier's health as this gateway sees it (`crate::upstream::health`).
    pub supplier_health: crate::upstream::health::Suppliers,
    /// Sell-outs this gateway found (`crate::stock::sold_out`).
    pub sold_out: crate::stock::sold_out::SoldOut,
}

impl App {
    /// Validates the configuration, migrates Postgres and connects to both stores.
    pub async fn build(config: Config) -> anyhow::Result<Arc<App>> {
        App::build_with_clock(config, Clock::System).await
    }

    /// [`App::build`] reading the time from `clock` (tests: a manual one).
    pub async fn build_with_clock(config: Config, clock: Clock) -> anyhow::Result<Arc<App>> {
        let settings = config.validate()?;
        let metrics = telemetry::prometheus();
        store::pg::migrate(&config).await?;
        let pg = store::pg::pool(&config, config.postgres.pool_size)?;
        let pg_orders = store::pg::pool(&config, config.postgres.order_pool_size)?;
        store::pg::ping(&pg_orders).await.context("Postgres is not answering")?;
        let redis_client = store::redis::client(&config)?;
        let redis = store::redis::connect(&redis_client, &config).await?;
        let keys = Keys::with_cells(&config.redis_prefix, config.redis.cells);
        let crypto = Crypto::new(&settings.master_key);
        let jwt_secret = config
            .jwt_secret
            .as_ref()
            .map(|s| s.expose_secret().as_bytes().to_vec())
            .unwrap_or_default();
        let tokens = Tokens::new(&jwt_secret, std::time::Duration::from_secs(config.admin.token_ttl_secs));
        let rate_limits = RateLimits::new(&config.tiers);
        let passwords = Passwords::new(
            config.admin.password_hash_concurrency,
            std::time::Duration::from_millis(config.admin.password_hash_wait_ms),
        );
        let login_limiter = AddressLimiter::per_minute(
            config.admin.login_per_address_per_minute,
            config.admin.login_per_address_burst,
        );
        let admission = Admission::new(
            &config.tiers,
            config.overload.max_in_flight_orders,
            std::time::Duration::from_millis(config.overload.standing_ms),
        );
        let bulkheads = Bulkheads::new(&config.admin);
        let catalogue_counts = crate::stock::counts::CatalogueCounts::new(std::time::Duration::from_millis(
            config.redis.catalogue_counts_ms,
        ));
        let sold_out =
            crate::stock::sold_out::SoldOut::new(std::time::Duration::from_millis(config.redis.sold_out_trust_ms));
        let probe = store::pg::Probe::new(&config)?;
        let upstream_slots = Arc::new(tokio::sync::Semaphore::new(config.upstream.max_in_flight));
        let supplier_health = crate::upstream::health::Suppliers::new(&config.upstream);
        let app = App {
            config,
            settings,
            pg,
            pg_orders,
            bulkheads,
            coalescer: Coalescer::start(redis.clone()),
            pool_counts: Default::default(),
            catalogue_counts,
            redis,
            keys,
            metrics,
            crypto,
            tokens,
            passwords,
            login_limiter,
            redis_client,
            key_cache: KeyCache::default(),
            last_used: LastUsed::default(),
            catalogue: Catalogue::default(),
            rate_limits,
            waiters: Waiters::default(),
            health: Health::default(),
            probe,
            admission,
            clock,
            risk: Default::default(),
            upstream_slots,
            supplier_health,
            sold_out,
        };
        app.bootstrap_admin().await?;
        app.key_cache.reload(&app.pg_orders, &app.crypto, &app.clock).await?;
        app.catalogue.reload(&app.pg_orders).await?;
        Ok(Arc::new(app))
    }

    /// Creates the `CARDGATE_BOOTSTRAP_ADMIN` account when no admin account exists yet.
    async fn bootstrap_admin(&self) -> anyhow::Result<()> {
        let Some(spec) = &self.config.bootstrap_admin else {
            return Ok(());
        };
        let Some((user, password)) = spec.expose_secret().split_once(':') else {
            return Ok(());
        };
        let client = self.pg.get().await?;
        if client
            .query_opt("SELECT 1 FROM admins WHERE role = 'admin' LIMIT 1", &[])
            .await?
            .is_some()
        {
            return Ok(());
        }
        let hash = crate::auth::admin::hash_password(password).map_err(|e| anyhow::anyhow!("{e}"))?;
        let created = client
            .execute(
                "INSERT INTO admins (username, password_hash, role) VALUES ($1, $2, 'admin') ON CONFLICT (username) DO NOTHING",
                &[&user, &hash],
            )
            .await?;
        if created == 1 {
            crate::audit::record(
                &client,
                &crate::audit::Actor::system(),
                "admin.bootstrap",
                Some(user),
                None,
                serde_json::json!({}),
            )
            .await?;
            tracing::info!(username = user, "created the bootstrap admin");
        }
        Ok(())
    }

    /// A Redis handle for one request; clones share the one multiplexed connection.
    pub fn redis(&self) -> store::redis::Redis {
        self.redis.clone()
    }
}
