//! The gateway on a Redis Cluster (docs/api.md §9): `CARDGATE_REDIS_URL` lists the seed nodes.
//! Each reseller's keys are under its home cell's hash tag and each SKU's codes in a pool per
//! cell, so the cells spread over the primaries; these tests show the order path, reads, the
//! rebuild and reconciliation on that layout, three gateways sharing it, the primary of a
//! buyer's home cell killed under load, a slot moved to another primary under load
//! (`redis-cli --cluster reshard`), and one SKU imported into one cell sold out to every cell.
//!
//! They run against the cluster `scripts/dev test` starts (`CARDGATE_TEST_REDIS_CLUSTER`), one
//! at a time: the failover and the reshard take a slot's primary away from every other test's
//! feet. The reshard needs `redis-cli` on the PATH and moves its slots back when it ends.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cardgate::config::Config;
use cardgate::store::keys::Keys;
use reqwest::Method;
use serde_json::json;
use tokio::sync::Mutex;

use crate::helpers::*;
use crate::orders::{buyer, shop_with, SKU};

pub(crate) static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The cluster's seed URLs, or `None` (and a note) when no cluster is configured.
pub(crate) fn cluster_urls() -> Option<String> {
    match std::env::var("CARDGATE_TEST_REDIS_CLUSTER") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            eprintln!("skipped: CARDGATE_TEST_REDIS_CLUSTER is not set (scripts/dev test starts a local Redis Cluster and sets it)");
            None
        }
    }
}

fn on_cluster(urls: &str) -> impl FnOnce(&mut std::collections::HashMap<String, String>) + '_ {
    move |env| {
        env.insert("CARDGATE_REDIS_URL".into(), urls.to_string());
        // The tests send orders faster than a tier allows by default.
        env.insert("CARDGATE_TIERS__GOLD__ORDERS_PER_SECOND".into(), "10000".into());
        env.insert("CARDGATE_TIERS__GOLD__ORDERS_BURST".into(), "10000".into());
    }
}

async fn cluster_conn(urls: &str) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(urls.split(',').collect::<Vec<_>>())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

/// Each cell's pool length of a product.
async fn pools(c: &mut redis::cluster_async::ClusterConnection, keys: &Keys, product_id: i64) -> Vec<i64> {
    let mut out = Vec::new();
    for cell in keys.all_cells() {
        out.push(
            redis::cmd("LLEN")
                .arg(keys.stock(cell, product_id))
                .query_async::<i64>(c)
                .await
                .unwrap(),
        );
    }
    out
}

/// The codes in every cell's pool, once no transfer between pools is under way (the mover
/// runs in the background): asserted to settle at `want` within a few seconds.
async fn assert_stock(app: &TestApp, urls: &str, want: i64) {
    let product_id = app.product_pk(SKU).await;
    let keys = app.keys();
    let mut c = cluster_conn(urls).await;
    let mut last = -1;
    for _ in 0..50 {
        last = pools(&mut c, &keys, product_id).await.iter().sum();
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stock {last}, expected {want}");
}

/// The slot of a reseller's home cell.
pub(crate) async fn home_slot(app: &TestApp, k: &ResellerKey, urls: &str) -> u16 {
    let pk = app.reseller_pk(&k.reseller_id).await;
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(app.keys().balance(pk))
        .query_async(&mut cluster_conn(urls).await)
        .await
        .unwrap()
}

/// `CLUSTER NODES` as one live node sees it.
pub(crate) async fn cluster_nodes(urls: &str) -> Option<String> {
    for url in urls.split(',') {
        let Ok(client) = redis::Client::open(url) else { continue };
        let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await
        else {
            continue;
        };
        if let Ok(Ok(text)) = tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("CLUSTER").arg("NODES").query_async::<String>(&mut c),
        )
        .await
        {
            return Some(text);
        }
    }
    None
}

/// The address (`host:port`) of the live primary serving `slot`.
pub(crate) fn owner(nodes: &str, slot: u16) -> Option<String> {
    nodes.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
            return None;
        }
        let serves = f[8..].iter().any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
        });
        serves.then(|| f[1].split('@').next().unwrap_or_default().to_string())
    })
}

/// A live primary as `CLUSTER NODES` shows it.
struct Primary {
    id: String,
    /// `host:port`
    addr: String,
    /// The slots it serves, ascending.
    slots: Vec<u16>,
}

fn primaries(nodes: &str) -> Vec<Primary> {
    nodes
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || !f[2].contains("master") || f[2].contains("fail") {
                return None;
            }
            let mut slots = Vec::new();
            // `[slot->-node]` and `[slot-<-node]` mark a slot on its way, not one served.
            for range in f[8..].iter().filter(|r| !r.starts_with('[')) {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) {
                    slots.extend(lo..=hi);
                }
            }
            slots.sort_unstable();
            Some(Primary {
                id: f[0].to_string(),
                addr: f[1].split('@').next().unwrap_or_default().to_string(),
                slots,
            })
        })
        .collect()
}

