//! The fault harness (issue "survive faults"): signed orders from many resellers, unique
//! and repeated merchant_order_nos, while the gateway process is SIGKILLed and restarted,
//! Redis loses its data, Postgres goes away and comes back, and SIGTERM drains it. Then
//! every unanswered order is retried, and the harness's own record of the answers is
//! checked against Postgres: nothing acknowledged lost, no code delivered twice, nobody
//! charged for an order they were not given, every balance equal to its ledger.
//!
//! One body runs over two stores. Over a Redis of its own, Redis restarts empty. Over the
//! Redis Cluster (`CARDGATE_TEST_REDIS_CLUSTER`, one cluster test at a time), the Redis
//! faults are the cluster's: the primary of some resellers' home cells is killed and its
//! replica promoted, then the node restarts and rejoins as a replica; one primary loses its
//! data while the others keep theirs; then every primary loses its data at once. The
//! resellers' home cells are on every primary, so every fault lands under some of them.
//!
//! CI runs the short form; `CARDGATE_FAULT_PHASE_MS` makes each phase's load longer.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::Rng;
use reqwest::Method;

use crate::cluster::{cluster_nodes, cluster_urls, cluster_whole, home_slot, owner, Revive, ONE_AT_A_TIME};
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

/// The Redis under the gateway, and the faults the harness makes in it.
enum Store {
    /// A redis-server of the test's own, which restarts empty.
    Own(PrivateRedis),
    /// The test cluster, held for the whole run: a failover takes a primary from under
    /// every other cluster test.
    Cluster {
        urls: String,
        _one: tokio::sync::MutexGuard<'static, ()>,
    },
}

impl Store {
    fn url(&self) -> String {
        match self {
            Store::Own(redis) => redis.url(),
            Store::Cluster { urls, .. } => urls.clone(),
        }
    }

    /// Redis's faults, each followed by a phase of load.
    async fn faults(&mut self, app: &TestApp, keys: &[ResellerKey], gw: &Gateway, phase: Duration) {
        match self {
            Store::Own(redis) => {
                redis.stop();
                redis.restart().await;
                tokio::time::sleep(phase).await;
            }
            Store::Cluster { urls, .. } => cluster_faults(app, keys, urls, gw, phase).await,
        }
    }
}

/// The addresses of the live primaries in `CLUSTER NODES`.
fn primaries(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 8 && f[2].contains("master") && !f[2].contains("fail"))
                .then(|| f[1].split('@').next().unwrap_or_default().to_string())
        })
        .collect()
}

