//! Tier rate limits held across gateways (docs/api.md §3 "Rate limits", §9): three
//! gateways over one database and one Redis prefix draw on one bucket per reseller and
//! class. With limits kept in each process, as before, every gateway would admit a whole
//! burst of its own, three in all, and each would count its `RateLimit-Remaining` down
//! from the burst by itself: the bounds below allow one burst, and remaining counts as
//! the one bucket does.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use cardgate::config::Tier;
use cardgate::ratelimit::global::{self, Charge, Spent};
use cardgate::ratelimit::{Class, Outcome};
use cardgate::store::keys::Keys;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::orders::{buyer, shop_with, SKU};

/// The standard tier's orders and reads in these tests: one a second, five at once.
const RATE: f64 = 1.0;
const BURST: u64 = 5;

/// Tokens the bucket can have given back within `d`.
fn refills(d: Duration) -> u64 {
    (d.as_secs_f64() * RATE).floor() as u64
}

/// Three gateways sharing a database and a Redis prefix, a product with `codes` codes,
/// a root token and `resellers` funded standard resellers. Everything is created before
/// the second and third gateways start, so they load it as they start.
async fn three_gateways(codes: usize, resellers: usize) -> (Vec<TestApp>, String, Vec<ResellerKey>) {
    let (a, t, _) = shop_with(codes, |env| {
        for (name, value) in [
            ("ORDERS_PER_SECOND", RATE),
            ("ORDERS_BURST", BURST as f64),
            ("READS_PER_SECOND", RATE),
            ("READS_BURST", BURST as f64),
        ] {
            env.insert(format!("CARDGATE_TIERS__STANDARD__{name}"), value.to_string());
        }
    })
    .await;
    let mut keys = Vec::new();
    for _ in 0..resellers {
        keys.push(buyer(&a, &t, "standard", 1_000_000).await);
    }
    let b = start(a.env.clone()).await;
    let c = start(a.env.clone()).await;
    (vec![a, b, c], t, keys)
}

/// One answer as these tests read it.
#[derive(Debug)]
struct Seen {
    gateway: usize,
    status: u16,
    /// `RateLimit-Limit`, `-Remaining`, `-Reset`.
    limit: u64,
    remaining: u64,
    reset: u64,
    retry_after: Option<u64>,
    /// Since the test's requests began, when the answer was in.
    at: Duration,
    body: Value,
}

async fn seen(resp: reqwest::Response, gateway: usize, since: Instant) -> Seen {
    let number = |name: &str| -> Option<u64> { resp.headers().get(name)?.to_str().ok()?.parse().ok() };
    let limit = number("ratelimit-limit").expect("RateLimit-Limit");
    let remaining = number("ratelimit-remaining").expect("RateLimit-Remaining");
    let reset = number("ratelimit-reset").expect("RateLimit-Reset");
    let retry_after = number("retry-after");
    let status = resp.status().as_u16();
    let body = resp.json().await.expect("a JSON answer");
    Seen {
        gateway,
        status,
        limit,
        remaining,
        reset,
        retry_after,
        at: since.elapsed(),
        body,
    }
}

/// One burst in all, on whichever gateway: at least the burst admitted (a fresh bucket is
/// full), at most the burst and what came back while the requests ran; every admitted
/// answer's `RateLimit-Remaining` as the shared bucket counts it, every other a `429`.
fn assert_one_bucket(answers: &[Seen], elapsed: Duration, ok: u16) {
    let bound = BURST + refills(elapsed);
    assert!(
        bound < 3 * BURST,
        "the requests took {elapsed:?}: too slow to tell one shared burst from three"
    );
    let admitted: Vec<&Seen> = answers.iter().filter(|s| s.status == ok).collect();
    let n = admitted.len() as u64;
    assert!(
        (BURST..=bound).contains(&n),
        "{n} admitted over three gateways in {elapsed:?}; one bucket allows {BURST} to {bound}: {answers:#?}"
    );
    let gateways: HashSet<usize> = admitted.iter().map(|s| s.gateway).collect();
    assert_eq!(gateways.len(), 3, "every gateway drew on the one bucket: {answers:#?}");
    for (i, s) in admitted.iter().enumerate() {
        // i + 1 tokens taken by then, less what came back since.
        let least = (BURST - 1).saturating_sub(i as u64);
        assert!(
            (least..=least + refills(s.at)).contains(&s.remaining) && s.remaining < BURST,
            "admitted answer {i} (gateway {}) says {} remaining; the shared bucket holds {least} plus what came back in {:?}",
            s.gateway,
            s.remaining,
            s.at
        );
        assert_eq!(s.limit, BURST);
        assert!(s.reset >= 1, "{s:?}");
    }
    for s in answers.iter().filter(|s| s.status != ok) {
        assert_eq!(s.status, 429, "{s:?}");
        assert_eq!(s.body["error"]["code"], "rate_limited", "{s:?}");
        assert!(
            s.retry_after.is_some_and(|r| r >= 1),
            "Retry-After in whole seconds: {s:?}"
        );
        assert_eq!((s.limit, s.remaining), (BURST, 0), "{s:?}");
        assert!(s.reset >= 1, "{s:?}");
    }
}

