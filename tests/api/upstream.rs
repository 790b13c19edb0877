//! Upstream sourcing (docs/api.md §8, docs/invariants.md invariant 10): two real
//! gateways, each with its own database and Redis prefix. The upstream one has stock and
//! sells to the hub; the downstream one (the hub) has a supplier pointing at the
//! upstream's address (directly, or through a proxy that loses answers, holds requests or
//! refuses connections) and a source for its product, and no stock of its own.
//!
//! After each scenario both sides are checked ([`Chain::assert_exactly_once`]): the hub
//! paid upstream once per order it sold, the reseller was charged once or refunded, no
//! code was delivered twice, and both reconciliations are clean.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::helpers::*;
use crate::orders::buyer;

const SKU: &str = "GIFT-50";
const PRICE: i64 = 9800;
const HUB_FUNDS: i64 = 100 * PRICE;
const BUYER_FUNDS: i64 = 10 * PRICE;

/// The upstream gateway: a product with stock, and the hub as one of its resellers.
struct Up {
    app: TestApp,
    token: String,
    hub_key: ResellerKey,
    imported: Vec<String>,
}

async fn upstream(app: TestApp, skus: &[(&str, usize)]) -> Up {
    let token = app.root_token().await;
    let mut imported = Vec::new();
    for (sku, codes) in skus {
        app.create_product(&token, sku).await;
        let batch: Vec<String> = (0..*codes)
            .map(|i| format!("UP-{sku}-{i:04}-{}", random_suffix()))
            .collect();
        if !batch.is_empty() {
            assert_eq!(app.import_codes(&token, sku, batch.join("\n")).await.status(), 200);
        }
        imported.extend(batch);
    }
    let hub_key = buyer(&app, &token, "standard", HUB_FUNDS).await;
    Up {
        app,
        token,
        hub_key,
        imported,
    }
}

/// The hub: the product with no stock of its own, and a reseller buying it.
struct Down {
    app: TestApp,
    token: String,
    buyer: ResellerKey,
}

async fn hub(app: TestApp) -> Down {
    let token = app.root_token().await;
    app.create_product(&token, SKU).await;
    let buyer = buyer(&app, &token, "standard", BUYER_FUNDS).await;
    Down { app, token, buyer }
}

/// Settings of an in-process hub: the answer window, and the background step left to
/// the test (asked again every 100 ms once due).
fn hub_env(answer_within_ms: u64) -> impl FnOnce(&mut std::collections::HashMap<String, String>) {
    move |env| {
        env.insert(
            "CARDGATE_UPSTREAM__ANSWER_WITHIN_MS".into(),
            answer_within_ms.to_string(),
        );
        env.insert("CARDGATE_UPSTREAM__RETRY_MS".into(), "100".into());
        env.insert(MANUAL_BACKGROUND.into(), "1".into());
    }
}

impl Down {
    /// A supplier at `base_url` with the hub's key upstream; returns its id.
    async fn supplier(&self, base_url: &str, hub_key: &ResellerKey) -> String {
        let supplier = self
            .app
            .admin_ok(
                &self.token,
                Method::POST,
                "/admin/v1/suppliers",
                Some(json!({"name": "upstream", "protocol": "cardgate", "base_url": base_url,
                            "key_id": hub_key.key_id, "secret": hub_key.secret, "timeout_ms": 5000})),
                201,
            )
            .await;
        assert!(supplier.get("secret").is_none(), "{supplier}");
        supplier["supplier_id"].as_str().unwrap().to_string()
    }

    /// The product's sources, in this order of priority: (supplier id, upstream SKU).
    async fn sources(&self, sources: &[(&str, &str)]) {
        let list: Vec<Value> = sources
            .iter()
            .enumerate()
            .map(|(i, (sp, sku))| json!({"supplier_id": sp, "sku": sku, "max_unit_cost": PRICE, "priority": i + 1}))
            .collect();
        let product = self
            .app
            .admin_ok(
                &self.token,
                Method::PATCH,
                &format!("/admin/v1/products/{SKU}"),
                Some(json!({ "sources": list })),
                200,
            )
            .await;
        assert_eq!(product["sources"].as_array().unwrap().len(), sources.len(), "{product}");
    }

