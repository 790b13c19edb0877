//! Merchant callbacks (docs/api.md §4, "Merchant callbacks") against a real HTTP receiver on
//! loopback that fails, times out and then succeeds, as a merchant's server may.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;

use crate::helpers::*;
use crate::orders::{shop_with, SKU};

/// What the receiver does with one request.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    Status(u16),
    /// Answers 200, but only after this long.
    Hang(Duration),
}

#[derive(Clone, Debug)]
pub struct Received {
    pub signature: String,
    pub body: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("callback body is JSON")
    }
}

/// A merchant's callback endpoint: answers from `script` in order, then `then`.
pub struct Receiver {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<(VecDeque<Reply>, Reply)>>,
}

impl Receiver {
    pub async fn start(script: &[Reply], then: Reply) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hooks/cardgate?token=merchant-own",
            listener.local_addr().unwrap()
        );
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new((script.iter().copied().collect::<VecDeque<_>>(), then)));
        let (rec, scr) = (received.clone(), script.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (rec, scr) = (rec.clone(), scr.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (rec, scr) = (rec.clone(), scr.clone());
                        async move {
                            let signature = req
                                .headers()
                                .get("cg-signature")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            rec.lock().unwrap().push(Received { signature, body });
                            let reply = {
                                let mut s = scr.lock().unwrap();
                                let then = s.1;
                                s.0.pop_front().unwrap_or(then)
                            };
                            let status = match reply {
                                Reply::Status(s) => s,
                                Reply::Hang(d) => {
                                    tokio::time::sleep(d).await;
                                    200
                                }
                            };
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"receiver says no")));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { url, received, script }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn answer_from_now(&self, reply: Reply) {
        let mut s = self.script.lock().unwrap();
        s.0.clear();
        s.1 = reply;
    }

    /// Waits until `n` requests have arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let got = eventually(Duration::from_secs(15), || async { self.received().len() >= n }).await;
        let received = self.received();
        assert!(got, "expected {n} callbacks, received {}", received.len());
        received
    }
}

/// Checks `CG-Signature` as a merchant would: `t=<unix>,v1=<hex HMAC(secret, "t.body")>`.
pub fn signed_by(r: &Received, secret: &str) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in r.signature.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_string()),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => return false,
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    let fresh = t.parse::<i64>().is_ok_and(|t| (now_secs() - t).abs() < 300);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    fresh && mac.verify_slice(&v1).is_ok()
}

/// Quick retries, with the guard on: callback targets must be public.
fn fast_retries_guarded(env: &mut std::collections::HashMap<String, String>) {
    env.insert("CARDGATE_CALLBACKS__TIMEOUT_MS".into(), "300".into());
    env.insert("CARDGATE_CALLBACKS__POLL_MS".into(), "50".into());
    env.insert("CARDGATE_CALLBACKS__BACKOFF_BASE_MS".into(), "100".into());
    env.insert("CARDGATE_CALLBACKS__BACKOFF_MAX_MS".into(), "400".into());
}

/// Quick retries to the test's receivers, which listen on loopback.
fn fast_retries(env: &mut std::collections::HashMap<String, String>) {
    fast_retries_guarded(env);
    env.insert("CARDGATE_CALLBACKS__ALLOW_PRIVATE_TARGETS".into(), "true".into());
}

/// Callback delivery left to the test ([`deliver_due`]), and retries due only when the
/// test says the backoff has passed ([`backoff_passes`]): a backoff short enough to pass
/// inside one `deliver_due` on a slow machine made it count a retry as a first attempt.
fn stepped(env: &mut std::collections::HashMap<String, String>) {
    stepped_guarded(env);
    env.insert("CARDGATE_CALLBACKS__ALLOW_PRIVATE_TARGETS".into(), "true".into());
}

/// [`stepped`], with targets on this machine refused as in production.
fn stepped_guarded(env: &mut std::collections::HashMap<String, String>) {
    fast_retries_guarded(env);
    env.insert("CARDGATE_CALLBACKS__BACKOFF_BASE_MS".into(), "600000".into());
    env.insert("CARDGATE_CALLBACKS__BACKOFF_MAX_MS".into(), "600000".into());
    env.insert(MANUAL_BACKGROUND.into(), "1".into());
}