async fn node(addr: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `FLUSHALL` on every node of `addrs` at once: their data is gone together, as when
/// they restart empty together (their replicas follow).
async fn flush(addrs: &[String]) {
    let flushed = futures_util::future::join_all(
        addrs
            .iter()
            .map(|a| async move { redis::cmd("FLUSHALL").query_async::<()>(&mut node(a).await).await }),
    )
    .await;
    for (a, r) in addrs.iter().zip(flushed) {
        r.unwrap_or_else(|e| panic!("FLUSHALL on {a}: {e}"));
    }
}

/// A primary killed and its replica promoted, the node restarted to rejoin as a replica;
/// one primary's data lost; every primary's data lost.
async fn cluster_faults(app: &TestApp, keys: &[ResellerKey], urls: &str, gw: &Gateway, phase: Duration) {
    let dir = std::env::var("CARDGATE_DEV_CLUSTER_DIR")
        .expect("CARDGATE_DEV_CLUSTER_DIR: the cluster's node directories, to restart a killed node from");
    let mut slots = Vec::new();
    for k in keys {
        slots.push(home_slot(app, k, urls).await);
    }
    let nodes = cluster_nodes(urls).await.expect("a cluster node answers");
    let homes: HashSet<String> = slots.iter().filter_map(|s| owner(&nodes, *s)).collect();
    assert_eq!(
        homes.len(),
        primaries(&nodes).len(),
        "the resellers' home cells are not on every primary: {nodes}"
    );

    // 2. The primary of the first reseller's home cell dies; its replica takes over after
    // the node timeout. Until it comes back, the node is restarted should the test fail.
    let victim = owner(&nodes, slots[0]).unwrap();
    let port = victim.rsplit(':').next().unwrap_or_default();
    let revive = Revive(Some(format!("{dir}/{port}/redis.conf")));
    let _ = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .query_async::<()>(&mut node(&victim).await)
        .await;
    let promoted = eventually(Duration::from_secs(30), || async {
        cluster_nodes(urls)
            .await
            .and_then(|n| owner(&n, slots[0]))
            .is_some_and(|o| o != victim)
    })
    .await;
    assert!(promoted, "no replica took over from {victim}; log: {}", gw.tail());
    tokio::time::sleep(phase).await;
    drop(revive);
    let whole = eventually(Duration::from_secs(30), || cluster_whole(urls)).await;
    assert!(whole, "{victim} did not rejoin the cluster");

    // 3. One primary loses its data while the others keep theirs: the cells it serves
    // have no epoch, so the gateway rebuilds every cell from Postgres.
    let nodes = cluster_nodes(urls).await.expect("a cluster node answers");
    flush(&[owner(&nodes, slots[slots.len() - 1]).unwrap()]).await;
    // Rebuilt before the next loss: a node losing its data while a rebuild writes to it is
    // a second fault within the first that the rebuild does not notice (docs/operations.md).
    let rebuilt = eventually(Duration::from_secs(30), || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    assert!(
        rebuilt,
        "not rebuilt after one primary lost its data; log: {}",
        gw.tail()
    );
    tokio::time::sleep(phase).await;
    // Then every primary's at once, as a cluster restarted empty.
    flush(&primaries(&nodes)).await;
    tokio::time::sleep(phase).await;
}

#[tokio::test]
async fn faults_lose_nothing_acknowledged_and_deliver_nothing_twice() {
    harness(Store::Own(PrivateRedis::start().await)).await;
}

#[tokio::test]
async fn faults_on_a_cluster_lose_nothing_acknowledged_and_deliver_nothing_twice() {
    let Some(urls) = cluster_urls() else { return };
    let one = ONE_AT_A_TIME.lock().await;
    let whole = eventually(Duration::from_secs(30), || cluster_whole(&urls)).await;
    assert!(whole, "the cluster is not whole before the test");
    harness(Store::Cluster { urls, _one: one }).await;
}

async fn harness(mut store: Store) {
    let phase = Duration::from_millis(
        std::env::var("CARDGATE_FAULT_PHASE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500),
    );
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
        ("CARDGATE_REDIS_URL", store.url()),
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
    // 2 and 3. Redis's faults: it restarts empty, or the cluster's primaries fail over
    // and lose their data.
    store.faults(&app, &keys, &gw, phase).await;
    // 4. Postgres goes away and comes back.
    proxy.cut();
    tokio::time::sleep(phase).await;
    proxy.restore();
    tokio::time::sleep(phase).await;
    // 5. A deploy: SIGTERM under load drains and exits 0.
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
    // A few reads at a time: thousands of numbers one by one are most of the test's time.
    let stored: HashMap<(usize, String), Option<serde_json::Value>> = futures_util::stream::iter(answers.keys())
        .map(|(who, mon)| {
            let (app, keys) = (&app, &keys);
            async move {
                let resp = app
                    .signed(
                        &keys[*who],
                        Method::GET,
                        &format!("/v1/orders?merchant_order_no={mon}"),
                        None,
                    )
                    .await;
                let stored = match resp.status().as_u16() {
                    200 => Some(resp.json().await.unwrap()),
                    404 => None,
                    other => panic!("reading {mon} back: {other}"),
                };
                ((*who, mon.clone()), stored)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for ((who, mon), seen) in &answers {
        let stored = &stored[&(*who, mon.clone())];
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
        match stored {
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
        "faults{}: sent={} numbers={} acknowledged={acknowledged} retried={retried} lost={lost} doubled={doubled} charged_without_delivery={charged_undelivered}",
        match store {
            Store::Own(_) => "",
            Store::Cluster { .. } => " on the cluster",
        },
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