    /// Runs the hub's background step until the order is no longer processing.
    async fn finish(&self, order_id: &str) -> Value {
        let state = self.app.state.clone().expect("an in-process hub");
        for _ in 0..300 {
            cardgate::upstream::step(&state).await.unwrap();
            let got = self.get_order(order_id).await;
            if got["status"] != "processing" {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("order {order_id} still processing after 30 s");
    }

    /// The buyer's spend as `GET /v1/balance` says it, and as this month's rebate preview
    /// counts it.
    async fn spend(&self) -> (i64, i64) {
        let resp = self.app.signed(&self.buyer, Method::GET, "/v1/balance", None).await;
        assert_eq!(resp.status(), 200);
        let balance: Value = resp.json().await.unwrap();
        let state = self.app.state.as_ref().expect("an in-process hub");
        let month = cardgate::rebates::Month::of(state.clock.now()).unwrap();
        let preview = self
            .app
            .admin_ok(
                &self.token,
                Method::GET,
                &format!("/admin/v1/rebates?month={month}"),
                None,
                200,
            )
            .await;
        let line = preview["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["reseller_id"] == self.buyer.reseller_id.as_str())
            .map_or(0, |l| l["spend"].as_i64().unwrap());
        (balance["spend"]["amount"].as_i64().unwrap(), line)
    }

    async fn get_order(&self, order_id: &str) -> Value {
        let resp = self
            .app
            .signed(&self.buyer, Method::GET, &format!("/v1/orders/{order_id}"), None)
            .await;
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }
}

struct Chain {
    up: Up,
    down: Down,
}

/// An in-process upstream with `codes` of the product, and an in-process hub buying it
/// straight from it.
async fn chain(codes: usize, answer_within_ms: u64) -> Chain {
    let up = upstream(spawn_app().await, &[(SKU, codes)]).await;
    let down = hub(spawn_app_with(hub_env(answer_within_ms)).await).await;
    let sp = down.supplier(&up.app.base, &up.hub_key).await;
    down.sources(&[(&sp, SKU)]).await;
    Chain { up, down }
}

/// The checks every scenario ends with, given the codes the buyer received in all.
async fn assert_exactly_once(up: &Up, down: &Down, delivered: &[String]) {
    let sold = delivered.len() as i64;
    let distinct: HashSet<&String> = delivered.iter().collect();
    assert_eq!(
        distinct.len(),
        delivered.len(),
        "no code delivered twice: {delivered:?}"
    );
    assert!(
        delivered.iter().all(|c| up.imported.contains(c)),
        "codes come from upstream"
    );
    assert_eq!(
        up.app.balance_of(&up.hub_key).await,
        HUB_FUNDS - sold * PRICE,
        "the hub paid upstream once per code it sold"
    );
    let db = up.app.db().await;
    let upstream_codes: i64 = db
        .query_one(
            "SELECT coalesce(sum(o.quantity), 0)::int8 FROM orders o JOIN resellers r ON r.id = o.reseller_id
              WHERE r.reseller_id = $1 AND o.status = 'fulfilled'",
            &[&up.hub_key.reseller_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(upstream_codes, sold, "bought upstream exactly what was delivered");
    assert_eq!(
        down.app.balance_of(&down.buyer).await,
        BUYER_FUNDS - sold * PRICE,
        "the reseller charged once for what it received, everything else returned"
    );
    up.app.assert_reconciled(&up.token).await;
    down.app.assert_reconciled(&down.token).await;
}

impl Chain {
    async fn assert_exactly_once(&self, delivered: &[String]) {
        assert_exactly_once(&self.up, &self.down, delivered).await;
    }
}

/// What the proxy in front of a supplier does with each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Keeps requests waiting, unsent, until the mode changes.
    Hold,
    /// Forwards the next this many requests (the supplier sells) but answers each `502`,
    /// as a load balancer whose backend connection broke after the sale would.
    LoseAnswers(usize),
}

struct ProxyState {
    target: String,
    mode: Mutex<Mode>,
    changed: tokio::sync::Notify,
    /// Requests that arrived, and requests the supplier answered.
    seen: AtomicUsize,
    forwarded: AtomicUsize,
    client: reqwest::Client,
}

/// An HTTP proxy in front of a supplier gateway.
struct SupplierProxy {
    base: String,
    state: Arc<ProxyState>,
    accept: JoinHandle<()>,
}

impl SupplierProxy {
    async fn start(target: &str, mode: Mode) -> SupplierProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(ProxyState {
            target: target.to_string(),
            mode: Mutex::new(mode),
            changed: tokio::sync::Notify::new(),
            seen: AtomicUsize::new(0),
            forwarded: AtomicUsize::new(0),
            client: reqwest::Client::new(),
        });
        let s = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| relay(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        SupplierProxy { base, state, accept }
    }

    fn set(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
        self.state.changed.notify_waiters();
    }

    fn seen(&self) -> usize {
        self.state.seen.load(Ordering::SeqCst)
    }

    fn forwarded(&self) -> usize {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for SupplierProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(s: Arc<ProxyState>, req: hyper::Request<Incoming>) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    s.seen.fetch_add(1, Ordering::SeqCst);
    loop {
        let changed = s.changed.notified();
        if *s.mode.lock().unwrap() != Mode::Hold {
            break;
        }
        changed.await;
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forward = s.client.request(parts.method.clone(), format!("{}{path}", s.target));
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            forward = forward.header(name, value);
        }
    }
    let answered = match forward.body(body).send().await {
        Ok(r) => {
            let status = r.status();
            r.bytes().await.ok().map(|b| (status, b))
        }
        Err(_) => None,
    };
    let lose = {
        let mut mode = s.mode.lock().unwrap();
        match *mode {
            Mode::LoseAnswers(n) if n > 0 => {
                *mode = if n == 1 {
                    Mode::Forward
                } else {
                    Mode::LoseAnswers(n - 1)
                };
                true
            }
            _ => false,
        }
    };
    let Some((status, bytes)) = answered else {
        return Ok(bad_gateway());
    };
    s.forwarded.fetch_add(1, Ordering::SeqCst);
    if lose {
        return Ok(bad_gateway());
    }
    let mut resp = hyper::Response::new(Full::new(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn bad_gateway() -> hyper::Response<Full<Bytes>> {
    let mut resp = hyper::Response::new(Full::new(Bytes::from_static(b"bad gateway")));
    *resp.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    resp
}

#[tokio::test]
async fn an_order_local_stock_cannot_fill_is_bought_upstream_once_and_answered_201() {
    let c = chain(3, 3000).await;
    let (status, order, _) = c.down.app.order(&c.down.buyer, order_body(SKU, 2, "M-UP-1")).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["status"], "fulfilled");
    let codes = codes_of(&order);
    assert_eq!(codes.len(), 2);

    // A replay answers the same order and buys nothing more.
    let (status, again, replayed) = c.down.app.order(&c.down.buyer, order_body(SKU, 2, "M-UP-1")).await;
    assert_eq!((status, replayed), (200, true));
    assert_eq!(codes_of(&again), codes);
    // So does one between the purchase's commit and its record marked done.
    c.down.app.unsettle(&c.down.buyer, "M-UP-1").await;
    let (status, again, replayed) = c.down.app.order(&c.down.buyer, order_body(SKU, 2, "M-UP-1")).await;
    assert_eq!((status, replayed), (200, true), "{again}");
    assert_eq!(codes_of(&again), codes);
    assert_eq!(c.up.app.stock_len(SKU).await, 1);
    let bought: i64 = c
        .down
        .app
        .db()
        .await
        .query_one("SELECT count(*) FROM purchases WHERE state = 'fulfilled'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bought, 1);
    c.assert_exactly_once(&codes).await;
}

#[tokio::test]
async fn every_source_refusing_is_a_clean_409_and_the_number_stays_free() {
    let c = chain(0, 3000).await;
    let resp = c.down.app.post_order(&c.down.buyer, order_body(SKU, 1, "M-UP-2")).await;
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (409, "out_of_stock"));
    c.assert_exactly_once(&[]).await;

    // The number is free: once stock arrives locally, it sells under it.
    let local = format!("LOCAL-{}", random_suffix());
    assert_eq!(
        c.down
            .app
            .import_codes(&c.down.token, SKU, local.clone())
            .await
            .status(),
        200
    );
    let (status, order, _) = c.down.app.order(&c.down.buyer, order_body(SKU, 1, "M-UP-2")).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(codes_of(&order), vec![local]);
    assert_eq!(c.down.app.balance_of(&c.down.buyer).await, BUYER_FUNDS - PRICE);
    assert_eq!(
        c.up.app.balance_of(&c.up.hub_key).await,
        HUB_FUNDS,
        "nothing bought upstream"
    );
    c.down.app.assert_reconciled(&c.down.token).await;
}

#[tokio::test]
async fn an_upstream_slower_than_the_window_is_answered_202_and_fulfilled_by_the_step() {
    let c = chain(2, 0).await;
    let (status, order, _) = c.down.app.order(&c.down.buyer, order_body(SKU, 1, "M-UP-3")).await;
    assert_eq!(status, 202, "{order}");
    assert_eq!(order["status"], "processing");
    assert!(codes_of(&order).is_empty());
    assert_eq!(
        c.down.app.balance_of(&c.down.buyer).await,
        BUYER_FUNDS - PRICE,
        "charged at once"
    );
    c.down.app.assert_reconciled(&c.down.token).await;

    // A replay while it is bought answers the order as it stands.
    let (status, again, replayed) = c.down.app.order(&c.down.buyer, order_body(SKU, 1, "M-UP-3")).await;
    assert_eq!((status, replayed), (200, true), "{again}");
    assert_eq!(again["status"], "processing");
    // Spend is fulfilled orders: not yet for growth, the balance or the month's rebate.
    assert_eq!(c.down.spend().await, (0, 0), "an order being bought is not spend");

    let id = order["order_id"].as_str().unwrap();
    let got = c.down.finish(id).await;
    assert_eq!(got["status"], "fulfilled");
    assert_eq!(c.down.spend().await, (PRICE, PRICE), "fulfilled, it is");
    let codes = codes_of(&got);
    assert_eq!(codes.len(), 1);
    let state = c.down.app.state.clone().unwrap();
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 0, "nothing left open");
    c.assert_exactly_once(&codes).await;
}

#[tokio::test]
async fn an_upstream_out_of_stock_after_the_window_fails_the_order_and_returns_the_money() {
    let c = chain(0, 0).await;
    let (status, order, _) = c.down.app.order(&c.down.buyer, order_body(SKU, 2, "M-UP-4")).await;
    assert_eq!(status, 202, "{order}");
    let id = order["order_id"].as_str().unwrap();
    let got = c.down.finish(id).await;
    assert_eq!(got["status"], "failed", "{got}");
    assert!(codes_of(&got).is_empty());

    // The money came back once, through the ledger, and the number answers the failure.
    let db = c.down.app.db().await;
    let returned: Vec<i64> = db
        .query(
            "SELECT amount FROM balance_ledger WHERE kind = 'upstream_failed' AND reference = $1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(returned, vec![2 * PRICE]);
    let (status, again, _) = c.down.app.order(&c.down.buyer, order_body(SKU, 2, "M-UP-4")).await;
    assert_eq!((status, again["status"].as_str()), (200, Some("failed")), "{again}");
    let state = c.down.app.state.clone().unwrap();
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 0);
    c.assert_exactly_once(&[]).await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_asked_again_with_the_same_number_until_it_is_back() {
    let up = upstream(spawn_app().await, &[(SKU, 2)]).await;
    let proxy = TcpProxy::to(up.app.addr.to_string()).await;
    proxy.cut();
    let down = hub(spawn_app_with(hub_env(400)).await).await;
    let sp = down
        .supplier(&format!("http://127.0.0.1:{}", proxy.port), &up.hub_key)
        .await;
    down.sources(&[(&sp, SKU)]).await;

    let (status, order, _) = down.app.order(&down.buyer, order_body(SKU, 1, "M-UP-5")).await;
    assert_eq!(status, 202, "{order}");
    let id = order["order_id"].as_str().unwrap().to_string();
    let state = down.app.state.clone().unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    cardgate::upstream::step(&state).await.unwrap();
    let db = down.app.db().await;
    let row = db
        .query_one(
            "SELECT state, source_index, attempts, upstream_no FROM purchases WHERE order_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "open");
    assert_eq!(
        row.get::<_, i32>(1),
        0,
        "an unknown outcome never moves on to another source"
    );
    assert!(row.get::<_, i32>(2) >= 2, "asked again: {}", row.get::<_, i32>(2));
    assert_eq!(row.get::<_, String>(3), format!("cg-{id}"));

    proxy.restore();
    let got = down.finish(&id).await;
    assert_eq!(got["status"], "fulfilled", "{got}");
    assert_exactly_once(&up, &down, &codes_of(&got)).await;
}

#[tokio::test]
async fn a_5xx_after_the_sale_is_asked_again_with_the_same_number_and_bought_once() {
    let up = upstream(spawn_app().await, &[(SKU, 3)]).await;
    // The first two answers are lost after the upstream sold: it sold only once.
    let proxy = SupplierProxy::start(&up.app.base, Mode::LoseAnswers(2)).await;
    let down = hub(spawn_app_with(hub_env(5000)).await).await;
    let sp = down.supplier(&proxy.base, &up.hub_key).await;
    down.sources(&[(&sp, SKU)]).await;

    let (status, order, _) = down.app.order(&down.buyer, order_body(SKU, 2, "M-UP-6")).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(proxy.forwarded(), 3, "asked three times under one number");
    assert_eq!(up.app.stock_len(SKU).await, 1, "sold once upstream");
    assert_exactly_once(&up, &down, &codes_of(&order)).await;
}

#[tokio::test]
async fn two_sources_the_first_refusing_the_second_fills_the_order() {
    let empty = upstream(spawn_app().await, &[(SKU, 0)]).await;
    let full = upstream(spawn_app().await, &[(SKU, 2)]).await;
    let down = hub(spawn_app_with(hub_env(3000)).await).await;
    let first = down.supplier(&empty.app.base, &empty.hub_key).await;
    let second = down.supplier(&full.app.base, &full.hub_key).await;
    down.sources(&[(&first, SKU), (&second, SKU)]).await;

    let (status, order, _) = down.app.order(&down.buyer, order_body(SKU, 2, "M-UP-7")).await;
    assert_eq!(status, 201, "{order}");
    let row = down
        .app
        .db()
        .await
        .query_one(
            "SELECT s.supplier_id, p.attempts FROM purchases p JOIN suppliers s ON s.id = p.supplier_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1)), (second, 2));
    assert_exactly_once(&full, &down, &codes_of(&order)).await;
    assert_eq!(
        empty.app.balance_of(&empty.hub_key).await,
        HUB_FUNDS,
        "the refusing source was paid nothing"
    );
    empty.app.assert_reconciled(&empty.token).await;
}

/// A `cardgate` process on a database of its own, with reservations taken over by the
/// next process within a second.
async fn process(name: &str, extra: &[(&str, &str)]) -> (Gateway, TestApp) {
    let mut env = test_env(&create_database().await);
    let addr = free_addr();
    env.insert("CARDGATE_LISTEN".into(), addr.to_string());
    env.insert("CARDGATE_ORDERS__CLAIM_IDLE_MS".into(), "1000".into());
    for (k, v) in extra {
        env.insert((*k).into(), (*v).into());
    }
    let log = std::env::temp_dir().join(format!("cardgate-upstream-{name}-{}.log", random_suffix()));
    let gw = Gateway::start(&env, &log);
    let app = TestApp::external(addr, env);
    gw.wait_up(&app).await;
    (gw, app)
}

#[tokio::test]
async fn the_upstream_gateway_killed_mid_order_sells_once_when_it_is_back() {
    let (mut gw, app) = process("up", &[]).await;
    let up = upstream(app, &[(SKU, 2)]).await;
    let down = Arc::new(hub(spawn_app_with(hub_env(1500)).await).await);
    let sp = down.supplier(&up.app.base, &up.hub_key).await;
    down.sources(&[(&sp, SKU)]).await;

    // The upstream reserves the hub's order, then waits on its commit...
    let locker = up.app.db().await;
    locker
        .execute("SELECT pg_advisory_lock($1)", &[&REBUILD_LOCK])
        .await
        .unwrap();
    let d = down.clone();
    let placing = tokio::spawn(async move { d.app.order(&d.buyer, order_body(SKU, 1, "M-UP-8")).await });
    let waiting = eventually(Duration::from_secs(10), || async {
        advisory_waiters(&locker).await > 0
    })
    .await;
    assert!(waiting, "the upstream's commit never waited; log: {}", gw.tail());
    // ... and dies there.
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    drop(locker);

    let (status, order, _) = placing.await.unwrap();
    assert_eq!(status, 202, "{order}");
    gw.restart();
    gw.wait_up(&up.app).await;
    let got = down.finish(order["order_id"].as_str().unwrap()).await;
    assert_eq!(got["status"], "fulfilled", "{got}");
    assert_exactly_once(&up, &down, &codes_of(&got)).await;
}

#[tokio::test]
async fn the_hub_killed_between_its_reservation_and_the_upstream_answer_resumes_the_purchase() {
    let up = upstream(spawn_app().await, &[(SKU, 2)]).await;
    let proxy = SupplierProxy::start(&up.app.base, Mode::Hold).await;
    let (mut gw, app) = process(
        "hub",
        &[
            ("CARDGATE_UPSTREAM__ANSWER_WITHIN_MS", "5000"),
            ("CARDGATE_UPSTREAM__LEASE_MS", "1500"),
            ("CARDGATE_UPSTREAM__RETRY_MS", "200"),
        ],
    )
    .await;
    let down = Arc::new(hub(app).await);
    let sp = down.supplier(&proxy.base, &up.hub_key).await;
    down.sources(&[(&sp, SKU)]).await;

    let d = down.clone();
    let placing = tokio::spawn(async move { d.app.post_order(&d.buyer, order_body(SKU, 1, "M-UP-9")).await });
    let asked = eventually(Duration::from_secs(10), || async { proxy.seen() > 0 }).await;
    assert!(asked, "the hub never asked its supplier; log: {}", gw.tail());
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    // The buyer never heard back.
    assert!(placing.await.is_err());
    proxy.set(Mode::Forward);
    gw.restart();
    gw.wait_up(&down.app).await;

    // The buyer asks again under its number until the resumed purchase has ended.
    let mut last = Value::Null;
    let mut done = false;
    for _ in 0..300 {
        let (status, body, _) = down.app.order(&down.buyer, order_body(SKU, 1, "M-UP-9")).await;
        done = status == 200 && body["status"] == "fulfilled";
        if !done {
            assert_eq!(
                (status, body.pointer("/error/code").and_then(Value::as_str)),
                (409, Some("order_in_progress")),
                "{body}"
            );
        }
        last = body;
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done, "never fulfilled: {last}; log: {}", gw.tail());
    let purchases: i64 = down
        .app
        .db()
        .await
        .query_one("SELECT count(*) FROM purchases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(purchases, 1);
    assert_exactly_once(&up, &down, &codes_of(&last)).await;
}

#[tokio::test]
async fn past_the_bound_on_orders_waiting_on_suppliers_an_order_is_answered_202_at_once() {
    let up = upstream(spawn_app().await, &[(SKU, 1)]).await;
    let down = hub(spawn_app_with(|env| {
        hub_env(3000)(env);
        env.insert("CARDGATE_UPSTREAM__MAX_IN_FLIGHT".into(), "0".into());
    })
    .await)
    .await;
    let sp = down.supplier(&up.app.base, &up.hub_key).await;
    down.sources(&[(&sp, SKU)]).await;

    let (status, order, _) = down.app.order(&down.buyer, order_body(SKU, 1, "M-UP-10")).await;
    assert_eq!(status, 202, "{order}");
    assert_eq!(up.app.stock_len(SKU).await, 1, "not asked on the order's time");
    let got = down.finish(order["order_id"].as_str().unwrap()).await;
    assert_eq!(got["status"], "fulfilled");
    assert_exactly_once(&up, &down, &codes_of(&got)).await;
}

#[tokio::test]
async fn a_redis_rebuild_while_a_purchase_waits_on_its_supplier_keeps_the_money_held() {
    let up = upstream(spawn_app().await, &[(SKU, 1)]).await;
    let proxy = SupplierProxy::start(&up.app.base, Mode::Hold).await;
    let down = Arc::new(hub(spawn_app_with(hub_env(10_000)).await).await);
    let sp = down.supplier(&proxy.base, &up.hub_key).await;
    down.sources(&[(&sp, SKU)]).await;

    let d = down.clone();
    let placing = tokio::spawn(async move { d.app.order(&d.buyer, order_body(SKU, 1, "M-UP-11")).await });
    assert!(eventually(Duration::from_secs(10), || async { proxy.seen() > 0 }).await);
    // Only the hot balance holds this order's money: a rebuild from Postgres keeps it held.
    cardgate::rebuild::rebuild(down.app.state.as_ref().unwrap(), true)
        .await
        .unwrap();
    assert_eq!(down.app.balance_of(&down.buyer).await, BUYER_FUNDS - PRICE);
    // The same number meanwhile is in progress, and holds nothing more.
    let resp = down.app.post_order(&down.buyer, order_body(SKU, 1, "M-UP-11")).await;
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (409, "order_in_progress"));
    assert_eq!(down.app.balance_of(&down.buyer).await, BUYER_FUNDS - PRICE);

    proxy.set(Mode::Forward);
    let (status, order, _) = placing.await.unwrap();
    assert_eq!(status, 201, "{order}");
    assert_exactly_once(&up, &down, &codes_of(&order)).await;
}

/// With home cells, local stock in any cell comes before buying upstream: a buyer whose
/// home cell holds none of the product gets the codes imported into another cell, and
/// only once no cell holds enough is the order bought upstream.
#[tokio::test]
async fn fallback_buys_upstream_only_when_no_cell_can_fill_the_order() {
    let c = chain(3, 3000).await;
    let down = &c.down;
    let keys = down.app.keys();
    assert!(keys.cells() > 1, "the default has several cells");
    let product = down.app.product_pk(SKU).await;
    let import_cell = cardgate::stock::mover::import_cell(&keys, product);
    let local: Vec<String> = (0..2).map(|i| format!("LOCAL-{i}-{}", random_suffix())).collect();
    let resp = down.app.import_codes(&down.token, SKU, local.join("\n")).await;
    assert_eq!(resp.status(), 200);
    // A buyer at home in another cell than the one the codes went into.
    let far = loop {
        let k = buyer(&down.app, &down.token, "standard", BUYER_FUNDS).await;
        let pk = down.app.reseller_pk(&k.reseller_id).await;
        if keys.cell_of(pk) != import_cell {
            break k;
        }
    };

    let (status, order, _) = down.app.order(&far, order_body(SKU, 2, "M-CELL-1")).await;
    assert_eq!(status, 201, "{order}");
    let mut got = codes_of(&order);
    got.sort();
    assert_eq!(got, local, "the other cell's codes, not upstream's");
    assert_eq!(
        c.up.app.balance_of(&c.up.hub_key).await,
        HUB_FUNDS,
        "nothing bought upstream"
    );

    // No cell holds any now: bought upstream.
    let (status, order, _) = down.app.order(&far, order_body(SKU, 1, "M-CELL-2")).await;
    assert_eq!(status, 201, "{order}");
    let codes = codes_of(&order);
    assert!(codes.iter().all(|code| c.up.imported.contains(code)), "{order}");
    assert_eq!(c.up.app.balance_of(&c.up.hub_key).await, HUB_FUNDS - PRICE);
    down.app.assert_reconciled(&down.token).await;
}

#[tokio::test]
async fn a_code_the_hub_already_holds_is_never_delivered_again_and_the_buyer_is_not_charged() {
    // The supplier sells a code the hub holds already (sold to it twice, or imported
    // here as well): the hub's unique guard keeps it from a second buyer.
    let c = chain(2, 3000).await;
    assert_eq!(
        c.down
            .app
            .import_codes(&c.down.token, SKU, c.up.imported[0].clone())
            .await
            .status(),
        200
    );
    c.down
        .app
        .admin_ok(
            &c.down.token,
            Method::PATCH,
            &format!("/admin/v1/products/{SKU}"),
            Some(json!({"source_mode": "upstream_only"})),
            200,
        )
        .await;

    let resp = c
        .down
        .app
        .post_order(&c.down.buyer, order_body(SKU, 1, "M-UP-12"))
        .await;
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (409, "out_of_stock"));
    assert_eq!(
        c.down.app.balance_of(&c.down.buyer).await,
        BUYER_FUNDS,
        "nothing charged"
    );
    let row = c
        .down
        .app
        .db()
        .await
        .query_one(
            "SELECT state, outcome, upstream_order_id IS NOT NULL FROM purchases",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "refused");
    assert!(
        row.get::<_, &str>(1).contains("already held"),
        "{}",
        row.get::<_, &str>(1)
    );
    assert!(
        row.get::<_, bool>(2),
        "the upstream order is kept to claim the money back"
    );
    // The hub did pay upstream for it: the loss shows there, not as a second delivery.
    assert_eq!(c.up.app.balance_of(&c.up.hub_key).await, HUB_FUNDS - PRICE);
    c.up.app.assert_reconciled(&c.up.token).await;
    c.down.app.assert_reconciled(&c.down.token).await;
}

/// An upstream-only product is bought whole from its sources, never from local stock:
/// with no source left, its orders are `out_of_stock`, nothing is taken and the number
/// stays free.
#[tokio::test]
async fn an_upstream_only_product_without_sources_sells_no_local_code() {
    let down = hub(spawn_app().await).await;
    let (app, t) = (&down.app, &down.token);
    assert_eq!(
        app.import_codes(t, SKU, String::from("LOCAL-A\nLOCAL-B"))
            .await
            .status(),
        200
    );
    let mode = |m: &'static str| async move {
        app.admin_ok(
            t,
            Method::PATCH,
            &format!("/admin/v1/products/{SKU}"),
            Some(json!({ "source_mode": m })),
            200,
        )
        .await
    };
    mode("upstream_only").await;
    let stock = app.stock_len(SKU).await;

    let resp = app.post_order(&down.buyer, order_body(SKU, 1, "M-UP-NOWHERE")).await;
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (409, "out_of_stock"));
    assert_eq!(app.balance_of(&down.buyer).await, BUYER_FUNDS, "nothing charged");
    assert_eq!(app.stock_len(SKU).await, stock, "no local code taken");

    // Back to local stock, the same number is free and sells a local code.
    mode("local_first").await;
    let (status, order, _) = app.order(&down.buyer, order_body(SKU, 1, "M-UP-NOWHERE")).await;
    assert_eq!(status, 201, "{order}");
    assert!(codes_of(&order)[0].starts_with("LOCAL-"));
    app.assert_reconciled(t).await;
}
