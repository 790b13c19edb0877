//! `spawn_app()`: the real server on port 0 over real Redis and Postgres.
//!
//! `scripts/dev test` exports CARDGATE_REDIS_URL and CARDGATE_DATABASE_URL. Each app gets
//! a fresh database named `cgt_<random>` on that server and a Redis prefix of its own, so
//! tests run in parallel without sharing state.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use cardgate::clock::{Clock, ManualClock};
use cardgate::Config;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn env_url(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests with `scripts/dev test`"))
}

pub fn random_suffix() -> String {
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}

/// Replaces the database name at the end of a postgres:// URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

pub async fn create_database() -> String {
    let base = env_url("CARDGATE_DATABASE_URL");
    let name = format!("cgt_{}", random_suffix());
    let (client, conn) = tokio_postgres::connect(&with_database(&base, "postgres"), tokio_postgres::NoTls)
        .await
        .expect("connect to Postgres");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    with_database(&base, &name)
}

/// The settings every test app starts from; `overrides` may change any of them.
pub fn test_env(database_url: &str) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("CARDGATE_LISTEN".into(), "127.0.0.1:0".into());
    env.insert("CARDGATE_REDIS_URL".into(), env_url("CARDGATE_REDIS_URL"));
    env.insert("CARDGATE_DATABASE_URL".into(), database_url.to_string());
    env.insert("CARDGATE_REDIS_PREFIX".into(), format!("t{}", random_suffix()));
    env.insert(
        "CARDGATE_MASTER_KEY".into(),
        hex::encode(rand::thread_rng().gen::<[u8; 32]>()),
    );
    env.insert(
        "CARDGATE_JWT_SECRET".into(),
        hex::encode(rand::thread_rng().gen::<[u8; 32]>()),
    );
    env.insert("CARDGATE_BOOTSTRAP_ADMIN".into(), "root:root-password-1".into());
    env
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// `admin_listen`'s address when the test set one: `/admin` requests go there.
    pub admin_addr: Option<SocketAddr>,
    pub base: String,
    pub client: reqwest::Client,
    pub database_url: String,
    pub env: HashMap<String, String>,
    /// The gateway's state, for tests that run one step of its background work.
    pub state: Option<std::sync::Arc<cardgate::app::App>>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(overrides: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
    let database_url = create_database().await;
    let mut env = test_env(&database_url);
    overrides(&mut env);
    start(env).await
}

/// Put in a test app's settings: its periodic background loops are not started
/// (`Server::manual_background`), and the test runs their steps.
pub const MANUAL_BACKGROUND: &str = "TEST_MANUAL_BACKGROUND";

/// Starts a server with exactly these settings (a second instance may share a database).
pub async fn start(env: HashMap<String, String>) -> TestApp {
    start_with_clock(env, Clock::System).await
}

/// A fresh app reading the time from `clock`: a test holding a [`ManualClock`] moves it.
pub async fn spawn_app_on(clock: impl Into<Clock>) -> TestApp {
    let database_url = create_database().await;
    start_with_clock(test_env(&database_url), clock.into()).await
}

