use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

async fn code_of(resp: reqwest::Response) -> (u16, String) {
    let (s, c, _) = error_of(resp).await;
    (s, c)
}

fn code(s: u16, c: &str) -> (u16, String) {
    (s, c.to_string())
}

#[tokio::test]
async fn reads_show_the_callers_price_live_stock_and_balance() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    app.create_product(&t, "steam-cn-100").await;
    app.import_codes(&t, "steam-cn-100", "A1\nA2\nA3\n").await;
    let gold = app.reseller_with_key(&t, "gold", json!({})).await;
    let standard = app.reseller_with_key(&t, "standard", json!({})).await;
    app.admin_ok(
        &t,
        Method::POST,
        &format!("/admin/v1/resellers/{}/balance", gold.reseller_id),
        Some(json!({"amount": 123450, "reference": "r1"})),
        200,
    )
    .await;

    let resp = app.signed(&gold, Method::GET, "/v1/products", None).await;
    assert_eq!(resp.status(), 200);
    for h in [
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "x-request-id",
    ] {
        assert!(resp.headers().contains_key(h), "{h}");
    }
    let body: serde_json::Value = resp.json().await.unwrap();
    let p = &body["products"][0];
    assert_eq!(
        p,
        &json!({"sku": "steam-cn-100", "name": "Product steam-cn-100", "face_value": 10000, "unit_price": 9650,
                "currency": "CNY", "available": 3, "max_quantity": 100, "status": "on_sale"})
    );
    let one: serde_json::Value = app
        .signed(&standard, Method::GET, "/v1/products/steam-cn-100", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (one["unit_price"].as_i64(), one["max_quantity"].as_i64()),
        (Some(9800), Some(10)),
        "base price, tier cap"
    );
    let (s, c) = code_of(app.signed(&gold, Method::GET, "/v1/products/nope", None).await).await;
    assert_eq!((s, c.as_str()), (404, "not_found"));

    let bal: serde_json::Value = app
        .signed(&gold, Method::GET, "/v1/balance", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        bal,
        json!({"balance": 123450, "currency": "CNY", "tier": "gold", "credit_limit": 0, "available": 123450,
               "spend": {"window_days": 30, "amount": 0}, "next_tier": null})
    );

    // A catalogue change shows at once.
    app.admin_ok(
        &t,
        Method::PATCH,
        "/admin/v1/products/steam-cn-100",
        Some(json!({"status": "off_sale", "tier_prices": {"gold": 9000}})),
        200,
    )
    .await;
    let one: serde_json::Value = app
        .signed(&gold, Method::GET, "/v1/products/steam-cn-100", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (one["unit_price"].as_i64(), one["status"].as_str()),
        (Some(9000), Some("off_sale"))
    );
}

