//! Suppliers' health (docs/api.md §8, docs/invariants.md invariant 10): a hub gateway on
//! a manual clock with two suppliers for one product, a dead one first and a live
//! cardgate second. The dead one takes every request and never answers, and keeps what
//! it was sent, so the test can tell which purchase numbers reached it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::helpers::*;
use crate::orders::buyer;

const SKU: &str = "GIFT-HEALTH";
const FAILURES: usize = 3;
const COOLDOWN: Duration = Duration::from_secs(60);

/// A supplier that reads each request, keeps it, and closes the connection unanswered:
/// every call's outcome is unknown.
struct BlackHole {
    base: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl BlackHole {
    async fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !complete(&request) {
                        match tokio::time::timeout(Duration::from_secs(2), socket.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => request.extend_from_slice(&chunk[..n]),
                            _ => break,
                        }
                    }
                    kept.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&request).into_owned());
                });
            }
        });
        BlackHole { base, seen }
    }

    /// Requests received that carry `text` (a purchase's number upstream).
    fn count(&self, text: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|r| r.contains(text)).count()
    }
}

/// Headers and as much body as `content-length` announces.
fn complete(request: &[u8]) -> bool {
    let text = String::from_utf8_lossy(request);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    body.len() >= length
}

/// The value of `name` for this supplier (and outcome) in the gateway's `/metrics`.
async fn supplier_metric(app: &TestApp, name: &str, supplier: &str, outcome: Option<&str>) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    let supplier = format!("supplier=\"{supplier}\"");
    let outcome = outcome.map(|o| format!("outcome=\"{o}\""));
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&supplier))
        .filter(|l| outcome.as_ref().is_none_or(|o| l.contains(o)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn create_supplier(app: &TestApp, token: &str, name: &str, base_url: &str, key_id: &str, secret: &str) -> String {
    let s = app
        .admin_ok(
            token,
            Method::POST,
            "/admin/v1/suppliers",
            Some(json!({"name": name, "protocol": "cardgate", "base_url": base_url,
                        "key_id": key_id, "secret": secret, "timeout_ms": 5000})),
            201,
        )
        .await;
    assert_eq!(s["health"]["circuit"], "closed", "{s}");
    assert_eq!(s["circuit"], "closed", "{s}");
    s["supplier_id"].as_str().unwrap().to_string()
}

/// The supplier as `GET /admin/v1/suppliers` lists it, checked against the single view.
async fn listed(app: &TestApp, token: &str, supplier_id: &str) -> Value {
    let list = app.admin_ok(token, Method::GET, "/admin/v1/suppliers", None, 200).await;
    let s = list["suppliers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["supplier_id"] == supplier_id)
        .cloned()
        .unwrap();
    let one = app
        .admin_ok(
            token,
            Method::GET,
            &format!("/admin/v1/suppliers/{supplier_id}"),
            None,
            200,
        )
        .await;
    assert_eq!(one["health"], s["health"]);
    s
}

/// SKU bought upstream only, from these suppliers in this order of priority, at up to
/// its price.
async fn sources(down: &TestApp, t: &str, suppliers: &[&str]) {
    let list: Vec<Value> = suppliers
        .iter()
        .enumerate()
        .map(|(i, sp)| json!({"supplier_id": sp, "sku": SKU, "max_unit_cost": 9800, "priority": i + 1}))
        .collect();
    down.admin_ok(
        t,
        Method::PATCH,
        &format!("/admin/v1/products/{SKU}"),
        Some(json!({"source_mode": "upstream_only", "sources": list})),
        200,
    )
    .await;
}

async fn order_status(app: &TestApp, key: &ResellerKey, order_id: &str) -> Value {
    let resp = app
        .signed(key, Method::GET, &format!("/v1/orders/{order_id}"), None)
        .await;
    assert_eq!(resp.status(), 200);
    resp.json::<Value>().await.unwrap()["status"].clone()
}

/// The gateway that buys upstream, on a clock the test moves, with SKU and a circuit
/// that opens after FAILURES and stays open for COOLDOWN; background work by hand.
async fn hub(settings: &[(&str, &str)]) -> (TestApp, ManualClock, String) {
    let clock = ManualClock::at_system_now();
    let mut env = test_env(&create_database().await);
    env.insert("CARDGATE_UPSTREAM__CIRCUIT_FAILURES".into(), FAILURES.to_string());
    env.insert(
        "CARDGATE_UPSTREAM__CIRCUIT_OPEN_MS".into(),
        COOLDOWN.as_millis().to_string(),
    );
    for (k, v) in settings {
        env.insert((*k).into(), (*v).into());
    }
    env.insert(MANUAL_BACKGROUND.into(), "1".into());
    let down = start_with_clock(env, clock.clone().into()).await;
    let t = down.root_token().await;
    down.create_product(&t, SKU).await;
    (down, clock, t)
}

#[tokio::test]
async fn an_open_circuit_is_skipped_by_new_purchases_and_waited_for_by_one_that_asked_it() {
    // The live supplier: another cardgate with stock, the hub its funded reseller.
    let up = spawn_app().await;
    let up_token = up.root_token().await;
    up.create_product(&up_token, SKU).await;
    let imported: Vec<String> = (0..3).map(|i| format!("UPH-{i:04}-{}", random_suffix())).collect();
    assert_eq!(up.import_codes(&up_token, SKU, imported.join("\n")).await.status(), 200);
    let hub_key = buyer(&up, &up_token, "standard", 100 * 9800).await;
    let dead = BlackHole::start().await;

    let (down, clock, t) = hub(&[]).await;
    let state = down.state.clone().unwrap();
    let dead_sp = create_supplier(&down, &t, "dead", &dead.base, "ak_dead", "sk-dead-secret").await;
    let live_sp = create_supplier(&down, &t, "live", &up.base, &hub_key.key_id, &hub_key.secret).await;
    sources(&down, &t, &[&dead_sp, &live_sp]).await;
    let buyer = buyer(&down, &t, "standard", 10 * 9800).await;

    // The first order's number goes to the dead supplier: unknown outcomes, asked again
    // until FAILURES in a row open its circuit. Having asked it, the purchase may not move
    // on: it waits, answered 202.
    let (status, a, _) = down.order(&buyer, order_body(SKU, 1, "M-HEALTH-1")).await;
    assert_eq!(status, 202, "{a}");
    let a_id = a["order_id"].as_str().unwrap().to_string();
    let a_no = format!("cg-{a_id}");
    assert_eq!(dead.count(&a_no), FAILURES, "asked until the circuit opened");
    let s = listed(&down, &t, &dead_sp).await;
    let h = &s["health"];
    assert_eq!(h["circuit"], "open", "{s}");
    assert_eq!(s["circuit"], "open", "the supplier's own field, as §8 names it: {s}");
    assert_eq!(h["calls"], FAILURES);
    assert_eq!(h["success_rate"], 0.0);
    assert!(h["latency_ms"].is_u64(), "{h}");
    assert!(h["balance"].is_null() && h["balance_at"].is_null(), "{h}");
    let text = down
        .admin(&t, Method::GET, "/admin/v1/suppliers", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("sk-dead-secret") && !text.contains(&hub_key.secret),
        "no secret shown"
    );
    assert_eq!(
        supplier_metric(&down, "cardgate_supplier_circuit_open", &dead_sp, None).await,
        1.0
    );
    assert_eq!(
        supplier_metric(&down, "cardgate_supplier_calls_total", &dead_sp, Some("unknown")).await,
        FAILURES as f64
    );

    // The background step does not move it to the live supplier either, nor ask the dead
    // one while its circuit is open.
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 0);
    assert_eq!(order_status(&down, &buyer, &a_id).await, "processing");
    assert_eq!(dead.count(&a_no), FAILURES);
    assert_eq!(up.balance_of(&hub_key).await, 100 * 9800, "nothing bought for it");

    // A new order has not asked the dead supplier: it skips it, and the live one sells.
    let (status, b, _) = down.order(&buyer, order_body(SKU, 1, "M-HEALTH-2")).await;
    assert_eq!(status, 201, "{b}");
    let codes = codes_of(&b);
    assert_eq!(codes.len(), 1);
    assert!(imported.contains(&codes[0]));
    let b_id = b["order_id"].as_str().unwrap();
    assert_eq!(
        dead.count(&format!("cg-{b_id}")),
        0,
        "its number never went to the dead one"
    );
    let row = down
        .db()
        .await
        .query_one(
            "SELECT s.supplier_id, p.source_index, p.attempts FROM purchases p JOIN suppliers s ON s.id = p.supplier_id
              WHERE p.order_id = $1",
            &[&b_id],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1), row.get::<_, i32>(2)),
        (live_sp.clone(), 1, 1)
    );
    assert_eq!(
        supplier_metric(&down, "cardgate_supplier_calls_total", &dead_sp, Some("skipped")).await,
        1.0
    );
    assert_eq!(up.balance_of(&hub_key).await, 100 * 9800 - 9800, "bought once");
    let h = listed(&down, &t, &live_sp).await["health"].clone();
    assert_eq!(
        (h["circuit"].clone(), h["calls"].clone(), h["success_rate"].clone()),
        (json!("closed"), json!(1), json!(1.0))
    );

    // The balance step reads what the live supplier reports; the dead one reports none.
    assert_eq!(cardgate::upstream::health::poll_balances(&state).await.unwrap(), 1);
    let h = listed(&down, &t, &live_sp).await["health"].clone();
    assert_eq!(h["balance"], 100 * 9800 - 9800, "{h}");
    assert!(h["balance_at"].as_str().is_some_and(|at| at.ends_with('Z')), "{h}");
    assert_eq!(
        supplier_metric(&down, "cardgate_supplier_balance", &live_sp, None).await,
        (100 * 9800 - 9800) as f64
    );
    let h = listed(&down, &t, &dead_sp).await["health"].clone();
    assert!(h["balance"].is_null(), "{h}");
    assert_eq!(h["calls"], FAILURES, "balance reads are not purchases' calls");

    // Past the cooldown the circuit is half-open; the balance read is its trial, fails,
    // and opens it again.
    clock.advance(COOLDOWN);
    assert_eq!(listed(&down, &t, &dead_sp).await["health"]["circuit"], "half_open");
    cardgate::upstream::health::poll_balances(&state).await.unwrap();
    assert_eq!(listed(&down, &t, &dead_sp).await["health"]["circuit"], "open");

    // Past the next cooldown the waiting purchase is the trial: the same number goes to
    // the same supplier, and nowhere else.
    clock.advance(COOLDOWN);
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 0);
    assert_eq!(dead.count(&a_no), FAILURES + 1);
    let h = listed(&down, &t, &dead_sp).await["health"].clone();
    assert_eq!(
        (h["circuit"].clone(), h["calls"].clone()),
        (json!("open"), json!(FAILURES + 1))
    );
    assert_eq!(order_status(&down, &buyer, &a_id).await, "processing");
    assert_eq!(up.balance_of(&hub_key).await, 100 * 9800 - 9800);
    assert_eq!(
        supplier_metric(&down, "cardgate_supplier_circuit_open", &dead_sp, None).await,
        1.0
    );
    down.assert_reconciled(&t).await;
    up.assert_reconciled(&up_token).await;
}