#[tokio::test]
async fn orders_spread_over_three_gateways_are_admitted_up_to_one_burst_in_all() {
    let (gw, _t, keys) = three_gateways(30, 1).await;
    let k = &keys[0];
    // Seven to each gateway in turn: each gateway's own shield passes the first five and
    // refuses the rest, so both the reservation script and the shield's settling are seen.
    let since = Instant::now();
    let mut answers = Vec::new();
    for i in 0..21 {
        let g = i % 3;
        let resp = gw[g].post_order(k, order_body(SKU, 1, &format!("G-{i}"))).await;
        answers.push(seen(resp, g, since).await);
    }
    assert_one_bucket(&answers, since.elapsed(), 201);

    // What was admitted is all that was sold, and the refusals took nothing.
    let admitted = answers.iter().filter(|s| s.status == 201).count() as i64;
    let orders: i64 = gw[0]
        .db()
        .await
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orders, admitted);
    assert_eq!(gw[0].stock_len(SKU).await, 30 - admitted);
    assert!(metric(&gw[0], "cardgate_rate_limited_total").await >= 1.0);
}

#[tokio::test]
async fn reads_spread_over_three_gateways_are_admitted_up_to_one_burst_in_all() {
    let (gw, _t, keys) = three_gateways(3, 1).await;
    let k = &keys[0];
    let since = Instant::now();
    let mut answers = Vec::new();
    for i in 0..21 {
        let g = i % 3;
        // Both kinds of read: the balance (one Redis GET) and the catalogue (LLEN each).
        let path = if i % 2 == 0 { "/v1/balance" } else { "/v1/products" };
        let resp = gw[g].signed(k, Method::GET, path, None).await;
        answers.push(seen(resp, g, since).await);
    }
    assert_one_bucket(&answers, since.elapsed(), 200);

    // Reads and orders are counted apart: the order bucket is still full.
    let resp = gw[1].post_order(k, order_body(SKU, 1, "after-reads")).await;
    let s = seen(resp, 1, Instant::now()).await;
    assert_eq!((s.status, s.remaining), (201, BURST - 1), "{s:?}");
}