#[tokio::test]
async fn rejections_come_in_the_contracts_order() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let k = app
        .reseller_with_key(&t, "gold", json!({"ip_allowlist": ["10.9.9.9/32"]}))
        .await;
    let now = now_secs();
    let wrong = ResellerKey {
        reseller_id: k.reseller_id.clone(),
        key_id: k.key_id.clone(),
        secret: "sk_wrong".into(),
        webhook_secret: k.webhook_secret.clone(),
    };
    let unknown = ResellerKey {
        reseller_id: k.reseller_id.clone(),
        key_id: "ak_unknown".into(),
        secret: k.secret.clone(),
        webhook_secret: k.webhook_secret.clone(),
    };

    // 1. missing or malformed header
    let (s, c) = code_of(app.get("/v1/balance").await).await;
    assert_eq!((s, c.as_str()), (401, "missing_authorization"));
    let resp = app
        .client
        .get(app.url("/v1/balance"))
        .header("authorization", "Bearer abc")
        .send()
        .await
        .unwrap();
    assert_eq!(code_of(resp).await, code(401, "missing_authorization"));
    // 2. stale and badly signed: the timestamp is reported first
    let resp = app
        .signed_at(&wrong, Method::GET, "/v1/balance", None, now - 1000, &nonce(), &[])
        .await;
    assert_eq!(code_of(resp).await, code(401, "timestamp_out_of_window"));
    // 3. unknown key, wrong signature: one code, one body shape
    let a = app.signed(&unknown, Method::GET, "/v1/balance", None).await;
    let b = app.signed(&wrong, Method::GET, "/v1/balance", None).await;
    let (sa, ca, ba) = error_of(a).await;
    let (sb, cb, bb) = error_of(b).await;
    assert_eq!((sa, ca.as_str()), (401, "invalid_signature"));
    assert_eq!(
        (sa, &ca, ba["error"]["message"].clone()),
        (sb, &cb, bb["error"]["message"].clone())
    );
    // A query changed after signing fails too.
    let n = nonce();
    let message = cardgate::auth::signing::Message {
        timestamp: now,
        nonce: &n,
        method: "GET",
        path: "/v1/balance",
        query: Some("a=1"),
        body: b"",
    };
    let auth = cardgate::auth::signing::authorization(&k.key_id, k.secret.as_bytes(), &message);
    let resp = app
        .client
        .get(app.url("/v1/balance?a=2"))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    assert_eq!(code_of(resp).await, code(401, "invalid_signature"));
    // 4. then the nonce: replaying a request is refused (here before the IP check fails)
    let n = nonce();
    let first = app.signed_at(&k, Method::GET, "/v1/balance", None, now, &n, &[]).await;
    assert_eq!(code_of(first).await, code(403, "ip_not_allowed"));
    let replay = app.signed_at(&k, Method::GET, "/v1/balance", None, now, &n, &[]).await;
    assert_eq!(code_of(replay).await, code(401, "nonce_reused"));
    // 5. IP before 6. suspension
    app.patch_reseller(&t, &k.reseller_id, json!({"status": "suspended"}))
        .await;
    assert_eq!(
        code_of(app.signed(&k, Method::GET, "/v1/balance", None).await).await,
        code(403, "ip_not_allowed")
    );
    app.patch_reseller(&t, &k.reseller_id, json!({"ip_allowlist": ["127.0.0.0/8"]}))
        .await;
    assert_eq!(
        code_of(app.signed(&k, Method::GET, "/v1/balance", None).await).await,
        code(403, "account_suspended")
    );
    app.patch_reseller(&t, &k.reseller_id, json!({"status": "active"}))
        .await;
    assert_eq!(app.signed(&k, Method::GET, "/v1/balance", None).await.status(), 200);
    // A revoked key is indistinguishable from an unknown one.
    app.admin_ok(&t, Method::DELETE, &format!("/admin/v1/keys/{}", k.key_id), None, 200)
        .await;
    assert_eq!(
        code_of(app.signed(&k, Method::GET, "/v1/balance", None).await).await,
        code(401, "invalid_signature")
    );
}

/// An allow-list entry that does not parse (written around the API, which refuses it)
/// names no address: it must never be dropped, which would leave the empty list that
/// allows every address.
#[tokio::test]
async fn an_allowlist_entry_that_does_not_parse_allows_nothing() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let k = app.reseller_with_key(&t, "gold", json!({})).await;
    assert_eq!(app.signed(&k, Method::GET, "/v1/balance", None).await.status(), 200);
    let db = app.db().await;
    let set = |list: &'static [&'static str]| {
        let db = &db;
        let rid = k.reseller_id.clone();
        async move {
            let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            db.execute(
                "UPDATE resellers SET ip_allowlist = $2 WHERE reseller_id = $1",
                &[&rid, &list],
            )
            .await
            .unwrap();
        }
    };
    // Any admin change reloads the caches: here a second key.
    let reload = || async {
        let path = format!("/admin/v1/resellers/{}/keys", k.reseller_id);
        app.admin_ok(&t, Method::POST, &path, None, 201).await;
    };
    set(&["not-an-address"]).await;
    reload().await;
    assert_eq!(
        code_of(app.signed(&k, Method::GET, "/v1/balance", None).await).await,
        code(403, "ip_not_allowed")
    );
    // Beside a valid entry, the valid one still allows what it names.
    set(&["127.0.0.1/32", "10.0.0.300"]).await;
    reload().await;
    assert_eq!(app.signed(&k, Method::GET, "/v1/balance", None).await.status(), 200);
    set(&["10.0.0.300", "198.51.100.0/24"]).await;
    reload().await;
    assert_eq!(
        code_of(app.signed(&k, Method::GET, "/v1/balance", None).await).await,
        code(403, "ip_not_allowed")
    );
}