/// A source passed over for its open circuit has not refused: when it is the only one
/// left, the order waits for it (`202 processing`, money held) instead of being refused
/// out of stock; a source that refused after it does not move the purchase past it, and
/// is not asked again while the purchase waits.
#[tokio::test]
async fn a_source_passed_over_for_its_open_circuit_is_waited_for_not_taken_as_a_refusal() {
    // The refusing supplier: another cardgate that has the product but no stock.
    let up = spawn_app().await;
    let up_token = up.root_token().await;
    up.create_product(&up_token, SKU).await;
    let hub_key = buyer(&up, &up_token, "standard", 100 * 9800).await;
    let dead = BlackHole::start().await;

    let (down, clock, t) = hub(&[]).await;
    let state = down.state.clone().unwrap();
    let dead_sp = create_supplier(&down, &t, "dead", &dead.base, "ak_dead", "sk-dead-secret").await;
    let empty_sp = create_supplier(&down, &t, "empty", &up.base, &hub_key.key_id, &hub_key.secret).await;
    sources(&down, &t, &[&dead_sp]).await;
    let buyer = buyer(&down, &t, "standard", 10 * 9800).await;

    // The first order opens the dead supplier's circuit and waits for it.
    let (status, a, _) = down.order(&buyer, order_body(SKU, 1, "M-PASS-1")).await;
    assert_eq!(status, 202, "{a}");
    assert_eq!(listed(&down, &t, &dead_sp).await["health"]["circuit"], "open");
    let a_no = format!("cg-{}", a["order_id"].as_str().unwrap());

    // Alone: a new order is not sent there while the circuit is open, and not refused.
    let (status, b, _) = down.order(&buyer, order_body(SKU, 1, "M-PASS-2")).await;
    assert_eq!((status, b["status"].as_str()), (202, Some("processing")), "{b}");
    let b_id = b["order_id"].as_str().unwrap().to_string();
    let b_no = format!("cg-{b_id}");
    assert_eq!(dead.count(&b_no), 0, "nothing sent while the circuit is open");

    // Behind a source that refuses: the refusal does not end it either, and the purchase
    // goes back to the source it passed over.
    sources(&down, &t, &[&dead_sp, &empty_sp]).await;
    let (status, c, _) = down.order(&buyer, order_body(SKU, 1, "M-PASS-3")).await;
    assert_eq!((status, c["status"].as_str()), (202, Some("processing")), "{c}");
    let c_id = c["order_id"].as_str().unwrap().to_string();
    let c_no = format!("cg-{c_id}");
    let index: i32 = down
        .db()
        .await
        .query_one("SELECT source_index FROM purchases WHERE order_id = $1", &[&c_id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(index, 0, "waits at the dead supplier, not past the one that refused");
    let empty_calls = || supplier_metric(&down, "cardgate_supplier_calls_total", &empty_sp, None);
    assert_eq!(empty_calls().await, 1.0, "the empty supplier refused once");

    // The background step while the circuit stays open ends nothing, and asks no one:
    // the purchases sent back wait for the dead supplier, not ask the empty one again.
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 0);
    for id in [&b_id, &c_id] {
        assert_eq!(order_status(&down, &buyer, id).await, "processing");
    }
    assert_eq!(empty_calls().await, 1.0);
    let sent = || dead.count(&a_no) + dead.count(&b_no) + dead.count(&c_no);
    assert_eq!(sent(), FAILURES);
    let balance = down.signed(&buyer, Method::GET, "/v1/balance", None).await;
    let balance: Value = balance.json().await.unwrap();
    assert_eq!(balance["balance"], 10 * 9800 - 3 * 9800, "three orders held: {balance}");
    // Operators see them waiting.
    cardgate::gauges::step(&state).await.unwrap();
    let metrics = down.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "cardgate_upstream_open_purchases 3"),
        "three purchases open"
    );
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("cardgate_upstream_oldest_open_purchase_seconds ")));

    // Once the circuit lets a trial through, one of the waiting numbers goes to the dead
    // supplier (its only call), and its failure opens the circuit again: still nothing
    // is refused, and the empty supplier is not asked.
    clock.advance(COOLDOWN);
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 0);
    assert_eq!(sent(), FAILURES + 1, "one trial");
    assert_eq!(listed(&down, &t, &dead_sp).await["health"]["circuit"], "open");
    assert_eq!(empty_calls().await, 1.0);
    for id in [&b_id, &c_id] {
        assert_eq!(order_status(&down, &buyer, id).await, "processing");
    }
    down.assert_reconciled(&t).await;
}

