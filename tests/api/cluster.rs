//! The gateway on a Redis Cluster (docs/api.md §9): `CARDGATE_REDIS_URL` lists the seed nodes.
//! Each reseller's keys are under its home cell's hash tag and each SKU's codes in a pool per
//! cell, so the cells spread over the primaries; these tests show the order path, reads, the
//! rebuild and reconciliation on that layout, three gateways sharing it, and the primary of a
//! buyer's home cell killed under load.
//!
//! They run against the cluster `scripts/dev test` starts (`CARDGATE_TEST_REDIS_CLUSTER`), one
//! at a time: the failover test takes a primary away from every other test's feet.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cardgate::config::Config;
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

/// The codes in every cell's pool, once no transfer between pools is under way (the mover
/// runs in the background): asserted to settle at `want` within a few seconds.
async fn assert_stock(app: &TestApp, urls: &str, want: i64) {
    let product_id = app.product_pk(SKU).await;
    let keys = app.keys();
    let mut c = cluster_conn(urls).await;
    let mut last = -1;
    for _ in 0..50 {
        last = 0;
        for cell in keys.all_cells() {
            last += redis::cmd("LLEN")
                .arg(keys.stock(cell, product_id))
                .query_async::<i64>(&mut c)
                .await
                .unwrap();
        }
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stock {last}, expected {want}");
}

/// The slot of a reseller's home cell.
pub(crate) async fn home_slot(app: &TestApp, k: &ResellerKey, urls: &str) -> u16 {
    let pk: i64 = app
        .db()
        .await
        .query_one("SELECT id FROM resellers WHERE reseller_id = $1", &[&k.reseller_id])
        .await
        .unwrap()
        .get(0);
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
    let (app, t, imported) = shop_with(10, on_cluster(&urls)).await;
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
    let (app, t, _) = shop_with(CODES, |env| {
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