#[tokio::test]
async fn the_timestamp_window_is_300_seconds_either_way() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let k = app.reseller_with_key(&t, "gold", json!({})).await;
    let now = now_secs();
    // A few seconds of margin keep the edges away from the test's own clock ticks.
    for (offset, ok) in [(-295, true), (295, true), (-305, false), (305, false)] {
        let resp = app
            .signed_at(&k, Method::GET, "/v1/balance", None, now + offset, &nonce(), &[])
            .await;
        if ok {
            assert_eq!(resp.status(), 200, "offset {offset}");
        } else {
            assert_eq!(
                code_of(resp).await,
                code(401, "timestamp_out_of_window"),
                "offset {offset}"
            );
        }
    }
}

#[tokio::test]
async fn x_forwarded_for_counts_only_from_a_trusted_proxy() {
    let plain = spawn_app().await;
    let t = plain.root_token().await;
    let k = plain
        .reseller_with_key(&t, "gold", json!({"ip_allowlist": ["203.0.113.0/24", "2001:db8::/32"]}))
        .await;
    let xff = [("x-forwarded-for", "203.0.113.7")];
    let resp = plain
        .signed_at(&k, Method::GET, "/v1/balance", None, now_secs(), &nonce(), &xff)
        .await;
    assert_eq!(
        code_of(resp).await,
        code(403, "ip_not_allowed"),
        "an untrusted peer cannot claim an address"
    );

    let proxied = start({
        let mut env = plain.env.clone();
        env.insert("CARDGATE_HTTP__TRUSTED_PROXIES".into(), "127.0.0.1/32".into());
        env
    })
    .await;
    let resp = proxied
        .signed_at(&k, Method::GET, "/v1/balance", None, now_secs(), &nonce(), &xff)
        .await;
    assert_eq!(resp.status(), 200);
    let v6 = [("x-forwarded-for", "2001:db8::42, 127.0.0.1")];
    let resp = proxied
        .signed_at(&k, Method::GET, "/v1/balance", None, now_secs(), &nonce(), &v6)
        .await;
    assert_eq!(resp.status(), 200, "IPv6 client behind two trusted hops");
    let outside = [("x-forwarded-for", "198.51.100.1")];
    let resp = proxied
        .signed_at(&k, Method::GET, "/v1/balance", None, now_secs(), &nonce(), &outside)
        .await;
    assert_eq!(code_of(resp).await, code(403, "ip_not_allowed"));
}