/// [`start`] on `clock`.
pub async fn start_with_clock(mut env: HashMap<String, String>, clock: Clock) -> TestApp {
    // Not a setting of the gateway's: the test runs the periodic steps itself.
    let manual = env.remove(MANUAL_BACKGROUND).is_some();
    let config = Config::load(&env).expect("test config loads");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut server = cardgate::Server::build_with_clock(config, listener, clock)
        .await
        .expect("server builds");
    if manual {
        server = server.manual_background();
    }
    let addr = server.local_addr().expect("local addr");
    let state = Some(server.app());
    let admin_addr = server.admin_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    TestApp {
        addr,
        admin_addr,
        base: format!("http://{addr}"),
        client,
        database_url: env["CARDGATE_DATABASE_URL"].clone(),
        env,
        state,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    /// A handle on a gateway running elsewhere (a `cardgate` process) with these settings.
    pub fn external(addr: SocketAddr, env: HashMap<String, String>) -> TestApp {
        TestApp {
            addr,
            admin_addr: None,
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            database_url: env["CARDGATE_DATABASE_URL"].clone(),
            env,
            state: None,
            shutdown: None,
            handle: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        match self.admin_addr {
            Some(admin) if path.starts_with("/admin/") => format!("http://{admin}{path}"),
            _ => format!("{}{}", self.base, path),
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request")
    }

    /// Asks the server to stop and waits for it to return.
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => h.await.expect("server task"),
            None => Ok(()),
        }
    }

    pub fn begin_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.take().expect("server running")
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls)
            .await
            .expect("connect to test database");
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Reads an error body (docs/api.md §2) and checks its shape.
pub async fn error_of(resp: reqwest::Response) -> (u16, String, serde_json::Value) {
    let status = resp.status().as_u16();
    let header_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("X-Request-Id on every answer");
    let body: serde_json::Value = resp.json().await.expect("error body is JSON");
    let err = &body["error"];
    assert_eq!(
        err["request_id"].as_str(),
        Some(header_id.as_str()),
        "body request_id matches the header: {body}"
    );
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error has a message: {body}"
    );
    let code = err["code"].as_str().expect("error has a code").to_string();
    (status, code, body)
}