/// A supplier whose every answer is given by the test, when the test decides: each
/// request it receives is announced (in order) and held until its answer is sent.
struct Scripted {
    base: String,
    arrived: tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<(u16, Value)>>,
}

impl Scripted {
    async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, arrived) = tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<(u16, Value)>>();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !complete(&request) {
                        match socket.read(&mut chunk).await {
                            Ok(n) if n > 0 => request.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    let (answer, told) = tokio::sync::oneshot::channel();
                    if tx.send(answer).is_err() {
                        return;
                    }
                    let Ok((status, body)) = told.await else { return };
                    let body = body.to_string();
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    use tokio::io::AsyncWriteExt;
                    let _ = socket.write_all(format!("{head}{body}").as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Scripted { base, arrived }
    }

    /// The next request's answer, once it has arrived.
    async fn next(&mut self) -> tokio::sync::oneshot::Sender<(u16, Value)> {
        tokio::time::timeout(Duration::from_secs(10), self.arrived.recv())
            .await
            .expect("a request within 10 s")
            .expect("the supplier runs")
    }
}

/// A hub (see [`hub`]) whose product's only source is a [`Scripted`] supplier, with its
/// supplier id and a buyer funded for ten orders.
async fn scripted_hub(settings: &[(&str, &str)]) -> (Scripted, TestApp, ManualClock, String, String, ResellerKey) {
    let supplier = Scripted::start().await;
    let (down, clock, t) = hub(settings).await;
    let sp = create_supplier(
        &down,
        &t,
        "scripted",
        &supplier.base,
        "ak_scripted",
        "sk-scripted-secret",
    )
    .await;
    sources(&down, &t, &[&sp]).await;
    let buyer = buyer(&down, &t, "standard", 10 * 9800).await;
    (supplier, down, clock, t, sp, buyer)
}

/// Rounds are fenced: a background round that outlived its lease, whose supplier then
/// refuses, cannot fail the order under the round that took the purchase over, which buys
/// it. Without the fence the late refusal fails the order (money back) and the codes the
/// second round bought are never delivered.
#[tokio::test]
async fn a_round_that_outlived_its_lease_cannot_end_the_purchase_under_the_round_that_took_it_over() {
    let (mut supplier, down, clock, t, _, buyer) =
        scripted_hub(&[("CARDGATE_UPSTREAM__ANSWER_WITHIN_MS", "300")]).await;
    let state = down.state.clone().unwrap();

    // The order's own round: no answer within the window, 202 (the call stays unanswered).
    let (status, order, _) = down.order(&buyer, order_body(SKU, 1, "M-FENCE-1")).await;
    assert_eq!((status, order["status"].as_str()), (202, Some("processing")), "{order}");
    let order_id = order["order_id"].as_str().unwrap().to_string();
    let _first = supplier.next().await;

    // A background round asks the supplier and waits; its lease runs out meanwhile, and a
    // second round takes the purchase over and asks the same number again.
    let late = tokio::spawn({
        let state = state.clone();
        async move { cardgate::upstream::step(&state).await.unwrap() }
    });
    let late_answer = supplier.next().await;
    clock.advance(Duration::from_secs(31));
    let owner = tokio::spawn({
        let state = state.clone();
        async move { cardgate::upstream::step(&state).await.unwrap() }
    });
    let owner_answer = supplier.next().await;

    // The late round hears a refusal: it ends nothing.
    late_answer
        .send((
            409,
            json!({"error": {"code": "out_of_stock", "message": "none", "request_id": "req_x"}}),
        ))
        .unwrap();
    assert_eq!(late.await.unwrap(), 0, "the late round ended the purchase");
    assert_eq!(order_status(&down, &buyer, &order_id).await, "processing");

    // The round that holds it is sold the codes: the order is fulfilled, charged once.
    let code = format!("FENCE-{}", random_suffix());
    owner_answer
        .send((
            201,
            json!({"order_id": "ord_upstream_1", "status": "fulfilled", "amount": 9800,
                           "codes": [code]}),
        ))
        .unwrap();
    assert_eq!(owner.await.unwrap(), 1);
    let resp = down
        .signed(&buyer, Method::GET, &format!("/v1/orders/{order_id}"), None)
        .await;
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got["status"], "fulfilled", "{got}");
    assert_eq!(codes_of(&got), vec![code]);
    assert_eq!(down.balance_of(&buyer).await, 10 * 9800 - 9800, "charged once");
    down.assert_reconciled(&t).await;
}