#[tokio::test]
async fn revocation_suspension_and_tier_changes_reach_a_second_instance_within_a_second() {
    let a = spawn_app().await;
    let b = start(a.env.clone()).await;
    let t = a.root_token().await;
    let k = a.reseller_with_key(&t, "gold", json!({})).await;
    let k2 = a.reseller_with_key(&t, "gold", json!({})).await;
    // The key made on A works on B (B learnt of it through the announcement).
    assert!(
        eventually(Duration::from_secs(1), || async {
            b.signed(&k, Method::GET, "/v1/balance", None).await.status() == 200
        })
        .await
    );

    a.patch_reseller(&t, &k2.reseller_id, json!({"tier": "diamond"})).await;
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || async {
            let r: serde_json::Value = b
                .signed(&k2, Method::GET, "/v1/balance", None)
                .await
                .json()
                .await
                .unwrap();
            r["tier"] == "diamond"
        })
        .await,
        "tier change not seen by B within 1 s"
    );

    a.patch_reseller(&t, &k2.reseller_id, json!({"status": "suspended"}))
        .await;
    assert!(
        eventually(Duration::from_secs(1), || async {
            b.signed(&k2, Method::GET, "/v1/balance", None).await.status() == 403
        })
        .await,
        "suspension not seen by B within 1 s"
    );

    a.admin_ok(&t, Method::DELETE, &format!("/admin/v1/keys/{}", k.key_id), None, 200)
        .await;
    let revoked_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || async {
            b.signed(&k, Method::GET, "/v1/balance", None).await.status() == 401
        })
        .await,
        "revocation not seen by B within 1 s"
    );
    assert!(revoked_at.elapsed() < Duration::from_secs(1) && started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_burst_is_admitted_exactly_up_to_the_tiers_burst_then_refused_with_headers() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_TIERS__SILVER__READS_BURST".into(), "5".into());
        env.insert("CARDGATE_TIERS__SILVER__READS_PER_SECOND".into(), "1".into());
    })
    .await;
    let t = app.root_token().await;
    let k = app.reseller_with_key(&t, "silver", json!({})).await;
    for left in (0..5).rev() {
        let resp = app.signed(&k, Method::GET, "/v1/balance", None).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["ratelimit-limit"], "5");
        assert_eq!(resp.headers()["ratelimit-remaining"], left.to_string().as_str());
    }
    let resp = app.signed(&k, Method::GET, "/v1/balance", None).await;
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(resp.headers()["ratelimit-remaining"], "0");
    assert!(
        resp.headers()["ratelimit-reset"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(code_of(resp).await, code(429, "rate_limited"));
    // Another reseller of the same tier has a bucket of its own.
    let other = app.reseller_with_key(&t, "silver", json!({})).await;
    assert_eq!(app.signed(&other, Method::GET, "/v1/balance", None).await.status(), 200);
}

#[tokio::test]
async fn a_replayed_read_is_refused_even_when_the_first_answer_never_touched_redis() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let k = app.reseller_with_key(&t, "gold", json!({})).await;
    let n = nonce();
    let now = now_secs();
    // A 404 is answered from the in-memory catalogue alone.
    let first = app
        .signed_at(&k, Method::GET, "/v1/products/nope", None, now, &n, &[])
        .await;
    assert_eq!(code_of(first).await, code(404, "not_found"));
    let replay = app
        .signed_at(&k, Method::GET, "/v1/products/nope", None, now, &n, &[])
        .await;
    assert_eq!(code_of(replay).await, code(401, "nonce_reused"));
    // And one that did touch Redis.
    let n = nonce();
    assert_eq!(
        app.signed_at(&k, Method::GET, "/v1/products", None, now, &n, &[])
            .await
            .status(),
        200
    );
    let replay = app.signed_at(&k, Method::GET, "/v1/products", None, now, &n, &[]).await;
    assert_eq!(code_of(replay).await, code(401, "nonce_reused"));
}