#[tokio::test]
async fn a_batch_takes_one_shared_token_per_order_all_or_none() {
    let (gw, _t, keys) = three_gateways(20, 1).await;
    let k = &keys[0];
    let batch = |tag: &str, n: usize| {
        json!({"orders": (0..n).map(|i| order_body(SKU, 1, &format!("{tag}-{i}"))).collect::<Vec<_>>()}).to_string()
    };
    let since = Instant::now();
    let resp = gw[0]
        .signed(k, Method::POST, "/v1/orders/batch", Some(&batch("A", 4)))
        .await;
    let a = seen(resp, 0, since).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.body["results"].as_array().unwrap().iter().all(|r| r["status"] == 201),
        "{a:?}"
    );
    assert!((1..=1 + refills(a.at)).contains(&a.remaining), "{a:?}");

    // Another gateway, whose own shield is full: four more need three tokens the bucket
    // has not had time to get back. Refused whole, and the answer says what is left.
    let resp = gw[1]
        .signed(k, Method::POST, "/v1/orders/batch", Some(&batch("B", 4)))
        .await;
    let b = seen(resp, 1, since).await;
    assert!(
        b.at < Duration::from_secs(3),
        "too slow for the bucket to be short: {b:?}"
    );
    assert_eq!(
        (b.status, b.body["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{b:?}"
    );
    assert!(
        (1..=1 + refills(b.at)).contains(&b.remaining) && b.retry_after.is_some_and(|r| r >= 1),
        "some tokens left, not enough: {b:?}"
    );

    // What is left is there for a third gateway.
    let resp = gw[2]
        .signed(k, Method::POST, "/v1/orders/batch", Some(&batch("C", 1)))
        .await;
    let c = seen(resp, 2, since).await;
    assert_eq!(
        (c.status, c.body["results"][0]["status"].as_i64()),
        (200, Some(201)),
        "{c:?}"
    );

    let placed: Vec<String> = gw[0]
        .db()
        .await
        .query("SELECT merchant_order_no FROM orders ORDER BY merchant_order_no", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        placed,
        ["A-0", "A-1", "A-2", "A-3", "C-0"],
        "nothing of the refused batch ran"
    );
}

/// A gateway's shield counts requests the bucket refused (another gateway took the
/// tokens first), so it can be emptier than the bucket; it never answers alone.
#[tokio::test]
async fn a_gateway_whose_shield_is_spent_still_admits_what_the_shared_bucket_holds() {
    let (gw, _t, keys) = three_gateways(20, 1).await;
    let k = &keys[0];
    let since = Instant::now();
    for i in 0..4 {
        let (status, body, _) = gw[0].order(k, order_body(SKU, 1, &format!("A-{i}"))).await;
        assert_eq!(status, 201, "{body}");
    }
    // Five at once pass the second gateway's full shield, and empty it; the bucket has
    // one token, so it refuses the batch.
    let five = json!({"orders": (0..5).map(|i| order_body(SKU, 1, &format!("B-{i}"))).collect::<Vec<_>>()});
    let resp = gw[1]
        .signed(k, Method::POST, "/v1/orders/batch", Some(&five.to_string()))
        .await;
    let b = seen(resp, 1, since).await;
    assert_eq!(b.status, 429, "{b:?}");
    // One order: that gateway's shield is empty, the bucket is not.
    let resp = gw[1].post_order(k, order_body(SKU, 1, "B-one")).await;
    let one = seen(resp, 1, since).await;
    assert_eq!(one.status, 201, "the bucket's answer, not the shield's: {one:?}");
    assert!(one.remaining <= refills(one.at), "{one:?}");
    if one.at < Duration::from_millis(900) {
        // Neither has had a token back: the shield refused, and the bucket overruled it.
        let admitted = metric_with(&gw[1], "cardgate_rate_limit_shield_total", "bucket=\"admitted\"").await;
        assert_eq!(admitted, 1.0);
        let resp = gw[1].post_order(k, order_body(SKU, 1, "B-two")).await;
        let two = seen(resp, 1, since).await;
        if two.at < Duration::from_millis(900) {
            assert_eq!((two.status, two.remaining), (429, 0), "{two:?}");
            let refused = metric_with(&gw[1], "cardgate_rate_limit_shield_total", "bucket=\"refused\"").await;
            assert_eq!(refused, 1.0);
        }
    }
}

/// The sum of the series of `name` whose labels contain `label`.
async fn metric_with(app: &TestApp, name: &str, label: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One tier, "t", whose reads come `per_second` a second, `burst` at once.
fn reads_tier(per_second: u32, burst: u32) -> BTreeMap<String, Tier> {
    BTreeMap::from([(
        "t".to_string(),
        Tier {
            priority: 1,
            orders_per_second: 1,
            orders_burst: 1,
            reads_per_second: per_second,
            reads_burst: burst,
            max_quantity: 1,
            max_batch: 1,
            upgrade_spend: None,
        },
    )])
}

/// The bucket itself, straight against Redis: exact GCRA on Redis's clock, all or none,
/// and gone once it is full again.
#[tokio::test]
async fn the_shared_bucket_is_gcra_on_redis_time_and_is_forgotten_once_full() {
    let client = redis::Client::open(env_url("CARDGATE_REDIS_URL").as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = Keys::new(&format!("t{}", random_suffix()));
    // Two a second (a token every 500 ms), three at once.
    let tiers = reads_tier(2, 3);
    let bucket = keys.rate(1, Class::Reads);
    let fresh = || keys.nonce(1, "ak_test", &nonce());
    async fn take(
        conn: &mut redis::aio::MultiplexedConnection,
        keys: &Keys,
        tiers: &BTreeMap<String, Tier>,
        n: u32,
        nonce_key: &str,
    ) -> Spent {
        let charge = Charge::new(tiers, "t", Class::Reads, 1, n);
        global::admit(conn, &global::Admit::new(keys, nonce_key, charge.as_ref()))
            .await
            .unwrap()
    }
    async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
        redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
    }

    let mut left = Vec::new();
    for _ in 0..3 {
        let s = take(&mut conn, &keys, &tiers, 1, &fresh()).await;
        assert!(s.nonce_fresh);
        match s.bucket {
            Some(Outcome::Allowed(h)) => left.push((h.limit, h.remaining)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(left, [(3, 2), (3, 1), (3, 0)]);
    // The key lives until the bucket is full again: three tokens, 1.5 s.
    let ttl = pttl(&mut conn, &bucket).await;
    assert!((1..=1500).contains(&ttl), "{ttl}");
    // Empty: refused, nothing taken, a token in at most half a second (a whole second said).
    match take(&mut conn, &keys, &tiers, 1, &fresh()).await.bucket {
        Some(Outcome::Refused {
            headers,
            retry_after_secs,
        }) => assert_eq!((headers.remaining, retry_after_secs, headers.reset_secs), (0, 1, 2)),
        other => panic!("{other:?}"),
    }
    // A replay is told so, and counted like any request.
    let replayed = fresh();
    assert!(take(&mut conn, &keys, &tiers, 1, &replayed).await.nonce_fresh);
    let again = take(&mut conn, &keys, &tiers, 1, &replayed).await;
    assert!(!again.nonce_fresh && again.bucket.is_some());
    // More than the bucket ever holds: refused whatever the wait, a full bucket's time said.
    match take(&mut conn, &keys, &tiers, 4, &fresh()).await.bucket {
        Some(Outcome::Refused { retry_after_secs, .. }) => assert_eq!(retry_after_secs, 2),
        other => panic!("{other:?}"),
    }

    tokio::time::sleep(Duration::from_millis(600)).await;
    // At least one token back; two asked for at once get both or neither.
    let s = take(&mut conn, &keys, &tiers, 1, &fresh()).await;
    assert!(matches!(s.bucket, Some(Outcome::Allowed(_))), "{s:?}");
    let ttl = pttl(&mut conn, &bucket).await;
    tokio::time::sleep(Duration::from_millis(ttl.max(0) as u64 + 100)).await;
    let exists: i64 = redis::cmd("EXISTS").arg(&bucket).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 0, "a full bucket costs no memory");
    match take(&mut conn, &keys, &tiers, 3, &fresh()).await.bucket {
        Some(Outcome::Allowed(h)) => assert_eq!(h.remaining, 0),
        other => panic!("a full bucket again: {other:?}"),
    }
}

/// Many requests' nonces and tokens in one script call, as a coalesced pipeline of reads
/// sends them: each request is decided in its turn, as if it had run alone, against the
/// bucket as the ones before it left it, whoever's bucket it is.
#[tokio::test]
async fn one_admit_call_decides_each_request_in_turn() {
    let client = redis::Client::open(env_url("CARDGATE_REDIS_URL").as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = Keys::with_cells(&format!("t{}", random_suffix()), 4);
    let tiers = reads_tier(1, 3);
    let admit = |reseller: i64, n: u32, nonce: &str| {
        let charge = Charge::new(&tiers, "t", Class::Reads, reseller, n);
        global::Admit::new(&keys, &keys.nonce(reseller, "ak", nonce), charge.as_ref())
    };
    let twice = nonce();
    let batch = [
        admit(1, 1, &nonce()),
        admit(2, 2, &nonce()),
        admit(1, 1, &twice),
        // The same nonce again in the same call: a replay, and charged like any request.
        admit(1, 1, &twice),
        // More than is left: refused, nothing taken, so a smaller one after it fits.
        admit(2, 3, &nonce()),
        admit(2, 1, &nonce()),
        global::Admit::new(&keys, &keys.nonce(3, "ak", &nonce()), None),
        admit(1, 1, &nonce()),
    ];
    let refs: Vec<&global::Admit> = batch.iter().collect();
    global::load(&mut conn).await.unwrap();
    let reply: redis::Value = global::admit_cmd(&refs).query_async(&mut conn).await.unwrap();
    let seen: Vec<(bool, Option<(bool, u32)>)> = global::read_admit(reply, batch.len())
        .unwrap()
        .into_iter()
        .map(|s| {
            let bucket = s
                .bucket
                .map(|o| (matches!(o, Outcome::Allowed(_)), o.headers().remaining));
            (s.nonce_fresh, bucket)
        })
        .collect();
    assert_eq!(
        seen,
        [
            (true, Some((true, 2))),
            (true, Some((true, 1))),
            (true, Some((true, 1))),
            (false, Some((true, 0))),
            (true, Some((false, 1))),
            (true, Some((true, 0))),
            (true, None),
            (true, Some((false, 0))),
        ]
    );
    // Every nonce is spent, the refused requests' too; each bucket is stored once, as the
    // last request left it: empty, so a request on its own is refused.
    for a in &batch {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(a.nonce_key())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 1, "{}", a.nonce_key());
    }
    for reseller in [1, 2] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(keys.rate(reseller, Class::Reads))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!((2000..=3000).contains(&ttl), "reseller {reseller}: {ttl}");
        let alone = global::admit(&mut conn, &admit(reseller, 1, &nonce())).await.unwrap();
        assert!(matches!(alone.bucket, Some(Outcome::Refused { .. })), "{alone:?}");
    }
}

/// A Redis that lost its scripts (restarted, or flushed) has them loaded again by the
/// first command that needs them: a read's pipeline, an order's reservation, a batch's
/// spend on its own round trip.
#[tokio::test]
async fn requests_load_the_bucket_scripts_again_when_redis_has_lost_them() {
    let redis = PrivateRedis::start().await;
    let url = redis.url();
    let (app, t, _) = shop_with(5, |env| {
        env.insert("CARDGATE_REDIS_URL".into(), url.clone());
        for (name, value) in [
            ("ORDERS_PER_SECOND", RATE),
            ("ORDERS_BURST", BURST as f64),
            ("READS_PER_SECOND", RATE),
            ("READS_BURST", BURST as f64),
        ] {
            env.insert(format!("CARDGATE_TIERS__STANDARD__{name}"), value.to_string());
        }
    })
    .await;
    let k = buyer(&app, &t, "standard", 100_000).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    async fn flush(conn: &mut redis::aio::MultiplexedConnection) {
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(conn).await.unwrap();
    }
    let since = Instant::now();
    let mut answers = Vec::new();
    for path in ["/v1/balance", "/v1/products"] {
        flush(&mut conn).await;
        let resp = app.signed(&k, Method::GET, path, None).await;
        answers.push(seen(resp, 0, since).await);
    }
    flush(&mut conn).await;
    let resp = app.post_order(&k, order_body(SKU, 1, "after-flush")).await;
    answers.push(seen(resp, 0, since).await);
    flush(&mut conn).await;
    let batch = json!({"orders": [order_body(SKU, 1, "batch-after-flush")]});
    let resp = app
        .signed(&k, Method::POST, "/v1/orders/batch", Some(&batch.to_string()))
        .await;
    answers.push(seen(resp, 0, since).await);
    let got: Vec<(u16, u64)> = answers.iter().map(|s| (s.status, s.remaining)).collect();
    if since.elapsed() < Duration::from_secs(1) {
        // Reads and orders apart, each bucket counting down from the burst.
        assert_eq!(got, [(200, 4), (200, 3), (201, 4), (200, 3)], "{answers:#?}");
    } else {
        assert!(got.iter().all(|(status, _)| *status < 300), "{answers:#?}");
    }
}
