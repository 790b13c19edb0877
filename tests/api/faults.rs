//! The fault harness (issue "survive faults"): signed orders from many resellers, unique
//! and repeated merchant_order_nos, while the gateway process is SIGKILLed and restarted,
//! Redis restarts empty, Postgres goes away and comes back, and SIGTERM drains it. Then
//! every unanswered order is retried, and the harness's own record of the answers is
//! checked against Postgres: nothing acknowledged lost, no code delivered twice, nobody
//! charged for an order they were not given, every balance equal to its ledger.
//!
//! CI runs the short form; `CARDGATE_FAULT_PHASE_MS` makes each phase's load longer.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::Method;

use crate::helpers::*;
use crate::orders::{GOLD, SKU};

const RESELLERS: usize = 6;
const CLIENTS: usize = 12;
const CODES: usize = 20_000;
const FUNDS: i64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// 201 or 200: the order and its codes.
    Delivered { order_id: String, codes: Vec<String> },
    /// A refusal that takes nothing (out_of_stock, insufficient_balance).
    Refused(String),
    /// 503, 409 order_in_progress, a reset connection: the outcome is not known yet.
    Unknown,
}

#[derive(Default)]
struct Record {
    answers: Mutex<HashMap<(usize, String), Vec<Answer>>>,
    sent: AtomicU64,
}

impl Record {
    fn add(&self, who: usize, mon: &str, a: Answer) {
        self.answers
            .lock()
            .unwrap()
            .entry((who, mon.to_string()))
            .or_default()
            .push(a);
    }
}

async fn place(app: &TestApp, key: &ResellerKey, mon: &str) -> Answer {
    let body = order_body(SKU, 1, mon).to_string();
    let Ok(resp) = app
        .signed_request(key, Method::POST, "/v1/orders", Some(&body), now_secs(), &nonce(), &[])
        .send()
        .await
    else {
        return Answer::Unknown;
    };
    let status = resp.status().as_u16();
    let Ok(v) = resp.json::<serde_json::Value>().await else {
        return Answer::Unknown;
    };
    match (status, v["error"]["code"].as_str()) {
        (200 | 201, _) => Answer::Delivered {
            order_id: v["order_id"].as_str().unwrap_or_default().to_string(),
            codes: codes_of(&v),
        },
        (409, Some(c @ ("out_of_stock" | "insufficient_balance"))) => Answer::Refused(c.to_string()),
        (503, _) | (409, Some("order_in_progress")) => Answer::Unknown,
        other => panic!("unexpected answer for {mon}: {other:?} {v}"),
    }
}

/// Clients sending orders until `stop`: mostly new numbers, one in five a number the same
/// reseller sent before (a retry, which must come back as the same order).
fn load(
    app: Arc<TestApp>,
    keys: Arc<Vec<ResellerKey>>,
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..CLIENTS)
        .map(|c| {
            let (app, keys, record, stop) = (app.clone(), keys.clone(), record.clone(), stop.clone());
            tokio::spawn(async move {
                let mut mine: Vec<(usize, String)> = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (who, mon) = if !mine.is_empty() && rand::thread_rng().gen_ratio(1, 5) {
                        mine[rand::thread_rng().gen_range(0..mine.len())].clone()
                    } else {
                        n += 1;
                        let who = rand::thread_rng().gen_range(0..RESELLERS);
                        let m = (who, format!("F-{c}-{n}"));
                        mine.push(m.clone());
                        m
                    };
                    record.sent.fetch_add(1, Ordering::Relaxed);
                    let a = place(&app, &keys[who], &mon).await;
                    if a == Answer::Unknown {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    record.add(who, &mon, a);
                }
            })
        })
        .collect()
}