/// Concurrent reads share Redis pipelines (`store::coalesce`): each must still get its
/// own balance, the live stock, and its own nonce spent exactly once.
#[tokio::test]
async fn concurrent_reads_share_pipelines_yet_each_gets_its_own_answer() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    app.create_product(&t, "coalesce-a").await;
    app.create_product(&t, "coalesce-b").await;
    app.import_codes(&t, "coalesce-a", "A1\nA2\nA3\n").await;
    app.import_codes(&t, "coalesce-b", "B1\nB2\nB3\nB4\nB5\n").await;
    let mut keys = Vec::new();
    for i in 0..8i64 {
        let k = app.reseller_with_key(&t, "gold", json!({})).await;
        app.fund(&t, &k.reseller_id, 1_000 * (i + 1) + i).await;
        keys.push(k);
    }
    let now = now_secs();
    let mut calls = Vec::new();
    for i in 0..320usize {
        let (k, n) = (i % 8, nonce());
        let path = if i % 2 == 0 { "/v1/balance" } else { "/v1/products" };
        // Every fifth request is sent twice at once with the same nonce.
        let copies = if i % 5 == 0 { 2 } else { 1 };
        for _ in 0..copies {
            let req = app.signed_request(&keys[k], Method::GET, path, None, now, &n, &[]);
            calls.push(async move { (i, k, req.send().await.unwrap()) });
        }
    }
    let answers = futures_util::future::join_all(calls).await;
    let mut fresh = std::collections::HashMap::<usize, u32>::new();
    for (i, k, resp) in answers {
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        if status == 401 {
            assert_eq!(body["error"]["code"], "nonce_reused", "{body}");
            continue;
        }
        assert_eq!(status, 200, "{body}");
        *fresh.entry(i).or_default() += 1;
        if i % 2 == 0 {
            assert_eq!(body["balance"], 1_000 * (k as i64 + 1) + k as i64, "request {i}");
        } else {
            let available: std::collections::HashMap<_, _> = body["products"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p["sku"].as_str().unwrap().to_string(), p["available"].as_i64().unwrap()))
                .collect();
            assert_eq!(available["coalesce-a"], 3, "request {i}");
            assert_eq!(available["coalesce-b"], 5, "request {i}");
        }
    }
    // Every request answered once, the duplicates refused.
    assert_eq!(fresh.len(), 320);
    assert!(fresh.values().all(|&n| n == 1), "a nonce was accepted twice");
    // And they did share: some pipeline carried more than one request.
    let (sum, count) = (
        metric(&app, "cardgate_redis_coalesced_requests_sum").await,
        metric(&app, "cardgate_redis_coalesced_requests_count").await,
    );
    assert!(sum > count, "{sum} requests in {count} pipelines: nothing was shared");
}