/// `redis-cli --cluster reshard` moving the `n` lowest slots of primary `from` to primary `to`,
/// as an operator moves them.
fn reshard_args(via: &str, from: &str, to: &str, n: usize) -> Vec<String> {
    let n = n.to_string();
    let args = [
        "--cluster",
        "reshard",
        via,
        "--cluster-from",
        from,
        "--cluster-to",
        to,
        "--cluster-slots",
        &n,
        "--cluster-yes",
    ];
    args.iter().map(|a| a.to_string()).collect()
}

/// Runs redis-cli with `args` (a reshard). It refuses to begin while the nodes do not yet
/// agree on the slots (for a moment after an earlier move): that refusal moves nothing and
/// is retried. Returns how long the move took, or what redis-cli said.
fn reshard_blocking(args: &[String]) -> Result<Duration, String> {
    let mut refused = String::new();
    for _ in 0..40 {
        let started = Instant::now();
        let out = std::process::Command::new("redis-cli")
            .args(args)
            .output()
            .map_err(|e| format!("redis-cli: {e}"))?;
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !text.contains("[ERR]") {
            return Ok(took);
        }
        if text.contains("Moving slot") {
            return Err(format!("the reshard failed part way: {text}"));
        }
        refused = text;
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(format!("redis-cli would not reshard: {refused}"))
}

/// [`reshard_blocking`] on a thread of its own, off the runtime the gateway runs on.
async fn reshard(args: Vec<String>) -> Duration {
    tokio::task::spawn_blocking(move || reshard_blocking(&args))
        .await
        .expect("the reshard's thread")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// How many `MOVED`, `ASK` and `TRYAGAIN` answers every node has given so far (`INFO
/// errorstats`).
async fn redirections(urls: &str) -> [u64; 3] {
    let mut seen = [0; 3];
    for url in urls.split(',') {
        let Ok(client) = redis::Client::open(url) else { continue };
        let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await
        else {
            continue;
        };
        let Ok(info) = redis::cmd("INFO").arg("errorstats").query_async::<String>(&mut c).await else {
            continue;
        };
        for line in info.lines() {
            for (i, name) in ["MOVED", "ASK", "TRYAGAIN"].iter().enumerate() {
                if let Some(n) = line
                    .strip_prefix(&format!("errorstat_{name}:count="))
                    .and_then(|n| n.trim().parse::<u64>().ok())
                {
                    seen[i] += n;
                }
            }
        }
    }
    seen
}

/// Moves slots back when dropped, so that a failing test still leaves the cluster in the
/// shape the next one expects.
struct MoveBack(Option<Vec<String>>);

impl Drop for MoveBack {
    fn drop(&mut self) {
        if let Some(args) = self.0.take() {
            let _ = reshard_blocking(&args);
        }
    }
}

/// Starts a killed node again when dropped, so that a failing test still leaves the cluster
/// whole for the next one; it rejoins as its successor's replica.
pub(crate) struct Revive(pub(crate) Option<String>);

impl Drop for Revive {
    fn drop(&mut self) {
        if let Some(conf) = self.0.take() {
            let _ = std::process::Command::new("redis-server").arg(conf).status();
        }
    }
}

/// Every node up and agreeing the cluster is whole, with a replica for every primary
/// (a node just restarted says it is a primary until it learns otherwise).
pub(crate) async fn cluster_whole(urls: &str) -> bool {
    let Some(nodes) = cluster_nodes(urls).await else {
        return false;
    };
    let live = |role: &str| {
        nodes
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(2)
                    .is_some_and(|f| f.contains(role) && !f.contains("fail"))
            })
            .count()
    };
    if live("slave") != 3 || live("master") != 3 {
        return false;
    }
    for url in urls.split(',') {
        let Ok(client) = redis::Client::open(url) else {
            return false;
        };
        let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await
        else {
            return false;
        };
        match redis::cmd("CLUSTER").arg("INFO").query_async::<String>(&mut c).await {
            Ok(info) if info.contains("cluster_state:ok") => {}
            _ => return false,
        }
    }
    true
}