#[tokio::test]
async fn faults_lose_nothing_acknowledged_and_deliver_nothing_twice() {
    let phase = Duration::from_millis(
        std::env::var("CARDGATE_FAULT_PHASE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500),
    );
    let mut redis = PrivateRedis::start().await;
    let proxy = TcpProxy::start(&env_url("CARDGATE_DATABASE_URL")).await;
    let mut env = test_env(&proxy.url_for(&create_database().await));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for (k, v) in [
        ("CARDGATE_LISTEN", addr.to_string()),
        ("CARDGATE_REDIS_URL", redis.url()),
        ("CARDGATE_ORDERS__COMMIT_TIMEOUT_MS", "2000".into()),
        // A killed gateway's reservations are taken over by the next one within seconds.
        ("CARDGATE_ORDERS__CLAIM_IDLE_MS", "1000".into()),
        ("CARDGATE_TIERS__GOLD__ORDERS_PER_SECOND", "100000".into()),
        ("CARDGATE_TIERS__GOLD__ORDERS_BURST", "100000".into()),
    ] {
        env.insert(k.into(), v);
    }
    let log = std::env::temp_dir().join(format!("cardgate-faults-{}.log", random_suffix()));
    let mut gw = Gateway::start(&env, &log);
    let app = Arc::new(TestApp::external(addr, env.clone()));
    gw.wait_up(&app).await;

    let t = app.root_token().await;
    app.create_product(&t, SKU).await;
    let codes: Vec<String> = (0..CODES)
        .map(|i| format!("FAULT-{i:06}-{}", random_suffix()))
        .collect();
    assert_eq!(app.import_codes(&t, SKU, codes.join("\n")).await.status(), 200);
    let mut keys = Vec::new();
    for _ in 0..RESELLERS {
        let k = app.reseller_with_key(&t, "gold", serde_json::json!({})).await;
        app.fund(&t, &k.reseller_id, FUNDS).await;
        keys.push(k);
    }
    let keys = Arc::new(keys);
    let record = Arc::new(Record::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(app.clone(), keys.clone(), record.clone(), stop.clone());

    tokio::time::sleep(phase).await;
    // 1. The gateway dies mid-flight and comes back.
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    gw.restart();
    gw.wait_up(&app).await;
    tokio::time::sleep(phase).await;
    // 2. Redis restarts empty.
    redis.stop();
    redis.restart().await;
    tokio::time::sleep(phase).await;
    // 3. Postgres goes away and comes back.
    proxy.cut();
    tokio::time::sleep(phase).await;
    proxy.restore();
    tokio::time::sleep(phase).await;
    // 4. A deploy: SIGTERM under load drains and exits 0.
    let status = sigterm(&mut gw.child, Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exit {status:?}; log: {}",
        gw.tail()
    );
    gw.restart();
    gw.wait_up(&app).await;
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    // Every order whose outcome the client does not know is retried until it does.
    let unknown: Vec<(usize, String)> = record
        .answers
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, a)| a.iter().all(|a| *a == Answer::Unknown))
        .map(|(k, _)| k.clone())
        .collect();
    let retried = unknown.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (who, mon) in unknown {
        loop {
            let a = place(&app, &keys[who], &mon).await;
            let known = a != Answer::Unknown;
            record.add(who, &mon, a);
            if known {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mon} never got an answer; log: {}",
                gw.tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Postgres's view of every number, read back through the API.
    let answers = record.answers.lock().unwrap().clone();
    let (mut acknowledged, mut lost, mut doubled, mut charged_undelivered) = (0, 0, 0, 0);
    let mut owner_of_code: HashMap<String, String> = HashMap::new();
    let mut spent = [0i64; RESELLERS];
    for ((who, mon), seen) in &answers {
        let resp = app
            .signed(
                &keys[*who],
                Method::GET,
                &format!("/v1/orders?merchant_order_no={mon}"),
                None,
            )
            .await;
        let status = resp.status().as_u16();
        let stored: Option<serde_json::Value> = match status {
            200 => Some(resp.json().await.unwrap()),
            404 => None,
            other => panic!("reading {mon} back: {other}"),
        };
        let delivered: HashSet<(&String, &Vec<String>)> = seen
            .iter()
            .filter_map(|a| match a {
                Answer::Delivered { order_id, codes } => Some((order_id, codes)),
                _ => None,
            })
            .collect();
        if !delivered.is_empty() {
            acknowledged += 1;
        }
        match &stored {
            None if !delivered.is_empty() => lost += 1,
            Some(o) => {
                spent[*who] += o["amount"].as_i64().unwrap();
                let stored_codes = codes_of(o);
                if delivered.is_empty() {
                    charged_undelivered += 1;
                }
                // Every answer for one number is the one stored order.
                if delivered.len() > 1
                    || delivered
                        .iter()
                        .any(|(id, c)| id.as_str() != o["order_id"].as_str().unwrap() || **c != stored_codes)
                {
                    doubled += 1;
                }
                for c in stored_codes {
                    if owner_of_code.insert(c, mon.clone()).is_some() {
                        doubled += 1;
                    }
                }
            }
            None => {}
        }
    }
    println!(
        "faults: sent={} numbers={} acknowledged={acknowledged} retried={retried} lost={lost} doubled={doubled} charged_without_delivery={charged_undelivered}",
        record.sent.load(Ordering::Relaxed),
        answers.len(),
    );
    assert!(acknowledged > 0, "the load placed no order at all; log: {}", gw.tail());
    assert_eq!((lost, doubled, charged_undelivered), (0, 0, 0));
    for (who, k) in keys.iter().enumerate() {
        assert_eq!(app.balance_of(k).await, FUNDS - spent[who], "reseller {who}");
        assert_eq!(spent[who] % GOLD, 0);
    }
    app.assert_reconciled(&t).await;
    // Off the test's runtime: the Postgres proxy the command connects through runs on it.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_cardgate"))
            .arg("reconcile")
            .env_clear()
            .envs(&env)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "cardgate reconcile: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
