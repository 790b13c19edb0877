//! API keys' scopes and expiry (docs/api.md §7), with time moved by a manual clock where
//! it matters.

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
        (json!({"daily_spend_limit": 5}), "daily_spend_limit"),
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