/// A purchase sent back to a source it passed over for its open circuit is bought there
/// once the circuit lets a call through; until then nothing is sent.
#[tokio::test]
async fn a_purchase_sent_back_to_a_source_passed_over_is_bought_there_once_the_circuit_lets_a_call_through() {
    let (mut supplier, down, clock, t, sp, buyer) = scripted_hub(&[]).await;
    let state = down.state.clone().unwrap();

    // The first order's number gets FAILURES answers of 503 in a row: the circuit opens,
    // and the order waits for the source it asked.
    let ((status, a, _), ()) = tokio::join!(down.order(&buyer, order_body(SKU, 1, "M-BACK-1")), async {
        for _ in 0..FAILURES {
            supplier.next().await.send((503, json!({}))).unwrap();
        }
    });
    assert_eq!((status, a["status"].as_str()), (202, Some("processing")), "{a}");
    assert_eq!(listed(&down, &t, &sp).await["health"]["circuit"], "open");

    // The second passes it over, has no other source, and waits for it: nothing sent.
    let (status, b, _) = down.order(&buyer, order_body(SKU, 1, "M-BACK-2")).await;
    assert_eq!((status, b["status"].as_str()), (202, Some("processing")), "{b}");
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 0);
    assert!(
        supplier.arrived.try_recv().is_err(),
        "nothing sent while the circuit is open"
    );

    // Past the cooldown the supplier sells again: both orders are bought from it, the
    // first call being the circuit's trial.
    let Scripted { mut arrived, .. } = supplier;
    let seller = tokio::spawn(async move {
        let mut sold = 0;
        while let Some(answer) = arrived.recv().await {
            sold += 1;
            let code = format!("BACK-{sold}-{}", random_suffix());
            let order = json!({"order_id": format!("ord_back_{sold}"), "status": "fulfilled",
                               "amount": 9800, "codes": [code]});
            let _ = answer.send((201, order));
        }
    });
    clock.advance(COOLDOWN);
    let mut ended = 0;
    for _ in 0..3 {
        ended += cardgate::upstream::step(&state).await.unwrap();
        clock.advance(Duration::from_secs(2));
    }
    assert_eq!(ended, 2, "both bought");
    for o in [&a, &b] {
        let id = o["order_id"].as_str().unwrap();
        let resp = down
            .signed(&buyer, Method::GET, &format!("/v1/orders/{id}"), None)
            .await;
        let got: Value = resp.json().await.unwrap();
        assert_eq!(got["status"], "fulfilled", "{got}");
        assert_eq!(codes_of(&got).len(), 1);
    }
    assert_eq!(down.balance_of(&buyer).await, 10 * 9800 - 2 * 9800, "each charged once");
    seller.abort();
    down.assert_reconciled(&t).await;
}
