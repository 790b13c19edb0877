//! API keys' scopes, expiry, rotation and list (docs/api.md §7), with time moved by a
//! manual clock where it matters.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::orders::{buyer, shop, SKU};

const MS_PER_SEC: i64 = 1_000;
const SCOPES: [&str; 4] = ["catalogue:read", "orders:read", "orders:write", "balance:read"];

/// A key for the reseller made with `body` (its settings).
async fn key_with(app: &TestApp, t: &str, reseller_id: &str, body: Value) -> ResellerKey {
    let path = format!("/admin/v1/resellers/{reseller_id}/keys");
    let k = app.admin_ok(t, Method::POST, &path, Some(body), 201).await;
    key_of(reseller_id, &k)
}

fn key_of(reseller_id: &str, answer: &Value) -> ResellerKey {
    ResellerKey {
        reseller_id: reseller_id.to_string(),
        key_id: answer["key_id"].as_str().unwrap().to_string(),
        secret: answer["secret"].as_str().unwrap().to_string(),
        webhook_secret: String::new(),
    }
}

/// A time as the API writes it.
fn at(unix_secs: i64) -> String {
    cardgate::http::query::rfc3339(time::OffsetDateTime::from_unix_timestamp(unix_secs).unwrap())
}

async fn rotate(app: &TestApp, t: &str, key_id: &str, body: Value) -> reqwest::Response {
    app.admin(t, Method::POST, &format!("/admin/v1/keys/{key_id}/rotate"), Some(body))
        .await
}

