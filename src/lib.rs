//! cardgate: API gateway and delivery engine for digital-goods wholesale.
//!
//! `main` reads the configuration and calls [`run`]; everything else is a library so
//! that tests drive the real server on a port of their own.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod balance;
pub mod bulkhead;
pub mod callbacks;
pub mod catalogue;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod error;
pub mod gauges;
pub mod growth;
pub mod health;
pub mod hot_balance;
pub mod http;
pub mod ids;
pub mod ledger;
pub mod money;
pub mod orders;
pub mod overload;
pub mod ratelimit;
pub mod rebates;
pub mod rebuild;
pub mod reconcile;
pub mod reports;
pub mod resellers;
pub mod reserve;
pub mod risk;
pub mod rollups;
pub mod statements;
pub mod stock;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

pub use config::Config;

/// Runs `round` every `period` for as long as the task lives: the background work each
/// gateway repeats (probes, gauges, rollups). A round that overruns delays the next
/// instead of bunching them.
pub(crate) async fn every<F: Future<Output = ()>>(period: std::time::Duration, mut round: impl FnMut() -> F) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        round().await;
    }
}

/// A gateway that is connected, migrated and bound, ready to serve.
pub struct Server {
    app: Arc<app::App>,
    listener: TcpListener,
    /// `admin_listen`'s, when configured: `/admin` is served there and not on `listener`.
    admin_listener: Option<TcpListener>,
    /// See [`Server::manual_background`].
    manual_background: bool,
}

impl Server {
    /// Validates `config`, migrates Postgres, connects to Redis and rebuilds it from
    /// Postgres if it lost its state. The listener is already bound, so tests can bind
    /// port 0 and learn the address first.
    /// `admin_listen`, when set, is bound here (port 0 works: see [`Server::admin_addr`]).
    pub async fn build(config: Config, listener: TcpListener) -> anyhow::Result<Server> {
        Server::build_with_clock(config, listener, clock::Clock::System).await
    }

    /// [`Server::build`] on `clock`: tests build a gateway on a manual clock to move its time.
    pub async fn build_with_clock(
        config: Config,
        listener: TcpListener,
        clock: clock::Clock,
    ) -> anyhow::Result<Server> {
        let app = app::App::build_with_clock(config, clock).await?;
        let admin_listener = match app.settings.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on admin_listen {addr}"))?,
            ),
            None => None,
        };
        health::check(&app).await;
        Ok(Server {
            app,
            listener,
            admin_listener,
            manual_background: false,
        })
    }

    /// For tests: the periodic background loops (the health and rebuild watcher, callback
    /// delivery, gauges, rollups, hot-balance settling, the rebates' monthly close, keys'
    /// last use, growth, risk signals, upstream purchases, suppliers' balances, the stock
    /// mover's rebalancing) are not started; the test runs their steps itself
    /// (`health::check`, `Dispatcher::step`, `gauges::step`, `rollups::step`,
    /// `hot_balance::settle_due`, `rebates::step`, `auth::last_used::flush`,
    /// `growth::step`, `risk::step`, `upstream::step`, `upstream::health::poll_balances`,
    /// `stock::mover::step`) and so never waits for them. The ledger writers and the cache
    /// listeners still run: orders need them, as they need a dry cell filled at once
    /// (`stock::mover::fill`, called by the order itself).
    pub fn manual_background(mut self) -> Self {
        self.manual_background = true;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The gateway's shared state: tests run single steps of background work on it.
    pub fn app(&self) -> Arc<app::App> {
        self.app.clone()
    }

    /// Where the operator API is served when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests, commits every
    /// fulfilment still in this gateway's hands, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        // Background tasks live exactly as long as the server: aborted when `run` returns
        // or its future is dropped (the guard goes with it), however that happens.
        let mut tasks = Background::default();
        tasks.spawn(sync::listen(self.app.clone()));
        tasks.spawn(sync::refresh_periodically(self.app.clone()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut dispatcher = None;
        if !self.manual_background {
            tasks.spawn(health::watch(self.app.clone()));
            dispatcher = Some(tasks.spawn(callbacks::dispatcher::run(self.app.clone(), stopped.clone())));
            tasks.spawn(gauges::run(self.app.clone()));
            tasks.spawn(rollups::run(self.app.clone()));
            tasks.spawn(growth::run(self.app.clone()));
            tasks.spawn(risk::run(self.app.clone()));
            tasks.spawn(hot_balance::run(self.app.clone()));
            tasks.spawn(rebates::run(self.app.clone()));
            tasks.spawn(upstream::run(self.app.clone()));
            tasks.spawn(upstream::health::run(self.app.clone()));
            tasks.spawn(auth::last_used::run(self.app.clone()));
            tasks.spawn(stock::mover::run(self.app.clone()));
        }
        let writers: Vec<_> = (0..self.app.config.orders.ledger_writers)
            .map(|i| tasks.spawn(ledger::writer::run(self.app.clone(), stopped.clone(), i == 0)))
            .collect();
        let mut writers = futures_util::future::join_all(writers);
        let app = self.app.clone();
        match self.admin_listener {
            None => http::serve(self.listener, self.app, http::Surface::All, shutdown).await,
            Some(admin) => {
                let shutdown = futures_util::FutureExt::shared(Box::pin(shutdown));
                tokio::join!(
                    http::serve(self.listener, self.app.clone(), http::Surface::Public, shutdown.clone()),
                    http::serve(admin, self.app, http::Surface::Admin, shutdown),
                );
            }
        }
        let _ = stop.send(true);
        // Every request is answered: the keys' uses noted since the last flush are final.
        let c = &app.config;
        let flush = std::time::Duration::from_millis(c.postgres.connect_timeout_ms + c.postgres.statement_timeout_ms);
        match tokio::time::timeout(flush, auth::last_used::flush(&app)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = format!("{e:#}"), "keys' last use not written at shutdown"),
            Err(_) => tracing::warn!("keys' last use not written at shutdown in time"),
        }
        let drain = std::time::Duration::from_millis(app.config.orders.drain_timeout_ms);
        if tokio::time::timeout(drain, &mut writers).await.is_err() {
            // Whatever is left stays in the outbox, claimed by another gateway or by
            // this one's next start.
            tracing::warn!("ledger writers did not finish draining in time");
        }
        // Callback attempts in flight end within their timeout; one cut short would leave
        // its event leased, unsent, until the lease runs out.
        if let Some(d) = dispatcher {
            // An attempt: its timeout, then a pool wait and a statement to record it.
            let attempts = std::time::Duration::from_millis(
                c.callbacks.timeout_ms + c.postgres.connect_timeout_ms + c.postgres.statement_timeout_ms,
            );
            let _ = tokio::time::timeout(attempts, d).await;
        }
        drop(tasks);
        Ok(())
    }
}

/// Tasks aborted when this is dropped (mini-redis's drop guard).
#[derive(Default)]
struct Background(Vec<tokio::task::AbortHandle>);

impl Background {
    /// Spawns `task`, aborted with the guard; the handle lets a caller wait for it first.
    fn spawn<T: Send + 'static>(
        &mut self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let handle = tokio::spawn(task);
        self.0.push(handle.abort_handle());
        handle
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.0.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

/// Builds and runs a gateway on `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Server::build(config, listener).await?.run(shutdown).await
}