/// A redis-server of the test's own, on a free loopback port, so that it can be
/// stopped and started under a gateway without disturbing other tests.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = PrivateRedis { port, child: None };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/dev installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("private redis did not start");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends SIGTERM to `child` and waits up to `within` for it to exit: its status, or
/// `None` if it is still running.
pub async fn sigterm(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill on PATH (scripts/dev installs procps)");
    assert!(sent.success());
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub const ROOT_USER: &str = "root";
pub const ROOT_PASSWORD: &str = "root-password-1";

impl TestApp {
    pub async fn login(&self, user: &str, password: &str) -> String {
        let resp = self
            .client
            .post(self.url("/admin/v1/login"))
            .json(&serde_json::json!({"username": user, "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "login as {user}");
        let body: serde_json::Value = resp.json().await.unwrap();
        body["token"].as_str().unwrap().to_string()
    }

    pub async fn root_token(&self) -> String {
        self.login(ROOT_USER, ROOT_PASSWORD).await
    }

    pub async fn admin(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }

    /// POSTs and returns the JSON answer, asserting the status.
    pub async fn admin_ok(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        status: u16,
    ) -> serde_json::Value {
        let resp = self.admin(token, method, path, body).await;
        let got = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(got, status, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub async fn create_product(&self, token: &str, sku: &str) -> serde_json::Value {
        self.admin_ok(
            token,
            reqwest::Method::POST,
            "/admin/v1/products",
            Some(
                serde_json::json!({"sku": sku, "name": format!("Product {sku}"), "face_value": 10000,
                "base_price": 9800, "tier_prices": {"gold": 9650}, "max_quantity": 100}),
            ),
            201,
        )
        .await
    }

    pub async fn import_codes(&self, token: &str, sku: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/admin/v1/products/{sku}/codes")))
            .bearer_auth(token)
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// `PATCH /admin/v1/resellers/{id}` with `body`, expected to succeed.
    pub async fn patch_reseller(&self, token: &str, reseller_id: &str, body: serde_json::Value) -> serde_json::Value {
        let path = format!("/admin/v1/resellers/{reseller_id}");
        self.admin_ok(token, reqwest::Method::PATCH, &path, Some(body), 200)
            .await
    }

    pub async fn create_reseller(&self, token: &str, tier: &str) -> serde_json::Value {
        self.admin_ok(
            token,
            reqwest::Method::POST,
            "/admin/v1/resellers",
            Some(serde_json::json!({"name": "Shop", "tier": tier})),
            201,
        )
        .await
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.env["CARDGATE_REDIS_URL"].as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub fn redis_prefix(&self) -> &str {
        &self.env["CARDGATE_REDIS_PREFIX"]
    }

    /// The gateway's Redis keys, with its number of cells.
    pub fn keys(&self) -> cardgate::store::keys::Keys {
        let cells = Config::load(&self.env).expect("test config loads").redis.cells;
        cardgate::store::keys::Keys::with_cells(self.redis_prefix(), cells)
    }

    /// The pool imports push a product's codes into.
    pub fn import_pool(&self, product_id: i64) -> String {
        let keys = self.keys();
        keys.stock(cardgate::stock::mover::import_cell(&keys, product_id), product_id)
    }
}

#[derive(Clone)]
pub struct ResellerKey {
    pub reseller_id: String,
    pub key_id: String,
    pub secret: String,
    /// Shown once, when the reseller was created: it signs the reseller's callbacks.
    pub webhook_secret: String,
}

/// The real time, for a request signed as a reseller would sign it.
pub fn now_secs() -> i64 {
    Clock::System.now_unix_secs()
}

pub fn nonce() -> String {
    format!("n{}{}", random_suffix(), random_suffix())
}

impl TestApp {
    /// A reseller of `tier` with one API key and `balance` credited.
    pub async fn reseller_with_key(&self, token: &str, tier: &str, body: serde_json::Value) -> ResellerKey {
        let mut b = serde_json::json!({"name": "Shop", "tier": tier});
        if let (Some(b), Some(extra)) = (b.as_object_mut(), body.as_object()) {
            b.extend(extra.clone());
        }
        let r = self
            .admin_ok(token, reqwest::Method::POST, "/admin/v1/resellers", Some(b), 201)
            .await;
        let rid = r["reseller_id"].as_str().unwrap().to_string();
        let k = self
            .admin_ok(
                token,
                reqwest::Method::POST,
                &format!("/admin/v1/resellers/{rid}/keys"),
                None,
                201,
            )
            .await;
        ResellerKey {
            reseller_id: rid,
            key_id: k["key_id"].as_str().unwrap().into(),
            secret: k["secret"].as_str().unwrap().into(),
            webhook_secret: r["webhook_secret"].as_str().unwrap().into(),
        }
    }

    /// A request signed now with a fresh nonce.
    pub async fn signed(
        &self,
        key: &ResellerKey,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> reqwest::Response {
        self.signed_at(key, method, path, body, now_secs(), &nonce(), &[]).await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn signed_at(
        &self,
        key: &ResellerKey,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&str>,
        timestamp: i64,
        nonce: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        self.signed_request(key, method, path_and_query, body, timestamp, nonce, headers)
            .send()
            .await
            .unwrap()
    }

    /// A signed request, not sent yet (for callers that expect the connection to fail).
    #[allow(clippy::too_many_arguments)]
    pub fn signed_request(
        &self,
        key: &ResellerKey,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&str>,
        timestamp: i64,
        nonce: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        self.signed_request_via(
            &self.client,
            key,
            method,
            path_and_query,
            body,
            timestamp,
            nonce,
            headers,
        )
    }

    /// [`TestApp::signed_request`] sent through `client` (one bound to another source
    /// address, say).
    #[allow(clippy::too_many_arguments)]
    pub fn signed_request_via(
        &self,
        client: &reqwest::Client,
        key: &ResellerKey,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&str>,
        timestamp: i64,
        nonce: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let body = body.unwrap_or("");
        let message = cardgate::auth::signing::Message {
            timestamp,
            nonce,
            method: method.as_str(),
            path,
            query,
            body: body.as_bytes(),
        };
        let auth = cardgate::auth::signing::authorization(&key.key_id, key.secret.as_bytes(), &message);
        let mut req = client
            .request(method, self.url(path_and_query))
            .header("authorization", auth);
        if !body.is_empty() {
            req = req.header("content-type", "application/json").body(body.to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req
    }
}

/// What an order test needs: an app, a root token, and a product with codes.
impl TestApp {
    pub async fn fund(&self, token: &str, reseller_id: &str, amount: i64) {
        self.admin_ok(
            token,
            reqwest::Method::POST,
            &format!("/admin/v1/resellers/{reseller_id}/balance"),
            Some(serde_json::json!({"amount": amount, "reference": format!("fund-{}", random_suffix())})),
            200,
        )
        .await;
    }

    /// `POST /v1/orders`, signed; the answer as it came.
    pub async fn post_order(&self, key: &ResellerKey, body: serde_json::Value) -> reqwest::Response {
        self.signed(key, reqwest::Method::POST, "/v1/orders", Some(&body.to_string()))
            .await
    }

    /// `POST /v1/orders`: the status, the body and whether it was a replay.
    pub async fn order(&self, key: &ResellerKey, body: serde_json::Value) -> (u16, serde_json::Value, bool) {
        let resp = self.post_order(key, body).await;
        let status = resp.status().as_u16();
        let replayed = resp.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        (status, resp.json().await.expect("JSON answer"), replayed)
    }

    /// The balance Postgres records (the hot one, `balance_of`, is less what is in flight).
    pub async fn recorded_balance(&self, reseller_id: &str) -> i64 {
        self.db()
            .await
            .query_one(
                "SELECT b.balance FROM balances b JOIN resellers r ON r.id = b.reseller_id WHERE r.reseller_id = $1",
                &[&reseller_id],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn balance_of(&self, key: &ResellerKey) -> i64 {
        let b: serde_json::Value = self
            .signed(key, reqwest::Method::GET, "/v1/balance", None)
            .await
            .json()
            .await
            .unwrap();
        b["balance"].as_i64().expect("balance")
    }

    /// The reconciliation report, asserted clean.
    pub async fn assert_reconciled(&self, token: &str) -> serde_json::Value {
        let r = self
            .admin_ok(token, reqwest::Method::GET, "/admin/v1/reconcile", None, 200)
            .await;
        assert_eq!(r["ok"], true, "reconciliation: {r:#}");
        r
    }

    /// Puts a committed order's idempotency record back to `pending`, as it is between an
    /// order bought upstream being committed and its record marked done.
    pub async fn unsettle(&self, key: &ResellerKey, merchant_order_no: &str) {
        let record = self
            .keys()
            .idempotency(self.reseller_pk(&key.reseller_id).await, merchant_order_no);
        let mut r = self.redis().await;
        let _: () = redis::cmd("HSET")
            .arg(record)
            .arg("state")
            .arg("pending")
            .query_async(&mut r)
            .await
            .unwrap();
    }

    /// A reseller's numeric id (its home cell is a function of it).
    pub async fn reseller_pk(&self, reseller_id: &str) -> i64 {
        self.db()
            .await
            .query_one("SELECT id FROM resellers WHERE reseller_id = $1", &[&reseller_id])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn product_pk(&self, sku: &str) -> i64 {
        self.db()
            .await
            .query_one("SELECT id FROM products WHERE sku = $1", &[&sku])
            .await
            .unwrap()
            .get(0)
    }

    /// The product's codes in Redis outside the outbox: every cell's pool and every open
    /// transfer between cells not yet arrived, read at one instant (one script on the one
    /// test Redis), so the stock mover running meanwhile cannot hide or double a code.
    pub async fn stock_len(&self, sku: &str) -> i64 {
        let product_id = self.product_pk(sku).await;
        let mut r = self.redis().await;
        let keys = self.keys();
        let script = redis::Script::new(
            r"
local n = 0
for i = 1, #ARGV, 4 do
  n = n + redis.call('LLEN', ARGV[i])
  for _, id in ipairs(redis.call('SMEMBERS', ARGV[i + 1])) do
    local to = tonumber(string.match(id, '^[^.]+%.[^.]+%.([^.]+)%.'))
    local arrived = ARGV[(to * 4) + 4]:gsub('@', id)
    if redis.call('EXISTS', arrived) == 0 then
      n = n + redis.call('LLEN', (ARGV[i + 2]:gsub('@', id)))
    end
  end
end
return n",
        );
        let mut inv = script.prepare_invoke();
        for cell in keys.all_cells() {
            inv.arg(keys.stock(cell, product_id))
                .arg(keys.transfers(cell, product_id))
                .arg(keys.transfer(cell, "@"))
                .arg(keys.transfer_done(cell, "@"));
        }
        inv.invoke_async(&mut r).await.unwrap()
    }
}

pub fn order_body(sku: &str, quantity: i64, mon: &str) -> serde_json::Value {
    serde_json::json!({"sku": sku, "quantity": quantity, "merchant_order_no": mon})
}

/// The catalogue as `k` reads it: each of `skus`' `available` (`None` when not listed).
pub async fn catalogue_available(app: &TestApp, k: &ResellerKey, skus: &[&str]) -> Vec<Option<i64>> {
    let resp = app.signed(k, reqwest::Method::GET, "/v1/products", None).await;
    assert_eq!(resp.status(), 200);
    let catalogue: serde_json::Value = resp.json().await.unwrap();
    skus.iter()
        .map(|sku| {
            catalogue["products"]
                .as_array()
                .and_then(|all| all.iter().find(|p| p["sku"] == *sku))
                .and_then(|p| p["available"].as_i64())
        })
        .collect()
}

pub fn codes_of(order: &serde_json::Value) -> Vec<String> {
    order["codes"]
        .as_array()
        .expect("codes")
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// A TCP proxy in front of Postgres (or Redis: [`TcpProxy::to`]) that can cut every
/// connection and refuse new ones, as a network partition or a stopped server would,
/// without touching the shared server.
pub struct TcpProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: &str) -> TcpProxy {
        let url: tokio_postgres::Config = upstream.parse().expect("postgres url");
        let host = match &url.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("TCP Postgres expected, got {other:?}"),
        };
        TcpProxy::to(format!("{}:{}", host, url.get_ports().first().copied().unwrap_or(5432))).await
    }

    /// A proxy to `target` (`host:port`).
    pub async fn to(target: String) -> TcpProxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c2, conns2) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, as far as the client can tell
                }
                let target = target.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                conns2.lock().unwrap().push(h.abort_handle());
            }
        });
        TcpProxy {
            port,
            cut,
            conns,
            accept,
        }
    }

    /// `database_url` with its host and port replaced by this proxy's.
    pub fn url_for(&self, database_url: &str) -> String {
        let (_, db) = database_url.rsplit_once('/').unwrap();
        let user = database_url
            .strip_prefix("postgres://")
            .and_then(|r| r.split_once('@'))
            .map_or("postgres", |(u, _)| u);
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The advisory lock a Redis rebuild holds exclusive (migrations/V1__baseline.sql,
/// `redis_rebuild_lock`): a test that holds it keeps rebuilds and ledger commits waiting.
pub const REBUILD_LOCK: i64 = 7162819512125188460;

/// Advisory-lock requests waiting in the app's database.
pub async fn advisory_waiters(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The sum of every series of a metric (all label sets) in the gateway's `/metrics`; 0
/// when it is not exported.
pub async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A `cardgate` process of the test's own (the real binary, its own runtime).
pub struct Gateway {
    pub child: Child,
    env: HashMap<String, String>,
    log: std::path::PathBuf,
}

impl Gateway {
    pub fn start(env: &HashMap<String, String>, log: &std::path::Path) -> Gateway {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cardgate"))
            .env_clear()
            .envs(env)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Gateway {
            child,
            env: env.clone(),
            log: log.to_path_buf(),
        }
    }

    pub async fn wait_up(&self, app: &TestApp) {
        let up = eventually(Duration::from_secs(30), || async {
            app.client
                .get(app.url("/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(up, "gateway did not start; log: {}", self.tail());
    }

    pub fn restart(&mut self) {
        *self = Gateway::start(&self.env, &self.log);
    }

    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port for a gateway process to listen on.
pub fn free_addr() -> SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    SocketAddr::new([127, 0, 0, 1].into(), port)
}