/// Attempts every callback due now, as the background loop would, round after round until
/// one finds nothing due: how many attempts were made.
async fn deliver_due(app: &TestApp) -> usize {
    let state = app.state.as_ref().expect("an in-process gateway");
    let dispatcher = cardgate::callbacks::dispatcher::Dispatcher::new(state).unwrap();
    let mut attempts = 0;
    for _ in 0..20 {
        match dispatcher.step(state).await.unwrap() {
            0 => return attempts,
            n => attempts += n,
        }
    }
    panic!("callbacks still due after 20 rounds");
}

/// Makes every pending callback due now, as if its backoff had passed.
async fn backoff_passes(app: &TestApp) {
    app.db()
        .await
        .execute(
            "UPDATE events SET next_attempt_at = now() WHERE status = 'pending'",
            &[],
        )
        .await
        .unwrap();
}

async fn events_of(app: &TestApp, t: &str, reseller_id: &str) -> Vec<Value> {
    let r = app
        .admin_ok(
            t,
            reqwest::Method::GET,
            &format!("/admin/v1/resellers/{reseller_id}/events"),
            None,
            200,
        )
        .await;
    r["events"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_fulfilled_order_is_delivered_signed_through_an_error_and_a_timeout_then_redelivered() {
    let (app, t, _) = shop_with(5, stepped).await;
    let receiver = Receiver::start(
        &[Reply::Status(500), Reply::Hang(Duration::from_secs(2))],
        Reply::Status(204),
    )
    .await;
    let k = app
        .reseller_with_key(&t, "gold", json!({"callback_url": receiver.url}))
        .await;
    assert!(k.webhook_secret.starts_with("whsec_"));
    app.fund(&t, &k.reseller_id, 100_000).await;
    let (status, order, _) = app.order(&k, order_body(SKU, 1, "cb-1")).await;
    assert_eq!(status, 201, "the order does not wait for its callback: {order}");

    // Three rounds, the backoff passing between them: 500, a timeout, then 204.
    for attempt in 1..=3 {
        assert_eq!(deliver_due(&app).await, 1, "attempt {attempt}");
        backoff_passes(&app).await;
    }
    assert_eq!(deliver_due(&app).await, 0, "a 2xx ends it");
    let got = receiver.received();
    assert_eq!(got.len(), 3);
    let first = got[0].json();
    assert_eq!(first["type"], "order.fulfilled");
    assert!(first["id"].as_str().is_some_and(|id| id.starts_with("evt_")));
    assert!(first["created_at"].as_str().is_some_and(|s| s.ends_with('Z')));
    let data = &first["data"];
    assert_eq!(data["order_id"], order["order_id"]);
    assert_eq!(
        (
            &data["merchant_order_no"],
            &data["sku"],
            &data["quantity"],
            &data["amount"],
            &data["status"]
        ),
        (
            &json!("cb-1"),
            &json!(SKU),
            &json!(1),
            &order["amount"],
            &json!("fulfilled")
        )
    );
    assert!(data.get("codes").is_none(), "codes are never pushed to a URL: {data}");
    for r in &got {
        assert_eq!(r.body, got[0].body, "every attempt carries the same event");
        assert!(
            signed_by(r, &k.webhook_secret),
            "signed with the webhook secret: {}",
            r.signature
        );
        assert!(!signed_by(r, "whsec_wrong"), "a check that can fail");
    }

    let e = &events_of(&app, &t, &k.reseller_id).await[0];
    assert_eq!(e["status"], "delivered");
    assert_eq!(e["id"], first["id"]);
    assert_eq!(e["attempts"], 3);
    let d = e["deliveries"].as_array().unwrap();
    assert_eq!(d.len(), 3, "{e:#}");
    assert_eq!(
        (d[0]["status_code"].as_i64(), d[2]["status_code"].as_i64()),
        (Some(500), Some(204))
    );
    assert!(d[0]["error"].as_str().is_some_and(|s| s.contains("receiver says no")));
    assert!(
        d[1]["status_code"].is_null() && d[1]["error"].as_str().is_some(),
        "the timeout: {e:#}"
    );
    assert!(
        !d[1]["error"].as_str().unwrap().contains("merchant-own"),
        "errors leave the URL out"
    );
    assert!(e["delivered_at"].is_string() && e["next_attempt_at"].is_null());
    assert_eq!(receiver.received().len(), 3, "a 2xx ends it");

    // Redelivery on request, then after a rotation only the new secret signs.
    let path = format!("/admin/v1/events/{}/redeliver", e["id"].as_str().unwrap());
    let again = app.admin_ok(&t, reqwest::Method::POST, &path, None, 202).await;
    assert_eq!(again["status"], "pending");
    assert_eq!(deliver_due(&app).await, 1);
    assert!(signed_by(&receiver.received()[3], &k.webhook_secret));
    let rotated = app
        .admin_ok(
            &t,
            reqwest::Method::POST,
            &format!("/admin/v1/resellers/{}/webhook_secret", k.reseller_id),
            None,
            200,
        )
        .await;
    let new_secret = rotated["webhook_secret"].as_str().unwrap();
    assert!(new_secret.starts_with("whsec_") && new_secret != k.webhook_secret);
    app.admin_ok(&t, reqwest::Method::POST, &path, None, 202).await;
    assert_eq!(deliver_due(&app).await, 1);
    let last = &receiver.received()[4];
    assert!(signed_by(last, new_secret) && !signed_by(last, &k.webhook_secret));

    let (s, code, _) = error_of(
        app.admin(&t, reqwest::Method::POST, "/admin/v1/events/evt_nope/redeliver", None)
            .await,
    )
    .await;
    assert_eq!((s, code.as_str()), (404, "not_found"));
}

#[tokio::test]
async fn refunds_restocks_price_changes_and_low_balances_are_announced_to_their_resellers() {
    // Another currency than the default: every amount in an event names the configured one.
    let (app, t, _) = shop_with(1, |env| {
        stepped(env);
        env.insert("CARDGATE_CURRENCY".into(), "USD".into());
    })
    .await;
    let receiver = Receiver::start(&[], Reply::Status(200)).await;
    // Silver pays the base price (9800); after one order 20,200 is left, below 25,000.
    let k = app
        .reseller_with_key(
            &t,
            "silver",
            json!({"callback_url": receiver.url, "low_balance_threshold": 25_000}),
        )
        .await;
    let quiet = app.reseller_with_key(&t, "silver", json!({})).await;
    app.fund(&t, &k.reseller_id, 30_000).await;
    app.fund(&t, &quiet.reseller_id, 30_000).await;
    let (status, order, _) = app.order(&k, order_body(SKU, 1, "cb-sells-out")).await;
    assert_eq!(status, 201);
    assert_eq!(app.order(&quiet, order_body(SKU, 1, "q-1")).await.0, 409, "sold out");

    let r = app.import_codes(&t, SKU, "NEW-1\nNEW-2").await;
    assert_eq!(r.status(), 200);
    let r = app.import_codes(&t, SKU, "NEW-3").await;
    assert_eq!(r.status(), 200);
    app.admin_ok(
        &t,
        reqwest::Method::PATCH,
        &format!("/admin/v1/products/{SKU}"),
        Some(json!({"base_price": 9900})),
        200,
    )
    .await;
    // Only gold's price changes: nothing for a silver reseller.
    app.admin_ok(
        &t,
        reqwest::Method::PATCH,
        &format!("/admin/v1/products/{SKU}"),
        Some(json!({"tier_prices": {"gold": 9600}})),
        200,
    )
    .await;
    let path = format!("/admin/v1/orders/{}/refund", order["order_id"].as_str().unwrap());
    app.admin_ok(
        &t,
        reqwest::Method::POST,
        &path,
        Some(json!({"reason": "customer"})),
        200,
    )
    .await;

    assert_eq!(deliver_due(&app).await, 5);
    let got: Vec<Value> = {
        let all = receiver.received();
        assert_eq!(all.len(), 5, "one event each, no more: {all:?}");
        assert!(all.iter().all(|r| signed_by(r, &k.webhook_secret)));
        all.iter().map(Received::json).collect()
    };
    let of = |kind: &str| -> Vec<&Value> { got.iter().filter(|e| e["type"] == kind).map(|e| &e["data"]).collect() };
    assert_eq!(of("order.fulfilled").len(), 1);
    let low = of("balance.low");
    assert_eq!(low.len(), 1, "{got:#?}");
    assert_eq!(
        (low[0]["balance"].as_i64(), low[0]["low_balance_threshold"].as_i64()),
        (Some(20_200), Some(25_000))
    );
    let restocked = of("product.restocked");
    assert_eq!(
        restocked.len(),
        1,
        "once, when the SKU went from 0 to available: {got:#?}"
    );
    assert_eq!(
        (&restocked[0]["sku"], &restocked[0]["price"]),
        (&json!(SKU), &json!(9800))
    );
    let price = of("product.price_changed");
    assert_eq!(price.len(), 1, "{got:#?}");
    assert_eq!(
        (price[0]["price"].as_i64(), price[0]["previous_price"].as_i64()),
        (Some(9900), Some(9800))
    );
    for e in low.iter().chain(&restocked).chain(&price) {
        assert_eq!(e["currency"], "USD", "{e}");
    }
    let refunded = of("order.refunded");
    assert_eq!(refunded.len(), 1);
    assert_eq!(refunded[0]["currency"], "USD");
    assert_eq!(
        (&refunded[0]["order_id"], &refunded[0]["status"]),
        (&order["order_id"], &json!("refunded"))
    );
    assert_eq!(refunded[0]["refund_reason"], "customer");

    assert!(
        events_of(&app, &t, &quiet.reseller_id).await.is_empty(),
        "no callback_url, no events"
    );
}

#[tokio::test]
async fn the_queue_survives_a_restart_and_the_next_gateway_delivers() {
    let (mut app, t, _) = shop_with(5, fast_retries).await;
    let receiver = Receiver::start(&[], Reply::Status(503)).await;
    let k = app
        .reseller_with_key(&t, "gold", json!({"callback_url": receiver.url}))
        .await;
    app.fund(&t, &k.reseller_id, 100_000).await;
    assert_eq!(app.order(&k, order_body(SKU, 1, "cb-restart")).await.0, 201);
    receiver.wait_for(1).await;
    let env = app.env.clone();
    app.shutdown().await.unwrap();

    receiver.answer_from_now(Reply::Status(200));
    let seen = receiver.received().len();
    let app = start(env).await;
    let got = receiver.wait_for(seen + 1).await;
    let last = got.last().unwrap();
    assert!(signed_by(last, &k.webhook_secret));
    assert_eq!(last.json()["type"], "order.fulfilled");
    assert!(
        eventually(Duration::from_secs(5), || async {
            events_of(&app, &t, &k.reseller_id).await[0]["status"] == "delivered"
        })
        .await
    );
}

#[tokio::test]
async fn retries_end_when_the_retry_window_closes() {
    let (app, t, _) = shop_with(5, stepped).await;
    let receiver = Receiver::start(&[], Reply::Status(500)).await;
    let k = app
        .reseller_with_key(&t, "gold", json!({"callback_url": receiver.url}))
        .await;
    app.fund(&t, &k.reseller_id, 100_000).await;
    assert_eq!(app.order(&k, order_body(SKU, 1, "cb-gives-up")).await.0, 201);
    assert_eq!(deliver_due(&app).await, 1);
    backoff_passes(&app).await;
    assert_eq!(deliver_due(&app).await, 1, "retried after its backoff");
    assert_eq!(events_of(&app, &t, &k.reseller_id).await[0]["status"], "pending");
    // As if 24 hours had passed since the event.
    app.db()
        .await
        .execute("UPDATE events SET retry_until = now()", &[])
        .await
        .unwrap();
    backoff_passes(&app).await;
    let mut rounds = 0;
    while events_of(&app, &t, &k.reseller_id).await[0]["status"] != "failed" {
        rounds += 1;
        assert!(rounds <= 3, "the event failed once its window closed");
        deliver_due(&app).await;
        backoff_passes(&app).await;
    }
    let tried = receiver.received().len();
    assert_eq!(deliver_due(&app).await, 0, "nothing due once failed");
    assert_eq!(receiver.received().len(), tried, "no attempt after the window");
    let e = &events_of(&app, &t, &k.reseller_id).await[0];
    assert_eq!(e["attempts"].as_i64(), Some(tried as i64));
    assert!(e["next_attempt_at"].is_null() && e["delivered_at"].is_null());
}

/// Finished events (delivered or failed) older than `callbacks.retention_days` are
/// deleted with their attempts; pending ones and recent ones stay.
#[tokio::test]
async fn finished_events_past_retention_are_purged_pending_ones_stay() {
    let (mut app, t, _) = shop_with(5, fast_retries).await;
    let receiver = Receiver::start(&[], Reply::Status(200)).await;
    let k = app
        .reseller_with_key(&t, "gold", json!({"callback_url": receiver.url}))
        .await;
    app.fund(&t, &k.reseller_id, 100_000).await;
    for i in 0..4 {
        assert_eq!(app.order(&k, order_body(SKU, 1, &format!("cb-old-{i}"))).await.0, 201);
    }
    let delivered = || async {
        let events = events_of(&app, &t, &k.reseller_id).await;
        events.iter().filter(|e| e["status"] == "delivered").count() == 4
    };
    assert!(eventually(Duration::from_secs(5), delivered).await);
    // The first three happened 31 days ago: one delivered, one failed, one still pending
    // (due far ahead); the fourth is recent.
    let db = app.db().await;
    let ids: Vec<i64> = db
        .query("SELECT id FROM events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The fund and the orders may have queued other events (balance.low): only ours count.
    let ours: Vec<i64> = db
        .query("SELECT id FROM events WHERE type = 'order.fulfilled' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ours.len(), 4, "{ids:?}");
    db.execute(
        "UPDATE events SET created_at = now() - interval '31 days' WHERE id = ANY($1)",
        &[&ours[..3].to_vec()],
    )
    .await
    .unwrap();
    db.execute("UPDATE events SET status = 'failed' WHERE id = $1", &[&ours[1]])
        .await
        .unwrap();
    db.execute(
        "UPDATE events SET status = 'pending', next_attempt_at = now() + interval '1 day',
                retry_until = now() + interval '2 days' WHERE id = $1",
        &[&ours[2]],
    )
    .await
    .unwrap();
    // The next gateway purges as it starts.
    let env = app.env.clone();
    app.shutdown().await.unwrap();
    let app = start(env).await;
    let left = || async {
        let rows = app
            .db()
            .await
            .query("SELECT id FROM events WHERE type = 'order.fulfilled' ORDER BY id", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>() == vec![ours[2], ours[3]]
    };
    assert!(
        eventually(Duration::from_secs(5), left).await,
        "old finished events not purged"
    );
    let attempts: Vec<i64> = app
        .db()
        .await
        .query(
            "SELECT DISTINCT event_id FROM event_deliveries WHERE event_id = ANY($1) ORDER BY 1",
            &[&ours],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, vec![ours[2], ours[3]], "attempts of purged events remain");
    assert!(
        metric(&app, "cardgate_callback_events_purged_total").await >= 2.0,
        "purge not counted"
    );
}

/// A tier change is a new price list for the reseller: each product on sale whose price
/// for it moved is announced, once, with the old and new price.
#[tokio::test]
async fn a_tier_change_announces_the_prices_it_moved() {
    let (app, t, _) = shop_with(1, stepped).await;
    // A second product priced the same for every tier: a tier change does not move it.
    app.admin_ok(
        &t,
        reqwest::Method::POST,
        "/admin/v1/products",
        Some(json!({"sku": "flat", "name": "Flat", "face_value": 100, "base_price": 90, "max_quantity": 5})),
        201,
    )
    .await;
    let receiver = Receiver::start(&[], Reply::Status(200)).await;
    let k = app
        .reseller_with_key(&t, "silver", json!({"callback_url": receiver.url}))
        .await;
    // Silver pays the base price (9800), gold 9650, diamond has no price of its own.
    app.patch_reseller(&t, &k.reseller_id, json!({"tier": "silver"})).await;
    app.patch_reseller(&t, &k.reseller_id, json!({"tier": "gold"})).await;
    app.patch_reseller(&t, &k.reseller_id, json!({"tier": "diamond"})).await;
    deliver_due(&app).await;
    let all: Vec<Value> = receiver.received().iter().map(Received::json).collect();
    // Each change of tier is announced as such, by reason "operator"; the unchanged one
    // (silver to silver) is not.
    let tiers: Vec<(&str, &str, &str)> = all
        .iter()
        .filter(|e| e["type"] == "reseller.tier_changed")
        .map(|e| {
            let d = &e["data"];
            (
                d["previous_tier"].as_str().unwrap(),
                d["tier"].as_str().unwrap(),
                d["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(tiers.len(), 2, "{all:#?}");
    assert!(tiers.contains(&("silver", "gold", "operator")) && tiers.contains(&("gold", "diamond", "operator")));
    let got: Vec<Value> = all
        .into_iter()
        .filter(|e| e["type"] != "reseller.tier_changed")
        .collect();
    assert!(got.iter().all(|e| e["type"] == "product.price_changed"), "{got:#?}");
    let moves: Vec<(i64, i64)> = got
        .iter()
        .map(|e| {
            (
                e["data"]["previous_price"].as_i64().unwrap(),
                e["data"]["price"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        moves.len(),
        2,
        "no event for an unchanged tier or an unmoved price: {got:#?}"
    );
    assert!(
        moves.contains(&(9800, 9650)) && moves.contains(&(9650, 9800)),
        "{moves:?}"
    );
    assert!(got
        .iter()
        .all(|e| e["data"]["sku"] == SKU && e["data"]["currency"] == "CNY"));
}

/// URLs that lead inside the operator's network, each as an address or a name for one.
const INSIDE: &[&str] = &[
    "http://127.0.0.1:6379/",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]:5432/",
    "http://10.1.2.3/",
    "http://[::ffff:127.0.0.1]/",
    "http://localhost:8080/",
    "http://2130706433/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "https://[2002:c0a8:0101::1]/",
    "http://0.0.0.0:8080/",
];

/// With `callbacks.allow_private_targets` at its default (off), a callback URL aimed
/// inside is `400 invalid_request` naming `callback_url`, on create and on patch, and
/// nothing changes.
#[tokio::test]
async fn callback_urls_aimed_inside_are_refused_when_set_and_change_nothing() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let outside = "https://1.1.1.1/hooks?token=merchant-own";
    let r = app
        .admin_ok(
            &t,
            reqwest::Method::POST,
            "/admin/v1/resellers",
            Some(json!({"name": "Shop", "tier": "gold", "callback_url": outside})),
            201,
        )
        .await;
    assert_eq!(r["callback_url"], outside, "a public address is taken");
    let rid = r["reseller_id"].as_str().unwrap();
    let path = format!("/admin/v1/resellers/{rid}");
    let before = app.admin_ok(&t, reqwest::Method::GET, &path, None, 200).await;
    let listed = async || {
        app.admin_ok(&t, reqwest::Method::GET, "/admin/v1/resellers", None, 200)
            .await
    };
    let all_before = listed().await;
    let audit_rows = async || -> i64 {
        app.db()
            .await
            .query_one("SELECT count(*) FROM audit_log", &[])
            .await
            .unwrap()
            .get(0)
    };
    let audited = audit_rows().await;

    for url in INSIDE {
        let created = app
            .admin(
                &t,
                reqwest::Method::POST,
                "/admin/v1/resellers",
                Some(json!({"name": "Inside", "tier": "gold", "callback_url": url})),
            )
            .await;
        let (status, code, body) = error_of(created).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_request"),
            "create {url}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("callback_url"), "create {url}: {message}");
        assert!(!message.contains("merchant-own"));

        let patched = app
            .admin(
                &t,
                reqwest::Method::PATCH,
                &path,
                Some(json!({"callback_url": url, "name": "Moved"})),
            )
            .await;
        let (status, code, body) = error_of(patched).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "patch {url}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("callback_url"),
            "{body}"
        );
    }
    assert_eq!(app.admin_ok(&t, reqwest::Method::GET, &path, None, 200).await, before);
    assert_eq!(listed().await, all_before, "no reseller was created");
    assert_eq!(audit_rows().await, audited, "nothing was audited: nothing happened");
}

/// Sets a reseller's callback URL behind the API's back, as one set while private
/// targets were allowed (or before the guard existed) would be.
async fn aim_directly(app: &TestApp, reseller_id: &str, url: &str) {
    let n = app
        .db()
        .await
        .execute(
            "UPDATE resellers SET callback_url = $2 WHERE reseller_id = $1",
            &[&reseller_id, &url],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// A URL that was allowed when set is checked again at each delivery: an IP literal
/// before connecting, a name by the client's resolver. The attempt is recorded as failed
/// with the reason and retried by the usual backoff; the receiver never hears a thing.
#[tokio::test]
async fn a_private_target_set_earlier_is_refused_at_each_delivery() {
    let (app, t, _) = shop_with(1, stepped_guarded).await;
    let receiver = Receiver::start(&[], Reply::Status(200)).await;
    let port = receiver
        .url
        .split(':')
        .nth(2)
        .and_then(|p| p.split('/').next())
        .unwrap();
    let literal = app.reseller_with_key(&t, "silver", json!({})).await;
    let named = app.reseller_with_key(&t, "silver", json!({})).await;
    aim_directly(&app, &literal.reseller_id, &receiver.url).await;
    let by_name = format!("http://localhost:{port}/hooks/cardgate?token=merchant-own");
    aim_directly(&app, &named.reseller_id, &by_name).await;
    // Silver pays the base price, gold less: each tier change is announced with the
    // SKU's price it moved, two events per reseller.
    app.patch_reseller(&t, &literal.reseller_id, json!({"tier": "gold"}))
        .await;
    app.patch_reseller(&t, &named.reseller_id, json!({"tier": "gold"}))
        .await;

    // Two rounds each, the backoff passing between them.
    assert_eq!(deliver_due(&app).await, 4);
    backoff_passes(&app).await;
    assert_eq!(deliver_due(&app).await, 4);
    for k in [&literal, &named] {
        let e = &events_of(&app, &t, &k.reseller_id).await[0];
        assert_eq!(e["deliveries"].as_array().map(Vec::len), Some(2), "{e:#}");
        assert_eq!(e["status"], "pending", "still retried by the usual backoff: {e:#}");
        for d in e["deliveries"].as_array().unwrap() {
            let error = d["error"].as_str().unwrap_or_default();
            assert!(d["status_code"].is_null(), "{e:#}");
            assert!(error.contains("callback target refused"), "{error}");
            assert!(error.contains("loopback") || error.contains("this machine"), "{error}");
            assert!(!error.contains("merchant-own"), "no URL in the error: {error}");
        }
    }
    assert!(receiver.received().is_empty(), "the receiver on loopback was reached");
}

/// How one connection to the bottomless receiver ended.
#[derive(Clone, Copy, Debug)]
struct Drained {
    sent: usize,
    closed_after: Duration,
}

/// A receiver that answers `500` with a 1 GiB `Content-Length` and then streams zeros
/// until the gateway goes away (or the test ends). Zeros are sent at a bounded pace, so
/// that a gateway reading the whole body does not take this test's memory with it.
async fn bottomless_receiver() -> (String, Arc<Mutex<Vec<Drained>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let ends = Arc::new(Mutex::new(Vec::new()));
    let seen = ends.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let accepted = tokio::time::Instant::now();
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: 1073741824\r\n\r\n";
                let mut sent = 0;
                if stream.write_all(answer).await.is_ok() {
                    let zeros = vec![0u8; 16 * 1024];
                    while stream.write_all(&zeros).await.is_ok() {
                        sent += zeros.len();
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                seen.lock().unwrap().push(Drained {
                    sent,
                    closed_after: accepted.elapsed(),
                });
            });
        }
    });
    (url, ends)
}

/// A receiver's answer is read only as far as the attempt keeps of it: the attempt is
/// recorded well within the callback timeout with a short error, and the connection is
/// dropped rather than drained.
#[tokio::test]
async fn a_bottomless_answer_is_cut_off_after_its_first_bytes() {
    const TIMEOUT_MS: i64 = 4000;
    let (app, t, _) = shop_with(1, |env| {
        stepped(env);
        env.insert("CARDGATE_CALLBACKS__TIMEOUT_MS".into(), TIMEOUT_MS.to_string());
    })
    .await;
    let (url, ends) = bottomless_receiver().await;
    let k = app.reseller_with_key(&t, "silver", json!({"callback_url": url})).await;
    app.patch_reseller(&t, &k.reseller_id, json!({"tier": "gold"})).await;

    // The tier change and the price it moved: one attempt each.
    assert_eq!(deliver_due(&app).await, 2, "one attempt each");
    let e = &events_of(&app, &t, &k.reseller_id).await[0];
    let d = &e["deliveries"][0];
    assert_eq!(d["status_code"], 500, "{e:#}");
    let error = d["error"].as_str().expect("the start of the answer is kept");
    assert!(!error.is_empty() && error.len() <= 200, "{} bytes kept", error.len());
    let took = d["duration_ms"].as_i64().unwrap();
    assert!(
        took < TIMEOUT_MS / 2,
        "the attempt took {took} ms, as if the body were read"
    );

    let closed = || async { !ends.lock().unwrap().is_empty() };
    assert!(
        eventually(Duration::from_secs(5), closed).await,
        "the receiver still streams: the connection was never closed"
    );
    let first = ends.lock().unwrap()[0];
    assert!(
        first.sent < 8 * 1024 * 1024 && first.closed_after < Duration::from_millis(TIMEOUT_MS as u64 / 2),
        "{first:?}"
    );
}