#[test]
fn redis_url_takes_one_redis_or_a_clusters_nodes() {
    let mut env = test_env("postgres://postgres@127.0.0.1:1/x");
    let valid = |env: &std::collections::HashMap<String, String>| Config::load(env).and_then(|c| c.validate()).is_ok();
    assert!(valid(&env));
    for good in [
        "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002",
        "redis://127.0.0.1:7000, redis://127.0.0.1:7001",
    ] {
        env.insert("CARDGATE_REDIS_URL".into(), good.into());
        assert!(valid(&env), "{good}");
    }
    for bad in [
        "redis://127.0.0.1:7000,,redis://127.0.0.1:7001",
        "redis://127.0.0.1:7000,http://127.0.0.1:7001",
        "redis://127.0.0.1:7000,",
        // A cluster has database 0 only.
        "redis://127.0.0.1:7000/1,redis://127.0.0.1:7001/1",
    ] {
        env.insert("CARDGATE_REDIS_URL".into(), bad.into());
        assert!(!valid(&env), "{bad}");
    }
    env.insert("CARDGATE_REDIS_URL".into(), "redis://127.0.0.1:7000".into());
    env.insert("CARDGATE_REDIS__CLUSTER".into(), "true".into());
    assert!(valid(&env));
}

#[tokio::test]
async fn orders_replays_reads_a_rebuild_and_reconciliation_on_a_cluster() {
    let Some(urls) = cluster_urls() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let (app, t, imported) = shop_with(10, |env| {
        on_cluster(&urls)(env);
        env.insert("CARDGATE_REDIS__CATALOGUE_LIVE_MAX".into(), "1".into());
    })
    .await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;

    let (status, first, replayed) = app.order(&k, order_body(SKU, 2, "C-1")).await;
    assert_eq!(status, 201, "{first}");
    assert!(!replayed);
    let codes = codes_of(&first);
    assert!(codes.iter().all(|c| imported.contains(c)));
    let (status, again, replayed) = app.order(&k, order_body(SKU, 2, "C-1")).await;
    assert_eq!((status, replayed), (200, true));
    assert_eq!(codes_of(&again), codes);
    assert_stock(&app, &urls, 8).await;

    let batch = json!({"orders": [order_body(SKU, 1, "C-2"), order_body(SKU, 3, "C-3")]}).to_string();
    let resp = app.signed(&k, Method::POST, "/v1/orders/batch", Some(&batch)).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let statuses: Vec<_> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!(201), json!(201)], "{body}");
    assert_stock(&app, &urls, 4).await;

    // Reads: the coalesced pipeline on the cluster connection.
    let id = first["order_id"].as_str().unwrap();
    let resp = app.signed(&k, Method::GET, &format!("/v1/orders/{id}"), None).await;
    assert_eq!(resp.status(), 200);
    let resp = app.signed(&k, Method::GET, &format!("/v1/products/{SKU}"), None).await;
    assert_eq!(resp.status(), 200);
    let listed: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        listed["available"], 4,
        "every cell's pool counted, one LLEN each: {listed}"
    );
    // A catalogue of several products, counted by the shared fetch (its live limit is 1
    // here): every cell's pool, each on its node.
    app.create_product(&t, "CLUSTER-OTHER").await;
    assert_eq!(
        catalogue_available(&app, &k, &[SKU, "CLUSTER-OTHER"]).await,
        [Some(4), Some(0)]
    );
    let spent = 6 * crate::orders::GOLD;
    assert_eq!(app.balance_of(&k).await, 1_000_000 - spent);

    // The buyer's keys sit in its home cell's slot.
    let slot = home_slot(&app, &k, &urls).await;
    let nodes = cluster_nodes(&urls).await.unwrap();
    let primary = owner(&nodes, slot).unwrap();
    let mut direct = redis::Client::open(format!("redis://{primary}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let in_slot: i64 = redis::cmd("CLUSTER")
        .arg("COUNTKEYSINSLOT")
        .arg(slot)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert!(in_slot > 0);

    // A rebuild from Postgres, then the same answers and the same stock.
    let state = app.state.clone().unwrap();
    let report = cardgate::rebuild::rebuild(&state, true).await.unwrap().unwrap();
    assert!(report.codes >= 4, "{report:?}");
    assert_stock(&app, &urls, 4).await;
    let (status, replay, replayed) = app.order(&k, order_body(SKU, 2, "C-1")).await;
    assert_eq!((status, replayed), (200, true), "{replay}");
    assert_eq!(codes_of(&replay), codes);
    let (status, next, _) = app.order(&k, order_body(SKU, 1, "C-4")).await;
    assert_eq!(status, 201, "{next}");
    assert_eq!(app.balance_of(&k).await, 1_000_000 - spent - crate::orders::GOLD);

    // Scripts loaded again after the cluster loses them (a promoted replica has none).
    let mut c = cluster_conn(&urls).await;
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await.unwrap();
    let (status, next, _) = app.order(&k, order_body(SKU, 1, "C-5")).await;
    assert_eq!(status, 201, "{next}");
    assert_stock(&app, &urls, 2).await;
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn three_gateways_sharing_a_cluster_sell_one_sku_out_without_oversell() {
    let Some(urls) = cluster_urls() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    const CODES: usize = 30;
    let (a, t, imported) = shop_with(CODES, on_cluster(&urls)).await;
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(buyer(&a, &t, "gold", 10_000_000).await);
    }
    let b = start(a.env.clone()).await;
    let c = start(a.env.clone()).await;
    let gateways = [&a, &b, &c];

    let mut calls = Vec::new();
    for (g, gw) in gateways.iter().enumerate() {
        for i in 0..20 {
            let k = &keys[(g + i) % 3];
            calls.push(gw.order(k, order_body(SKU, 1, &format!("T-{g}-{i}"))));
        }
    }
    let answers = futures_util::future::join_all(calls).await;
    let mut sold = Vec::new();
    for (status, body, _) in &answers {
        match status {
            201 => sold.extend(codes_of(body)),
            409 => assert_eq!(body["error"]["code"], "out_of_stock", "{body}"),
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(sold.len(), CODES, "every code sold once, no more");
    let distinct: HashSet<_> = sold.iter().collect();
    assert_eq!(distinct.len(), CODES, "no code sold twice");
    assert!(sold.iter().all(|c| imported.contains(c)));
    assert_stock(&a, &urls, 0).await;
    a.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_primary_killed_under_load_loses_no_acknowledged_order() {
    let Some(urls) = cluster_urls() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    assert!(
        tokio::time::timeout(Duration::from_secs(30), async {
            while !cluster_whole(&urls).await {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .is_ok(),
        "the cluster is not whole before the test"
    );
    const CODES: usize = 400;
    // The workers order at most CODES; the probe that finds orders resumed takes a code
    // too (and any probe whose answer was lost in the failover may): room for them, so a
    // fast run's last orders are not refused out of stock.
    let (app, t, _) = shop_with(CODES + 20, |env| {
        on_cluster(&urls)(env);
        // An order committed while its settling write to Redis failed is settled when
        // claimed again: soon, here.
        env.insert("CARDGATE_ORDERS__CLAIM_IDLE_MS".into(), "1000".into());
    })
    .await;
    let k = buyer(&app, &t, "gold", 100_000_000).await;
    let slot = home_slot(&app, &k, &urls).await;
    let nodes = cluster_nodes(&urls).await.unwrap();
    let victim = owner(&nodes, slot).unwrap();

    // Four clients ordering one code at a time until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = std::sync::Arc::new(app);
    let mut workers = Vec::new();
    for w in 0..4 {
        let (app, k, stop) = (app.clone(), k.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < CODES / 4 {
                let mon = format!("F-{w}-{i}");
                let resp = app.post_order(&k, order_body(SKU, 1, &mon)).await;
                let status = resp.status().as_u16();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                seen.push((mon, status, body));
                i += 1;
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The primary of the buyer's home cell goes away; its replica takes over after the
    // node timeout.
    let mut direct = redis::Client::open(format!("redis://{victim}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let port = victim.rsplit(':').next().unwrap_or_default();
    let revive = Revive(
        std::env::var("CARDGATE_DEV_CLUSTER_DIR")
            .ok()
            .map(|dir| format!("{dir}/{port}/redis.conf")),
    );
    let _ = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .query_async::<()>(&mut direct)
        .await;
    let killed_at = Instant::now();
    let promoted = eventually(Duration::from_secs(30), || async {
        let Some(nodes) = cluster_nodes(&urls).await else {
            return false;
        };
        owner(&nodes, slot).is_some_and(|o| o != victim)
    })
    .await;
    assert!(promoted, "no replica took over slot {slot}");
    // Orders go through again once the gateway sees the new primary.
    let serving = eventually(Duration::from_secs(30), || {
        let (app, k) = (app.clone(), k.clone());
        async move {
            let (status, _, _) = app
                .order(&k, order_body(SKU, 1, &format!("P-{}", random_suffix())))
                .await;
            status == 201
        }
    })
    .await;
    assert!(serving, "orders did not resume within 30 s of the promotion");
    eprintln!("orders resumed {:?} after the kill", killed_at.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.unwrap());
    }

    // Whatever was in flight at the kill settles; then Redis and Postgres agree.
    let clean = eventually(Duration::from_secs(20), || async {
        let r = app.admin_ok(&t, Method::GET, "/admin/v1/reconcile", None, 200).await;
        r["ok"] == true
    })
    .await;
    if !clean {
        app.assert_reconciled(&t).await;
    }

    // Every acknowledged order is kept: recorded once, and replayed with its codes.
    let answered: std::collections::BTreeMap<u16, usize> = seen.iter().fold(Default::default(), |mut m, (_, s, _)| {
        *m.entry(*s).or_default() += 1;
        m
    });
    eprintln!("answers under the failover: {answered:?}");
    // While the slot has no primary the answer is 503 (retry), never a 500.
    assert!(seen.iter().all(|(_, s, _)| *s == 201 || *s == 503), "{answered:?}");
    let acknowledged: Vec<_> = seen.iter().filter(|(_, s, _)| *s == 201).collect();
    assert!(acknowledged.len() > 4, "too little load: {}", acknowledged.len());
    let db = app.db().await;
    let mut codes = HashSet::new();
    for (mon, _, body) in &acknowledged {
        let (status, replay, replayed) = app.order(&k, order_body(SKU, 1, mon)).await;
        assert_eq!((status, replayed), (200, true), "{mon}: {replay}");
        assert_eq!(codes_of(&replay), codes_of(body), "{mon}");
        for c in codes_of(body) {
            assert!(codes.insert(c), "a code delivered twice");
        }
        let n: i64 = db
            .query_one("SELECT count(*) FROM orders WHERE merchant_order_no = $1", &[mon])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{mon} recorded");
    }

    // The killed node comes back as a replica, so the cluster is whole for the next test.
    drop(revive);
    let whole = eventually(Duration::from_secs(30), || cluster_whole(&urls)).await;
    assert!(whole, "the restarted node did not rejoin");
}

#[tokio::test]
async fn a_change_on_one_gateway_reaches_another_through_the_cluster_within_a_second() {
    let Some(urls) = cluster_urls() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let (a, t, _) = shop_with(1, on_cluster(&urls)).await;
    let k = buyer(&a, &t, "gold", 0).await;
    let b = start(a.env.clone()).await;
    assert_eq!(b.signed(&k, Method::GET, "/v1/balance", None).await.status(), 200);

    // Far sooner than the periodic refresh: the announcement, published on the cluster and
    // heard on whichever node B subscribed to.
    a.admin_ok(&t, Method::DELETE, &format!("/admin/v1/keys/{}", k.key_id), None, 200)
        .await;
    assert!(
        eventually(Duration::from_secs(1), || async {
            b.signed(&k, Method::GET, "/v1/balance", None).await.status() == 401
        })
        .await,
        "revocation not seen by B within 1 s"
    );
}

/// One answer seen by a client of the reshard test.
struct Answer {
    buyer: usize,
    /// The order's merchant_order_no; `None` for a read.
    mon: Option<String>,
    status: u16,
    body: serde_json::Value,
    /// The reshard's phase when the request was sent and when it was answered: 0 before,
    /// 1 while the slots move, 2 after.
    phases: (u8, u8),
}

impl Answer {
    fn during(&self) -> bool {
        self.phases.0 <= 1 && self.phases.1 >= 1
    }
}

#[tokio::test]
async fn a_slot_moved_to_another_primary_under_load_loses_no_order() {
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;

    let Some(urls) = cluster_urls() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    assert!(
        eventually(Duration::from_secs(30), || cluster_whole(&urls)).await,
        "the cluster is not whole before the test"
    );
    const CODES: usize = 2000;
    const FUNDS: i64 = 100_000_000;
    const WORKERS_PER_BUYER: usize = 2;
    const PADDING: usize = 5_000;
    let (app, t, imported) = shop_with(CODES, on_cluster(&urls)).await;
    let keys = app.keys();
    let product = app.product_pk(SKU).await;

    // The cell whose slot comes first among its primary's slots: redis-cli takes a primary's
    // slots in ascending order, so moving that one moves the fewest others along.
    let nodes = cluster_nodes(&urls).await.unwrap();
    let before = primaries(&nodes);
    let mut c = cluster_conn(&urls).await;
    let mut pick: Option<(u32, u16, usize, usize)> = None;
    for cell in keys.all_cells() {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(keys.epoch(cell))
            .query_async(&mut c)
            .await
            .unwrap();
        let Some(p) = before.iter().position(|p| p.slots.contains(&slot)) else {
            continue;
        };
        let below = before[p].slots.iter().filter(|s| **s < slot).count();
        if pick.is_none_or(|(_, _, _, b)| below < b) {
            pick = Some((cell, slot, p, below));
        }
    }
    let (cell, slot, from, below) = pick.expect("every cell's slot is served");
    let source = &before[from];
    let n = below + 1;
    // A primary that gives all its slots away becomes a replica of the one that took them.
    assert!(n < source.slots.len(), "slot {slot} is its primary's last");
    // Preferably a primary whose slots all come after the moved ones (below).
    let dest = before
        .iter()
        .filter(|p| p.id != source.id)
        .max_by_key(|p| p.slots.first().copied())
        .expect("another primary");

    // Two buyers at home in that cell, three elsewhere.
    let mut buyers: Vec<(Arc<ResellerKey>, bool)> = Vec::new();
    for _ in 0..8 * keys.cells() {
        let home = buyers.iter().filter(|(_, h)| *h).count();
        if home == 2 && buyers.len() == 5 {
            break;
        }
        let k = app.reseller_with_key(&t, "gold", json!({})).await;
        let at_home = keys.cell_of(app.reseller_pk(&k.reseller_id).await) == cell;
        if (at_home && home < 2) || (!at_home && buyers.len() - home < 3) {
            app.fund(&t, &k.reseller_id, FUNDS).await;
            buyers.push((Arc::new(k), at_home));
        }
    }
    assert_eq!(
        buyers.iter().filter(|(_, h)| *h).count(),
        2,
        "no two buyers in cell {cell}"
    );
    assert_eq!(buyers.len(), 5);
    // The moved cell holds a pool of the product too, once the mover spreads the import.
    let pool = keys.stock(cell, product);
    let stocked = eventually(Duration::from_secs(10), || {
        let (mut c, pool) = (c.clone(), pool.clone());
        async move { redis::cmd("LLEN").arg(pool).query_async::<i64>(&mut c).await.unwrap() > 0 }
    })
    .await;
    assert!(stocked, "no codes in cell {cell}'s pool");
    // A busy cell's slot holds many keys (a nonce per signed request for the replay window,
    // an idempotency record per order), and the slot is open for migration until the last
    // one has moved: as many here, expiring on their own.
    for chunk in 0..PADDING / 1000 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("SET")
                .arg(format!("{}:{{c{cell}}}:pad:{}", app.redis_prefix(), chunk * 1000 + i))
                .arg("x")
                .arg("EX")
                .arg(120)
                .ignore();
        }
        let () = pipe.query_async(&mut c).await.unwrap();
    }

    // Each buyer's clients order one code at a time, with a signed read every fourth request,
    // never more orders in all than there are codes.
    let app = Arc::new(app);
    let phase = Arc::new(AtomicU8::new(0));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let per_worker = CODES / (buyers.len() * WORKERS_PER_BUYER) * 4 / 3;
    let mut workers = Vec::new();
    for (b, (k, _)) in buyers.iter().enumerate() {
        for w in 0..WORKERS_PER_BUYER {
            let (app, k, phase, acknowledged) = (app.clone(), k.clone(), phase.clone(), acknowledged.clone());
            workers.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut last_order: Option<String> = None;
                for i in 0..per_worker {
                    if phase.load(Relaxed) == 3 {
                        break;
                    }
                    let sent = phase.load(Relaxed);
                    let (mon, resp) = if i % 4 == 3 {
                        let path = match &last_order {
                            Some(id) if i % 8 == 7 => format!("/v1/orders/{id}"),
                            _ => "/v1/balance".to_string(),
                        };
                        (None, app.signed(&k, Method::GET, &path, None).await)
                    } else {
                        let mon = format!("R-{b}-{w}-{i}");
                        let resp = app.post_order(&k, order_body(SKU, 1, &mon)).await;
                        (Some(mon), resp)
                    };
                    let status = resp.status().as_u16();
                    let body: serde_json::Value = resp.json().await.unwrap_or_default();
                    if status == 201 {
                        acknowledged.fetch_add(1, Relaxed);
                        last_order = body["order_id"].as_str().map(String::from);
                    }
                    seen.push(Answer {
                        buyer: b,
                        mon,
                        status,
                        body,
                        phases: (sent, phase.load(Relaxed)),
                    });
                }
                seen
            }));
        }
    }
    let flowing = |at_least: usize| {
        let acknowledged = acknowledged.clone();
        async move {
            eventually(Duration::from_secs(30), || {
                let acknowledged = acknowledged.clone();
                async move { acknowledged.load(Relaxed) >= at_least }
            })
            .await
        }
    };
    assert!(flowing(50).await, "the load did not start");

    // The slot moves while the clients keep going.
    let redirected = redirections(&urls).await;
    let retries = metric(&app, "cardgate_redis_slot_moving_retries_total").await;
    phase.store(1, Relaxed);
    let at_move = acknowledged.load(Relaxed);
    let took = reshard(reshard_args(&source.addr, &source.id, &dest.id, n)).await;
    phase.store(2, Relaxed);
    // Moving them back is moving the destination's `n` lowest slots when all of its own
    // came after them.
    let mut move_back = MoveBack(
        dest.slots
            .first()
            .is_some_and(|s| *s > slot)
            .then(|| reshard_args(&dest.addr, &dest.id, &source.id, n)),
    );
    let moved = eventually(Duration::from_secs(10), || async {
        cluster_nodes(&urls)
            .await
            .is_some_and(|nodes| owner(&nodes, slot).as_deref() == Some(dest.addr.as_str()))
    })
    .await;
    assert!(moved, "slot {slot} is not served by {}", dest.addr);
    let after_move = acknowledged.load(Relaxed);
    // Orders go on at the new owner.
    assert!(flowing(after_move + 50).await, "orders stopped after the move");
    phase.store(3, Relaxed);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.unwrap());
    }
    let now = redirections(&urls).await;
    let redirected: Vec<u64> = now.iter().zip(redirected).map(|(n, b)| n.saturating_sub(b)).collect();
    eprintln!(
        "the nodes answered MOVED {}, ASK {}, TRYAGAIN {} times meanwhile; the gateway tried {} scripts again",
        redirected[0],
        redirected[1],
        redirected[2],
        metric(&app, "cardgate_redis_slot_moving_retries_total").await - retries
    );
    // The gateway met the move (its map of the slots was stale afterwards, at least).
    assert!(
        redirected.iter().sum::<u64>() > 0,
        "no redirection while the slots moved"
    );

    let tally = |during: bool| {
        seen.iter()
            .filter(|a| a.during() == during)
            .fold(std::collections::BTreeMap::new(), |mut m, a| {
                *m.entry((if a.mon.is_some() { "order" } else { "read" }, a.status))
                    .or_insert(0usize) += 1;
                m
            })
    };
    eprintln!(
        "moved {n} slots with slot {slot} (cell {cell}) from {} to {} in {took:?}; {} orders acknowledged before, {} during",
        source.addr,
        dest.addr,
        at_move,
        after_move - at_move
    );
    eprintln!("answers while the slots moved: {:?}", tally(true));
    eprintln!("answers otherwise: {:?}", tally(false));
    for a in seen.iter().filter(|a| a.status == 503) {
        let home = if buyers[a.buyer].1 {
            "at home in the moved cell"
        } else {
            "elsewhere"
        };
        eprintln!("503 to buyer {} {home} (phases {:?}): {}", a.buyer, a.phases, a.body);
    }
    // Never a 500: an order is placed, refused for want of stock, or to be retried.
    for a in &seen {
        let fine = match (&a.mon, a.status) {
            (Some(_), 201 | 503) | (None, 200 | 503) => true,
            (Some(_), 409) => a.body["error"]["code"] == "out_of_stock",
            _ => false,
        };
        assert!(fine, "{} (phases {:?}): {}", a.status, a.phases, a.body);
    }
    // Only the moved cell waits for its slot: the others go on.
    let elsewhere = seen.iter().filter(|a| a.status == 503 && !buyers[a.buyer].1).count();
    assert_eq!(elsewhere, 0, "503s to buyers whose cell did not move");
    let home_after = seen
        .iter()
        .filter(|a| a.status == 201 && a.phases.0 == 2 && buyers[a.buyer].1)
        .count();
    assert!(home_after > 0, "no order of the moved cell's buyers after the move");

    // Whatever was in flight settles; then Redis and Postgres agree.
    let clean = eventually(Duration::from_secs(20), || async {
        let r = app.admin_ok(&t, Method::GET, "/admin/v1/reconcile", None, 200).await;
        r["ok"] == true
    })
    .await;
    if !clean {
        app.assert_reconciled(&t).await;
    }

    // Every acknowledged order is kept once and replays with its codes; no code twice.
    let mut codes = HashSet::new();
    let acked: Vec<&Answer> = seen.iter().filter(|a| a.mon.is_some() && a.status == 201).collect();
    for chunk in acked.chunks(16) {
        let replays = chunk.iter().map(|a| {
            let (app, k) = (app.clone(), buyers[a.buyer].0.clone());
            let mon = a.mon.clone().unwrap_or_default();
            async move { app.order(&k, order_body(SKU, 1, &mon)).await }
        });
        for (a, (status, replay, replayed)) in chunk.iter().zip(futures_util::future::join_all(replays).await) {
            assert_eq!((status, replayed), (200, true), "{:?}: {replay}", a.mon);
            assert_eq!(codes_of(&replay), codes_of(&a.body), "{:?}", a.mon);
            for code in codes_of(&a.body) {
                assert!(imported.contains(&code), "{code} was never imported");
                assert!(codes.insert(code), "a code delivered twice");
            }
        }
    }
    let rows = app
        .db()
        .await
        .query(
            "SELECT r.reseller_id, o.merchant_order_no, o.amount FROM orders o JOIN resellers r ON r.id = o.reseller_id",
            &[],
        )
        .await
        .unwrap();
    let recorded: Vec<(String, String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let sent: HashSet<(&str, &str)> = seen
        .iter()
        .filter_map(|a| Some((buyers[a.buyer].0.reseller_id.as_str(), a.mon.as_deref()?)))
        .collect();
    for (reseller, mon, _) in &recorded {
        assert!(
            sent.contains(&(reseller.as_str(), mon.as_str())),
            "{mon} recorded, never sent"
        );
    }
    let recorded_mons: HashSet<(&str, &str)> = recorded.iter().map(|(r, m, _)| (r.as_str(), m.as_str())).collect();
    assert_eq!(recorded_mons.len(), recorded.len(), "an order recorded twice");
    for a in &acked {
        let key = (
            buyers[a.buyer].0.reseller_id.as_str(),
            a.mon.as_deref().unwrap_or_default(),
        );
        assert!(recorded_mons.contains(&key), "{:?} acknowledged, not recorded", a.mon);
    }
    eprintln!("{} orders recorded, {} acknowledged", recorded.len(), acked.len());
    // Each balance is what it was funded less what its recorded orders cost.
    for (k, _) in &buyers {
        let charged: i64 = recorded
            .iter()
            .filter(|(r, _, _)| *r == k.reseller_id)
            .map(|(_, _, amount)| amount)
            .sum();
        assert_eq!(app.balance_of(k).await, FUNDS - charged, "{}", k.reseller_id);
        assert_eq!(app.recorded_balance(&k.reseller_id).await, FUNDS - charged);
    }
    app.assert_reconciled(&t).await;

    // The slots go home, so the cluster keeps its shape for the tests after this one.
    if let Some(args) = move_back.0.take() {
        reshard(args).await;
    }
    let whole = eventually(Duration::from_secs(30), || cluster_whole(&urls)).await;
    assert!(whole, "the cluster is not whole after the move");
}

/// One SKU imported into one cell sells out to resellers at home in every cell at once, on
/// the cluster: the pools sit on different primaries, so every code a dry cell brings over
/// crosses nodes. Each code is sold exactly once, and no order is refused out_of_stock while a
/// code remains anywhere: none is filled after one was refused, and nothing is left over.
#[tokio::test]
async fn a_sku_imported_into_one_cell_sells_out_to_every_cell_of_a_cluster() {
    let Some(urls) = cluster_urls() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    const CODES: usize = 120;
    let (app, t, imported) = shop_with(CODES, |env| {
        on_cluster(&urls)(env);
        // No rebalancing in the background: every code stays in the import cell until an
        // order in another cell brings some over.
        env.insert(MANUAL_BACKGROUND.into(), "1".into());
    })
    .await;
    let keys = app.keys();
    let product = app.product_pk(SKU).await;
    let mut c = cluster_conn(&urls).await;
    let start = pools(&mut c, &keys, product).await;
    assert_eq!(
        start.iter().filter(|n| **n > 0).count(),
        1,
        "imported into one cell: {start:?}"
    );
    assert_eq!(start.iter().sum::<i64>(), CODES as i64);
    let buyers = crate::cells::buyers_in_every_cell(&app, &t, keys.cells()).await;

    // Every buyer orders one code at a time until refused; more orders than codes in all.
    let app = std::sync::Arc::new(app);
    let began = Instant::now();
    let mut workers = Vec::new();
    for (b, k) in buyers.iter().enumerate() {
        let (app, k) = (app.clone(), k.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..=CODES {
                let sent = began.elapsed();
                let (status, body, _) = app.order(&k, order_body(SKU, 1, &format!("S-{b}-{i}"))).await;
                seen.push((sent, began.elapsed(), status, body));
                if status != 201 {
                    break;
                }
            }
            seen
        }));
    }
    let mut sold = Vec::new();
    let mut last_filled_sent = Duration::ZERO;
    let mut first_refused = None;
    for w in workers {
        let seen = w.await.unwrap();
        for (sent, answered, status, body) in &seen {
            match status {
                201 => {
                    sold.extend(codes_of(body));
                    last_filled_sent = last_filled_sent.max(*sent);
                }
                409 => {
                    assert_eq!(body["error"]["code"], "out_of_stock", "{body}");
                    first_refused = Some(first_refused.map_or(*answered, |f: Duration| f.min(*answered)));
                }
                other => panic!("{other}: {body}"),
            }
        }
        let (_, _, status, body) = seen.last().expect("an answer");
        assert_eq!(*status, 409, "a buyer never refused: {body}");
    }
    assert_eq!(sold.len(), CODES, "every code sold");
    let distinct: HashSet<_> = sold.iter().collect();
    assert_eq!(distinct.len(), CODES, "no code sold twice");
    assert!(sold.iter().all(|c| imported.contains(c)));
    // Stock only goes down here: an order sent after a refusal was answered, and filled,
    // would prove codes were left when that refusal said none were.
    let first_refused = first_refused.expect("refusals");
    assert!(
        last_filled_sent < first_refused,
        "an order sent at {last_filled_sent:?} was filled after one was refused at {first_refused:?}"
    );
    assert_eq!(pools(&mut c, &keys, product).await.iter().sum::<i64>(), 0);
    let report = app.assert_reconciled(&t).await;
    assert_eq!(report["products"][0]["delivered"], CODES);
    assert_eq!(report["products"][0]["available"], 0);
}