/// A request signed at `clock`'s time (the gateway's, when it runs on that clock).
async fn signed_on(
    app: &TestApp,
    clock: &ManualClock,
    key: &ResellerKey,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> reqwest::Response {
    let ts = clock.now_unix_ms().div_euclid(MS_PER_SEC);
    app.signed_at(key, method, path, body, ts, &nonce(), &[]).await
}

/// What a refusal tells the caller, its request id aside: status, headers that could
/// differ, and the body.
async fn refusal(resp: reqwest::Response) -> (u16, Option<String>, bool, Value) {
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let rate_limited = resp.headers().contains_key("ratelimit-remaining");
    let (status, _, mut body) = error_of(resp).await;
    body["error"]["request_id"] = Value::Null;
    (status, www, rate_limited, body)
}

/// Each single-scope key against each `/v1` route: allowed, or `403 insufficient_scope`
/// after the nonce is spent, so the same signed request again is a replay. Refused
/// orders take nothing.
#[tokio::test]
async fn each_scope_opens_its_routes_only_and_a_refusal_spends_the_nonce() {
    let (app, t, _) = shop(20).await;
    let full = buyer(&app, &t, "gold", 1_000_000).await;
    let (status, seed, _) = app.order(&full, order_body(SKU, 1, "SCOPE-SEED")).await;
    assert_eq!(status, 201, "{seed}");
    let order_id = seed["order_id"].as_str().unwrap().to_string();

    let routes = |mon: &str| {
        let order = order_body(SKU, 1, &format!("{mon}-one"));
        let batch = json!({"orders": [order_body(SKU, 1, &format!("{mon}-batch"))]});
        [
            (Method::GET, "/v1/products".to_string(), None, "catalogue:read"),
            (Method::GET, format!("/v1/products/{SKU}"), None, "catalogue:read"),
            (Method::GET, format!("/v1/orders/{order_id}"), None, "orders:read"),
            (
                Method::GET,
                "/v1/orders?merchant_order_no=SCOPE-SEED".to_string(),
                None,
                "orders:read",
            ),
            (
                Method::POST,
                "/v1/orders".to_string(),
                Some(order.to_string()),
                "orders:write",
            ),
            (
                Method::POST,
                "/v1/orders/batch".to_string(),
                Some(batch.to_string()),
                "orders:write",
            ),
            (Method::GET, "/v1/balance".to_string(), None, "balance:read"),
        ]
    };
    for (n, scope) in SCOPES.into_iter().enumerate() {
        let k = key_with(&app, &t, &full.reseller_id, json!({"scopes": [scope]})).await;
        for (method, path, body, needs) in routes(&format!("SCOPE-{n}")) {
            let what = format!("a {scope} key: {method} {path}");
            let (ts, once) = (now_secs(), nonce());
            let first = app
                .signed_at(&k, method.clone(), &path, body.as_deref(), ts, &once, &[])
                .await;
            if scope == needs {
                let status = first.status();
                assert!(status.is_success(), "{what}: {}", first.text().await.unwrap());
            } else {
                assert!(first.headers().contains_key("ratelimit-remaining"), "{what}");
                let (status, code, body) = error_of(first).await;
                assert_eq!((status, code.as_str()), (403, "insufficient_scope"), "{what}: {body}");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains(needs), "{what}: names the scope it needs: {message}");
            }
            let again = app.signed_at(&k, method, &path, body.as_deref(), ts, &once, &[]).await;
            let (status, code, _) = error_of(again).await;
            assert_eq!((status, code.as_str()), (401, "nonce_reused"), "{what}, sent again");
        }
    }
    // The seed, and the orders:write key's order and batch: nothing refused was placed.
    let placed: Vec<String> = app
        .db()
        .await
        .query("SELECT merchant_order_no FROM orders ORDER BY merchant_order_no", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(placed, ["SCOPE-2-batch", "SCOPE-2-one", "SCOPE-SEED"]);
    app.assert_reconciled(&t).await;
}

/// A key's settings are checked field by field; without a body, or with `{}`, a key has
/// every scope and no expiry.
#[tokio::test]
async fn a_new_keys_body_is_checked_field_by_field() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let r = app.create_reseller(&t, "gold").await;
    let rid = r["reseller_id"].as_str().unwrap();
    let path = format!("/admin/v1/resellers/{rid}/keys");
    for body in [
        None,
        Some(json!({})),
        Some(json!({"scopes": null, "label": null, "expires_at": null})),
    ] {
        let k = app.admin_ok(&t, Method::POST, &path, body, 201).await;
        assert_eq!(k["scopes"], json!(SCOPES));
        assert!(k["expires_at"].is_null() && k["label"].is_null(), "{k}");
    }
    let later = at(now_secs() + 86_400);
    let k = app
        .admin_ok(
            &t,
            Method::POST,
            &path,
            Some(
                json!({"scopes": ["balance:read", "orders:read", "balance:read"], "label": "报表 script",
                        "expires_at": later}),
            ),
            201,
        )
        .await;
    assert_eq!(
        (&k["scopes"], &k["label"], &k["expires_at"]),
        (
            &json!(["orders:read", "balance:read"]),
            &json!("报表 script"),
            &json!(later)
        )
    );
    for (body, field) in [
        (json!({"scopes": []}), "scopes"),
        (json!({"scopes": ["orders:delete"]}), "scopes"),
        (json!({"scopes": "orders:read"}), "scopes"),
        (json!({"scopes": [1]}), "scopes"),
        (json!({"label": " "}), "label"),
        (json!({"label": "x".repeat(201)}), "label"),
        (json!({"label": 7}), "label"),
        (json!({"expires_at": at(now_secs() - 1)}), "expires_at"),
        (json!({"expires_at": "tomorrow"}), "expires_at"),
        (json!({"expires_at": "9999-12-31T23:59:59Z"}), "expires_at"),
        (json!({"expires_at": 1_900_000_000}), "expires_at"),
        (json!({"daily_spend_limit": -5}), "daily_spend_limit"),
        (json!({"daily_spend_limit": "5"}), "daily_spend_limit"),
        (json!(["orders:read"]), "object"),
    ] {
        let (status, code, err) = error_of(app.admin(&t, Method::POST, &path, Some(body.clone())).await).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{body}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
    let made: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(made, 4, "refused bodies made no key");
}

/// Expiry is judged by the gateway's clock at each request: the key works until
/// `expires_at`, and from then on its answer is the one an unknown or a revoked key gets.
#[tokio::test]
async fn an_expired_key_is_refused_on_the_gateways_clock_exactly_as_an_unknown_key() {
    let clock = ManualClock::at_system_now();
    let app = spawn_app_on(clock.clone()).await;
    let t = app.root_token().await;
    let other = app.reseller_with_key(&t, "gold", json!({})).await;
    let secs = || clock.now_unix_ms().div_euclid(MS_PER_SEC);
    let ends = secs() + 300;
    let expiring = key_with(&app, &t, &other.reseller_id, json!({"expires_at": at(ends)})).await;
    let balance = |key| signed_on(&app, &clock, key, Method::GET, "/v1/balance", None);
    assert_eq!(balance(&expiring).await.status(), 200);
    clock.set(ends * MS_PER_SEC - 1);
    assert_eq!(balance(&expiring).await.status(), 200, "a millisecond before its end");

    clock.set(ends * MS_PER_SEC);
    let expired = refusal(balance(&expiring).await).await;
    assert_eq!(
        (expired.0, expired.3["error"]["code"].as_str()),
        (401, Some("invalid_signature"))
    );
    let unknown = key_of(
        &other.reseller_id,
        &json!({"key_id": "ak_NoSuchKeyAtAll", "secret": expiring.secret}),
    );
    assert_eq!(
        expired,
        refusal(balance(&unknown).await).await,
        "expired and unknown alike"
    );
    app.admin_ok(
        &t,
        Method::DELETE,
        &format!("/admin/v1/keys/{}", other.key_id),
        None,
        200,
    )
    .await;
    assert_eq!(
        expired,
        refusal(balance(&other).await).await,
        "expired and revoked alike"
    );

    // A reload (here after a change) leaves it out; it stays refused.
    key_with(&app, &t, &other.reseller_id, json!({})).await;
    assert_eq!(expired, refusal(balance(&expiring).await).await);
}

/// Rotation: the new key has the old one's settings; the old one works beside it until
/// the overlap ends (judged by the clock), then only the new one does. Keys revoked,
/// expired or rotated already are not rotated.
#[tokio::test]
async fn a_rotated_key_works_beside_its_replacement_for_the_overlap_then_only_the_new_one() {
    let clock = ManualClock::at_system_now();
    let app = spawn_app_on(clock.clone()).await;
    let t = app.root_token().await;
    let base = app.reseller_with_key(&t, "gold", json!({})).await;
    let rid = base.reseller_id.clone();
    let secs = || clock.now_unix_ms().div_euclid(MS_PER_SEC);
    let balance = |key| signed_on(&app, &clock, key, Method::GET, "/v1/balance", None);
    let old = key_with(
        &app,
        &t,
        &rid,
        json!({"scopes": ["balance:read", "catalogue:read"], "label": "till 1"}),
    )
    .await;

    let now = secs();
    let resp = rotate(&app, &t, &old.key_id, json!({"overlap_seconds": 600})).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["replaces"], json!(old.key_id));
    assert_eq!(body["replaced_key_expires_at"], json!(at(now + 600)));
    assert_eq!(
        (&body["scopes"], &body["label"], &body["expires_at"]),
        (
            &json!(["catalogue:read", "balance:read"]),
            &json!("till 1"),
            &Value::Null
        )
    );
    let new = key_of(&rid, &body);
    assert_ne!(new.key_id, old.key_id);
    assert_eq!(balance(&old).await.status(), 200);
    assert_eq!(balance(&new).await.status(), 200);
    let order = order_body(SKU, 1, "R-1").to_string();
    let (status, code, _) =
        error_of(signed_on(&app, &clock, &new, Method::POST, "/v1/orders", Some(&order)).await).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "insufficient_scope"),
        "the old key's scopes only"
    );

    let (status, code, err) = error_of(rotate(&app, &t, &old.key_id, json!({"overlap_seconds": 60})).await).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "rotated already: {err}");
    assert!(err["error"]["message"].as_str().unwrap().contains(&new.key_id));

    clock.advance(Duration::from_secs(599));
    assert_eq!(balance(&old).await.status(), 200, "within the overlap");
    clock.set((now + 600) * MS_PER_SEC);
    let (status, code, _) = error_of(balance(&old).await).await;
    assert_eq!(
        (status, code.as_str()),
        (401, "invalid_signature"),
        "the overlap is over"
    );
    assert_eq!(balance(&new).await.status(), 200);
    let (status, code, _) = error_of(rotate(&app, &t, &old.key_id, json!({"overlap_seconds": 60})).await).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "expired");

    // No overlap: the replaced key ends at once.
    let resp = rotate(&app, &t, &new.key_id, json!({"overlap_seconds": 0})).await;
    assert_eq!(resp.status(), 201);
    let newest = key_of(&rid, &resp.json().await.unwrap());
    assert_eq!(error_of(balance(&new).await).await.0, 401);
    assert_eq!(balance(&newest).await.status(), 200);
    app.admin_ok(
        &t,
        Method::DELETE,
        &format!("/admin/v1/keys/{}", newest.key_id),
        None,
        200,
    )
    .await;
    let (status, code, _) = error_of(rotate(&app, &t, &newest.key_id, json!({"overlap_seconds": 60})).await).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "revoked");

    // A key's own earlier end is kept: a rotation never lengthens the old key's life.
    let ends = secs() + 100;
    let short = key_with(&app, &t, &rid, json!({"expires_at": at(ends)})).await;
    let resp = rotate(&app, &t, &short.key_id, json!({"overlap_seconds": 2_592_000})).await;
    assert_eq!(resp.status(), 201, "30 days is the most");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["replaced_key_expires_at"], json!(at(ends)));

    for bad in [
        json!({"overlap_seconds": 2_592_001}),
        json!({"overlap_seconds": -1}),
        json!({"overlap_seconds": 1.5}),
        json!({"overlap_seconds": "600"}),
        json!({"overlap_seconds": null}),
        json!({"overlap_seconds": 60, "scopes": ["orders:write"]}),
    ] {
        let (status, code, err) = error_of(rotate(&app, &t, &base.key_id, bad.clone()).await).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{bad}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("overlap_seconds") || message.contains("scopes"),
            "{bad}: {message}"
        );
    }
    assert_eq!(balance(&base).await.status(), 200, "refused rotations changed nothing");
    // Without a body, or without the field, the old key keeps working a day.
    for body in [None, Some(json!({}))] {
        let plain = key_with(&app, &t, &rid, json!({})).await;
        let now = secs();
        let path = format!("/admin/v1/keys/{}/rotate", plain.key_id);
        let resp = app.admin(&t, Method::POST, &path, body.clone()).await;
        assert_eq!(resp.status(), 201, "{body:?}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["replaced_key_expires_at"], json!(at(now + 86_400)), "{body:?}");
    }
    let (status, _, _) = error_of(rotate(&app, &t, "ak_none", json!({"overlap_seconds": 60})).await).await;
    assert_eq!(status, 404);

    // Each rotation is audited against the key it replaced, naming the new one.
    let log = app
        .admin_ok(&t, Method::GET, "/admin/v1/audit?action=key.rotate", None, 200)
        .await;
    let first = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["target"] == json!(old.key_id))
        .expect("the first rotation's audit row");
    assert_eq!(first["actor"], ROOT_USER);
    assert_eq!(first["detail"]["key_id"], json!(new.key_id));
    assert_eq!(first["detail"]["overlap_seconds"], 600);
    assert_eq!(
        log["entries"].as_array().unwrap().len(),
        5,
        "three rotations above, and the two without an overlap"
    );
    let created = app
        .admin_ok(&t, Method::GET, "/admin/v1/audit?action=key.create", None, 200)
        .await;
    assert!(created["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["target"] == json!(old.key_id) && e["detail"]["label"] == "till 1"));
}

async fn balance_status(app: &TestApp, key: &ResellerKey) -> u16 {
    app.signed(key, Method::GET, "/v1/balance", None)
        .await
        .status()
        .as_u16()
}

/// Whether `app` answers `key`'s `GET /v1/balance` with `want` within a second.
async fn within_a_second(app: &TestApp, key: &ResellerKey, want: u16) -> bool {
    eventually(Duration::from_secs(1), || async {
        balance_status(app, key).await == want
    })
    .await
}

/// Gateways learn of rotations and revocations within a second, and each judges a
/// replaced key's end by its own clock, without waiting for another change.
#[tokio::test]
async fn a_second_gateway_sees_rotations_and_revocations_within_a_second() {
    let a = spawn_app().await;
    let b = start(a.env.clone()).await;
    let t = a.root_token().await;
    let k = a.reseller_with_key(&t, "gold", json!({})).await;
    assert!(within_a_second(&b, &k, 200).await, "B learns of a new key");

    let resp = rotate(&a, &t, &k.key_id, json!({"overlap_seconds": 0})).await;
    let rotated = Instant::now();
    let new = key_of(&k.reseller_id, &resp.json().await.unwrap());
    assert!(within_a_second(&b, &new, 200).await, "B takes the new key");
    assert!(within_a_second(&b, &k, 401).await, "B refuses the replaced key");
    assert!(rotated.elapsed() < Duration::from_secs(2));

    // With an overlap, B keeps taking the old key, then refuses it once its end comes.
    let resp = rotate(&a, &t, &new.key_id, json!({"overlap_seconds": 2})).await;
    let body: Value = resp.json().await.unwrap();
    let newer = key_of(&k.reseller_id, &body);
    assert_eq!(balance_status(&b, &new).await, 200, "within the overlap");
    assert!(within_a_second(&b, &newer, 200).await);
    let ends = time::OffsetDateTime::parse(
        body["replaced_key_expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    let left = ends * MS_PER_SEC - Clock::System.now_unix_ms();
    tokio::time::sleep(Duration::from_millis(left.max(0) as u64 + 50)).await;
    assert_eq!(balance_status(&b, &new).await, 401, "the overlap is over on B too");

    a.admin_ok(
        &t,
        Method::DELETE,
        &format!("/admin/v1/keys/{}", newer.key_id),
        None,
        200,
    )
    .await;
    let revoked = Instant::now();
    assert!(within_a_second(&b, &newer, 401).await, "B refuses the revoked key");
    assert!(revoked.elapsed() < Duration::from_secs(1));
}

/// `GET /admin/v1/resellers/{id}/keys`, checked to hold no secret.
async fn key_list(app: &TestApp, t: &str, reseller_id: &str) -> Vec<Value> {
    let resp = app
        .admin(t, Method::GET, &format!("/admin/v1/resellers/{reseller_id}/keys"), None)
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("sk_") && !text.contains("secret"), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["keys"].as_array().unwrap().clone()
}

/// A field of one key in a list.
fn field(keys: &[Value], key_id: &str, name: &str) -> Value {
    keys.iter().find(|e| e["key_id"] == json!(key_id)).unwrap()[name].clone()
}

/// `GET /v1/balance` signed at `clock`'s time.
async fn balance_at(app: &TestApp, key: &ResellerKey, clock: &ManualClock) -> u16 {
    signed_on(app, clock, key, Method::GET, "/v1/balance", None)
        .await
        .status()
        .as_u16()
}

/// The list shows every key without its secret. `last_used_at` is null until a flush
/// writes a use (a request refused after its signature verified counts), and only ever
/// moves forward, whichever gateway flushes last; a gateway shutting down writes what it
/// holds.
#[tokio::test]
async fn the_key_list_shows_no_secret_and_last_used_at_only_moves_forward() {
    let ahead = ManualClock::at_system_now();
    let behind = ManualClock::at_unix_ms(ahead.now_unix_ms() - 60 * MS_PER_SEC);
    let mut env = test_env(&create_database().await);
    env.insert(MANUAL_BACKGROUND.into(), "1".into());
    let mut a = start_with_clock(env.clone(), ahead.clone().into()).await;
    let b = start_with_clock(env, behind.clone().into()).await;
    let (a_state, b_state) = (a.state.clone().unwrap(), b.state.clone().unwrap());
    let flush = cardgate::auth::last_used::flush;
    let t = a.root_token().await;
    let k = a.reseller_with_key(&t, "gold", json!({})).await;
    let reports = key_with(
        &a,
        &t,
        &k.reseller_id,
        json!({"scopes": ["orders:read"], "label": "reports"}),
    )
    .await;
    let keys = key_list(&a, &t, &k.reseller_id).await;
    assert_eq!(keys.len(), 2);
    let fields = [
        "created_at",
        "daily_spend_limit",
        "expires_at",
        "key_id",
        "label",
        "last_used_at",
        "replaces",
        "revoked_at",
        "scopes",
    ];
    for key in &keys {
        let mut names: Vec<&str> = key.as_object().unwrap().keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, fields, "{key}");
        assert!(key["last_used_at"].is_null() && key["revoked_at"].is_null(), "{key}");
    }
    assert_eq!(keys[0]["key_id"], json!(k.key_id), "oldest first");
    assert_eq!((&keys[0]["scopes"], &keys[0]["label"]), (&json!(SCOPES), &Value::Null));
    assert_eq!(
        (&keys[1]["scopes"], &keys[1]["label"]),
        (&json!(["orders:read"]), &json!("reports"))
    );

    // Used on A: nothing is written until A flushes.
    assert_eq!(balance_at(&a, &k, &ahead).await, 200);
    let used_on_a = at(ahead.now_unix_ms().div_euclid(MS_PER_SEC));
    assert!(field(&key_list(&a, &t, &k.reseller_id).await, &k.key_id, "last_used_at").is_null());
    assert_eq!(flush(&a_state).await.unwrap(), 1);
    assert_eq!(
        field(&key_list(&a, &t, &k.reseller_id).await, &k.key_id, "last_used_at"),
        json!(used_on_a)
    );
    assert_eq!(flush(&a_state).await.unwrap(), 0, "nothing new");

    // B's use is a minute older: its flush leaves the later time.
    assert_eq!(balance_at(&b, &k, &behind).await, 200);
    assert_eq!(flush(&b_state).await.unwrap(), 0);
    assert_eq!(
        field(&key_list(&a, &t, &k.reseller_id).await, &k.key_id, "last_used_at"),
        json!(used_on_a)
    );
    behind.advance(Duration::from_secs(120));
    assert_eq!(balance_at(&b, &k, &behind).await, 200);
    let used_on_b = at(behind.now_unix_ms().div_euclid(MS_PER_SEC));
    assert_eq!(flush(&b_state).await.unwrap(), 1);
    assert_eq!(
        field(&key_list(&a, &t, &k.reseller_id).await, &k.key_id, "last_used_at"),
        json!(used_on_b)
    );

    // A use refused for its scope is a use; A writes it as it shuts down.
    let (status, code, _) = error_of(signed_on(&a, &ahead, &reports, Method::GET, "/v1/balance", None).await).await;
    assert_eq!((status, code.as_str()), (403, "insufficient_scope"));
    a.shutdown().await.unwrap();
    let keys = key_list(&b, &t, &k.reseller_id).await;
    assert_eq!(
        field(&keys, &reports.key_id, "last_used_at"),
        json!(at(ahead.now_unix_ms().div_euclid(MS_PER_SEC)))
    );

    // Revocations and rotations show.
    b.admin_ok(
        &t,
        Method::DELETE,
        &format!("/admin/v1/keys/{}", reports.key_id),
        None,
        200,
    )
    .await;
    let resp = rotate(&b, &t, &k.key_id, json!({"overlap_seconds": 60})).await;
    let rotated: Value = resp.json().await.unwrap();
    let keys = key_list(&b, &t, &k.reseller_id).await;
    assert_eq!(keys.len(), 3);
    assert!(field(&keys, &reports.key_id, "revoked_at").is_string());
    assert_eq!(
        field(&keys, &k.key_id, "expires_at"),
        rotated["replaced_key_expires_at"]
    );
    let new_id = rotated["key_id"].as_str().unwrap();
    assert_eq!(field(&keys, new_id, "replaces"), json!(k.key_id));
    assert!(field(&keys, new_id, "last_used_at").is_null());
    assert_eq!(field(&keys, new_id, "scopes"), json!(SCOPES));

    let (status, _, _) = error_of(b.admin(&t, Method::GET, "/admin/v1/resellers/rs_none/keys", None).await).await;
    assert_eq!(status, 404);
}