/// A command Redis refuses fails the request that sent it, not the others sharing its
/// pipeline, and shared reads are asked once for all.
#[tokio::test]
async fn a_refused_command_fails_only_its_own_request() {
    let client = redis::Client::open(env_url("CARDGATE_REDIS_URL").as_str()).unwrap();
    let mut conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let p = format!("coalesce-test-{}", random_suffix());
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(format!("{p}:string"))
        .arg("x")
        .cmd("RPUSH")
        .arg(format!("{p}:list"))
        .arg(&["a", "b"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let coalescer = cardgate::store::coalesce::Coalescer::start(cardgate::store::redis::Redis::Single(conn));
    // One shared read (as a product's pool counts), the same Arc for every request.
    let mut counted = redis::pipe();
    counted.cmd("LLEN").arg(format!("{p}:list"));
    let counted = std::sync::Arc::new(counted);
    let mut calls = Vec::new();
    for i in 0..60 {
        let mut pipe = redis::pipe();
        if i % 3 == 0 {
            // WRONGTYPE: a list command on a string.
            pipe.cmd("LLEN").arg(format!("{p}:string"));
        } else {
            pipe.cmd("INCR").arg(format!("{p}:counter"));
        }
        let (c, counted) = (coalescer.clone(), counted.clone());
        calls.push(async move { (i, c.query(std::sync::Arc::new(pipe), vec![counted], None).await) });
    }
    let mut counts = Vec::new();
    for (i, r) in futures_util::future::join_all(calls).await {
        if i % 3 == 0 {
            assert!(r.is_err(), "request {i}: WRONGTYPE not reported");
        } else {
            let ((own, shared), spent) = r.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(spent, None);
            assert_eq!((own.len(), shared.len(), shared[0].len()), (1, 1, 1));
            assert_eq!(redis::from_redis_value::<i64>(shared[0][0].clone()).unwrap(), 2);
            counts.push(redis::from_redis_value::<i64>(own[0].clone()).unwrap());
        }
    }
    // INCR is not a shared read: each request's own reply.
    counts.sort_unstable();
    assert_eq!(counts, (1..=40).collect::<Vec<_>>());
}

/// Every answer from the point the caller is known carries its bucket's headers; a 401
/// carries a challenge instead, and is given before the body is even read.
#[tokio::test]
async fn refusals_after_authentication_carry_rate_limit_headers_and_401s_a_challenge() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let k = app
        .reseller_with_key(&t, "gold", json!({"ip_allowlist": ["10.9.9.9/32"]}))
        .await;
    let has_limits = |r: &reqwest::Response| {
        ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"]
            .iter()
            .all(|h| r.headers().contains_key(*h))
    };

    // Unsigned: 401 with the scheme to use, whatever the body; no bucket is named.
    let resp = app
        .client
        .post(app.url("/v1/orders"))
        .header("content-type", "text/plain")
        .body(vec![b'x'; 200_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "CG1-HMAC-SHA256");
    assert!(!has_limits(&resp));
    assert_eq!(code_of(resp).await, code(401, "missing_authorization"));

    // Refused by the allow-list, then replayed: both counted, both with headers.
    let n = nonce();
    let now = now_secs();
    let first = app.signed_at(&k, Method::GET, "/v1/balance", None, now, &n, &[]).await;
    assert!(has_limits(&first));
    assert_eq!(
        first.headers()["ratelimit-remaining"],
        "999",
        "gold: a burst of 1000 reads"
    );
    assert_eq!(code_of(first).await, code(403, "ip_not_allowed"));
    let replay = app.signed_at(&k, Method::GET, "/v1/balance", None, now, &n, &[]).await;
    assert!(has_limits(&replay));
    assert_eq!(code_of(replay).await, code(401, "nonce_reused"));

    app.patch_reseller(&t, &k.reseller_id, json!({"ip_allowlist": [], "status": "suspended"}))
        .await;
    let resp = app.signed(&k, Method::GET, "/v1/balance", None).await;
    assert!(has_limits(&resp));
    assert_eq!(code_of(resp).await, code(403, "account_suspended"));
    app.patch_reseller(&t, &k.reseller_id, json!({"status": "active"}))
        .await;

    // A replay refused by the nonce spend at the end of a handler that never touched
    // Redis (an unknown product is answered from memory) has them too.
    let n = nonce();
    let a = app
        .signed_at(&k, Method::GET, "/v1/products/no-such", None, now_secs(), &n, &[])
        .await;
    assert!(has_limits(&a));
    assert_eq!(code_of(a).await, code(404, "not_found"));
    let b = app
        .signed_at(&k, Method::GET, "/v1/products/no-such", None, now_secs(), &n, &[])
        .await;
    assert!(has_limits(&b));
    assert_eq!(code_of(b).await, code(401, "nonce_reused"));

    // The scheme is case-insensitive; a timestamp is written without leading zeros.
    let n = nonce();
    let ts = now_secs();
    let message = cardgate::auth::signing::Message {
        timestamp: ts,
        nonce: &n,
        method: "GET",
        path: "/v1/balance",
        query: None,
        body: b"",
    };
    let auth = cardgate::auth::signing::authorization(&k.key_id, k.secret.as_bytes(), &message);
    let send = |auth: String| {
        app.client
            .get(app.url("/v1/balance"))
            .header("authorization", auth)
            .send()
    };
    let padded = auth.replace(&format!("timestamp=\"{ts}\""), &format!("timestamp=\"0{ts}\""));
    assert_eq!(
        code_of(send(padded).await.unwrap()).await,
        code(401, "missing_authorization")
    );
    let lower = auth.replacen("CG1-HMAC-SHA256", "cg1-hmac-sha256", 1);
    assert_eq!(send(lower).await.unwrap().status(), 200);

    // The batch route answers only POST.
    let resp = app.signed(&k, Method::GET, "/v1/orders/batch", None).await;
    assert_eq!(resp.headers()["allow"], "POST");
    assert_eq!(code_of(resp).await, code(405, "method_not_allowed"));

    // The admin API's 401 names its scheme; the scheme's case does not matter.
    let resp = app.get("/admin/v1/orders").await;
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert_eq!(code_of(resp).await, code(401, "unauthenticated"));
    let resp = app
        .client
        .get(app.url("/admin/v1/orders"))
        .header("authorization", format!("BEARER {t}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
