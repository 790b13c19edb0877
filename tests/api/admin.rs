use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn the_bootstrap_admin_logs_in_and_wrong_passwords_are_401_then_locked_out() {
    // Behind a proxy on loopback, so that X-Forwarded-For can play a second address.
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_HTTP__TRUSTED_PROXIES".into(), "127.0.0.1/32".into());
    })
    .await;
    let token = app.root_token().await;
    assert!(token.split('.').count() == 3);
    for _ in 0..5 {
        let resp = app
            .client
            .post(app.url("/admin/v1/login"))
            .json(&json!({"username": ROOT_USER, "password": "nope-nope"}))
            .send()
            .await
            .unwrap();
        let (status, code, _) = error_of(resp).await;
        assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    }
    // Locked: even the right password is refused for a while.
    let resp = app
        .client
        .post(app.url("/admin/v1/login"))
        .json(&json!({"username": ROOT_USER, "password": ROOT_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("retry-after").is_some());
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    // The lock-out is per username.
    let unknown = app
        .client
        .post(app.url("/admin/v1/login"))
        .json(&json!({"username": "ghost", "password": "whatever1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 401);
    // ... and per address: failures from elsewhere do not lock the operator out.
    let elsewhere = app
        .client
        .post(app.url("/admin/v1/login"))
        .header("x-forwarded-for", "198.51.100.7")
        .json(&json!({"username": ROOT_USER, "password": ROOT_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 200);
}

fn forge(secret: &[u8], claims: serde_json::Value, alg: jsonwebtoken::Algorithm) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn missing_expired_forged_and_alg_none_tokens_are_401() {
    let app = spawn_app().await;
    let now = now_secs();
    let secret = app.env["CARDGATE_JWT_SECRET"].clone();
    let expired = forge(
        secret.as_bytes(),
        json!({"sub": ROOT_USER, "iat": now - 7200, "exp": now - 3600}),
        jsonwebtoken::Algorithm::HS256,
    );
    let forged = forge(
        b"not-the-server-secret-not-the-server",
        json!({"sub": ROOT_USER, "iat": now, "exp": now + 3600}),
        jsonwebtoken::Algorithm::HS256,
    );
    let hs512 = forge(
        secret.as_bytes(),
        json!({"sub": ROOT_USER, "iat": now, "exp": now + 3600}),
        jsonwebtoken::Algorithm::HS512,
    );
    use base64_url as b64;
    let none = format!(
        "{}.{}.",
        b64::encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64::encode(&json!({"sub": ROOT_USER, "iat": now, "exp": now + 3600}).to_string())
    );
    let valid = forge(
        secret.as_bytes(),
        json!({"sub": ROOT_USER, "iat": now, "exp": now + 3600}),
        jsonwebtoken::Algorithm::HS256,
    );
    assert_eq!(
        app.admin(&valid, Method::GET, "/admin/v1/products", None)
            .await
            .status(),
        200,
        "the control token works"
    );
    for (name, token) in [
        ("expired", expired),
        ("forged", forged),
        ("hs512", hs512),
        ("none", none),
        ("garbage", "abc".into()),
    ] {
        let (status, code, _) = error_of(app.admin(&token, Method::GET, "/admin/v1/products", None).await).await;
        assert_eq!((status, code.as_str()), (401, "unauthenticated"), "{name}");
    }
    let (status, code, _) = error_of(app.get("/admin/v1/products").await).await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
}

mod base64_url {
    pub fn encode(s: &str) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &x)| acc | (x as u32) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test]
async fn each_role_may_do_what_the_contract_says_and_gets_403_otherwise() {
    let app = spawn_app().await;
    let root = app.root_token().await;
    for (user, role) in [("op", "operator"), ("aud", "auditor")] {
        app.admin_ok(
            &root,
            Method::POST,
            "/admin/v1/admins",
            Some(json!({"username": user, "password": "password-123", "role": role})),
            201,
        )
        .await;
    }
    let op = app.login("op", "password-123").await;
    let aud = app.login("aud", "password-123").await;

    // Catalogue write: admin and operator yes, auditor no.
    app.create_product(&op, "op-sku").await;
    let (s, c, _) = error_of(
        app.admin(
            &aud,
            Method::POST,
            "/admin/v1/products",
            Some(json!({"sku": "x", "name": "x", "face_value": 1, "base_price": 1, "max_quantity": 1})),
        )
        .await,
    )
    .await;
    assert_eq!((s, c.as_str()), (403, "forbidden"));
    // Reads: everyone.
    for t in [&root, &op, &aud] {
        assert_eq!(
            app.admin(t, Method::GET, "/admin/v1/products", None).await.status(),
            200
        );
        assert_eq!(
            app.admin(t, Method::GET, "/admin/v1/resellers", None).await.status(),
            200
        );
    }
    // Resellers and balances: operator yes, auditor no.
    let r = app.create_reseller(&op, "gold").await;
    let rid = r["reseller_id"].as_str().unwrap();
    let (s, _, _) = error_of(
        app.admin(&aud, Method::POST, &format!("/admin/v1/resellers/{rid}/keys"), None)
            .await,
    )
    .await;
    assert_eq!(s, 403);
    let (s, _, _) = error_of(
        app.admin(
            &aud,
            Method::POST,
            &format!("/admin/v1/resellers/{rid}/balance"),
            Some(json!({"amount": 5, "reference": "r"})),
        )
        .await,
    )
    .await;
    assert_eq!(s, 403);
    // Accounts: admin only.
    let (s, c, _) = error_of(
        app.admin(
            &op,
            Method::POST,
            "/admin/v1/admins",
            Some(json!({"username": "x", "password": "password-123", "role": "admin"})),
        )
        .await,
    )
    .await;
    assert_eq!((s, c.as_str()), (403, "forbidden"));
    // Audit: admin and auditor, not operator.
    assert_eq!(
        app.admin(&aud, Method::GET, "/admin/v1/audit", None).await.status(),
        200
    );
    assert_eq!(app.admin(&op, Method::GET, "/admin/v1/audit", None).await.status(), 403);

    // Disabling an account takes effect at once, even for a token already issued.
    app.admin_ok(
        &root,
        Method::PATCH,
        "/admin/v1/admins/op",
        Some(json!({"disabled": true})),
        200,
    )
    .await;
    assert_eq!(
        app.admin(&op, Method::GET, "/admin/v1/products", None).await.status(),
        401
    );
    // The last admin cannot be disabled.
    let (s, _, _) = error_of(
        app.admin(
            &root,
            Method::PATCH,
            "/admin/v1/admins/root",
            Some(json!({"disabled": true})),
        )
        .await,
    )
    .await;
    assert_eq!(s, 409);
}

#[tokio::test]
async fn products_are_created_validated_patched_and_listed_with_stock() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let p = app.create_product(&t, "steam-cn-100").await;
    assert_eq!(p["tier_prices"]["gold"], 9650);
    assert_eq!(p["status"], "on_sale");
    assert_eq!(p["stock"]["available"], 0);
    let (s, c, _) = error_of(
        app.admin(
            &t,
            Method::POST,
            "/admin/v1/products",
            Some(json!({"sku": "steam-cn-100", "name": "dup", "face_value": 1, "base_price": 1, "max_quantity": 1})),
        )
        .await,
    )
    .await;
    assert_eq!((s, c.as_str()), (409, "conflict"));
    for bad in [
        json!({"sku": "a", "name": "n", "face_value": 1, "base_price": 1, "max_quantity": 1, "tier_prices": {"platinum": 5}}),
        json!({"sku": "a b", "name": "n", "face_value": 1, "base_price": 1, "max_quantity": 1}),
        json!({"sku": "a", "name": "n", "face_value": 1, "base_price": -1, "max_quantity": 1}),
        json!({"sku": "a", "name": "n", "face_value": 1, "base_price": 1, "max_quantity": 0}),
        json!({"sku": "a", "name": "n", "face_value": 1, "base_price": 1, "max_quantity": 1, "status": "gone"}),
    ] {
        let (s, c, e) = error_of(
            app.admin(&t, Method::POST, "/admin/v1/products", Some(bad.clone()))
                .await,
        )
        .await;
        assert_eq!((s, c.as_str()), (400, "invalid_request"), "{bad}: {e}");
    }
    // A value of the wrong type is refused naming its field (docs/api.md §2), as a
    // missing one is.
    for (field, bad) in [
        (
            "face_value",
            json!({"sku": "a", "name": "n", "face_value": "100", "base_price": 1, "max_quantity": 1}),
        ),
        (
            "max_quantity",
            json!({"sku": "a", "name": "n", "face_value": 1, "base_price": 1, "max_quantity": 3_000_000_000u64}),
        ),
        (
            "name",
            json!({"sku": "a", "name": null, "face_value": 1, "base_price": 1, "max_quantity": 1}),
        ),
    ] {
        let (s, c, e) = error_of(
            app.admin(&t, Method::POST, "/admin/v1/products", Some(bad.clone()))
                .await,
        )
        .await;
        assert_eq!((s, c.as_str()), (400, "invalid_request"), "{bad}: {e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(&format!("{field}: ")), "{bad}: {message}");
    }
    let patched = app.admin_ok(&t, Method::PATCH, "/admin/v1/products/steam-cn-100", Some(json!({"base_price": 9900, "status": "off_sale", "tier_prices": {"diamond": 9000}, "low_stock_threshold": 10})), 200).await;
    assert_eq!(patched["base_price"], 9900);
    assert_eq!(patched["status"], "off_sale");
    assert_eq!(patched["tier_prices"], json!({"diamond": 9000}));
    assert_eq!(patched["low_stock_threshold"], 10);
    let cleared = app
        .admin_ok(
            &t,
            Method::PATCH,
            "/admin/v1/products/steam-cn-100",
            Some(json!({"low_stock_threshold": null})),
            200,
        )
        .await;
    assert!(cleared["low_stock_threshold"].is_null());
    assert_eq!(
        app.admin(&t, Method::PATCH, "/admin/v1/products/nope", Some(json!({"name": "x"})))
            .await
            .status(),
        404
    );
    // Unicode SKUs travel percent-encoded in paths.
    app.create_product(&t, "话费-100").await;
    let got = app
        .admin_ok(&t, Method::GET, "/admin/v1/products/%E8%AF%9D%E8%B4%B9-100", None, 200)
        .await;
    assert_eq!(got["sku"], "话费-100");
    let list = app.admin_ok(&t, Method::GET, "/admin/v1/products", None, 200).await;
    assert_eq!(list["products"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn resellers_keys_and_revocation() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let r = app.admin_ok(&t, Method::POST, "/admin/v1/resellers", Some(json!({"name": "Shop", "tier": "gold", "ip_allowlist": ["10.0.0.0/8", "2001:db8::1"], "callback_url": "https://shop.example/cb"})), 201).await;
    assert!(r["webhook_secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(r["ip_allowlist"], json!(["10.0.0.0/8", "2001:db8::1/128"]));
    assert_eq!(r["balance"], 0);
    let rid = r["reseller_id"].as_str().unwrap();
    let again = app
        .admin_ok(&t, Method::GET, &format!("/admin/v1/resellers/{rid}"), None, 200)
        .await;
    assert!(
        again.get("webhook_secret").is_none(),
        "the webhook secret is shown only at creation"
    );
    for bad in [
        json!({"name": "x", "tier": "platinum"}),
        json!({"name": "x", "tier": "gold", "ip_allowlist": ["nope"]}),
        json!({"name": "x", "tier": "gold", "callback_url": "ftp://x"}),
    ] {
        let (s, _, _) = error_of(app.admin(&t, Method::POST, "/admin/v1/resellers", Some(bad)).await).await;
        assert_eq!(s, 400);
    }
    let p = app
        .admin_ok(
            &t,
            Method::PATCH,
            &format!("/admin/v1/resellers/{rid}"),
            Some(json!({"tier": "diamond", "status": "suspended", "callback_url": null})),
            200,
        )
        .await;
    assert_eq!(
        (p["tier"].as_str(), p["status"].as_str()),
        (Some("diamond"), Some("suspended"))
    );
    assert!(p["callback_url"].is_null());

    let resp = app
        .admin(&t, Method::POST, &format!("/admin/v1/resellers/{rid}/keys"), None)
        .await;
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let k: serde_json::Value = resp.json().await.unwrap();
    let key_id = k["key_id"].as_str().unwrap();
    assert!(key_id.starts_with("ak_") && k["secret"].as_str().unwrap().starts_with("sk_"));
    let revoked = app
        .admin_ok(&t, Method::DELETE, &format!("/admin/v1/keys/{key_id}"), None, 200)
        .await;
    assert_eq!(revoked["revoked"], true);
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT revoked_at IS NOT NULL FROM api_keys WHERE key_id = $1",
            &[&key_id],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(
        app.admin(&t, Method::DELETE, "/admin/v1/keys/ak_nope", None)
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn twenty_concurrent_credits_with_one_reference_change_the_balance_once() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let rid = app.create_reseller(&t, "gold").await["reseller_id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/admin/v1/resellers/{rid}/balance");
    let calls = (0..20).map(|_| {
        app.admin(
            &t,
            Method::POST,
            &path,
            Some(json!({"amount": 50000, "reference": "topup-1", "note": "bank"})),
        )
    });
    let answers = futures_util::future::join_all(calls).await;
    let mut replayed = 0;
    for resp in answers {
        assert_eq!(resp.status(), 200);
        replayed += resp.headers().contains_key("idempotent-replayed") as usize;
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["balance"], 50000, "every answer is the same result");
    }
    assert_eq!(replayed, 19);
    let db = app.db().await;
    let (bal, rows): (i64, i64) = {
        let r = db.query_one("SELECT b.balance, (SELECT count(*) FROM balance_ledger l WHERE l.reseller_id = b.reseller_id) FROM balances b JOIN resellers r ON r.id = b.reseller_id WHERE r.reseller_id = $1", &[&rid]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((bal, rows), (50000, 1));
    // The hot balance in Redis moved once too.
    let pk = app.reseller_pk(&rid).await;
    let mut redis = app.redis().await;
    let hot: i64 = redis::cmd("GET")
        .arg(app.keys().balance(pk))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(hot, 50000);

    // Same reference, other amount: a conflict. Debit below zero: refused, nothing changes.
    let (s, c, body) = error_of(
        app.admin(
            &t,
            Method::POST,
            &path,
            Some(json!({"amount": 1, "reference": "topup-1"})),
        )
        .await,
    )
    .await;
    assert_eq!((s, c.as_str()), (409, "idempotency_conflict"));
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reference")),
        "the message names what was reused: {body}"
    );
    let (s, c, _) = error_of(
        app.admin(
            &t,
            Method::POST,
            &path,
            Some(json!({"amount": -50001, "reference": "debit-1"})),
        )
        .await,
    )
    .await;
    assert_eq!((s, c.as_str()), (402, "insufficient_balance"));
    let ok = app
        .admin_ok(
            &t,
            Method::POST,
            &path,
            Some(json!({"amount": -20000, "reference": "debit-2"})),
            200,
        )
        .await;
    assert_eq!(ok["balance"], 30000);
    let hot: i64 = redis::cmd("GET")
        .arg(app.keys().balance(pk))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(hot, 30000);
    // Direct writes to balances are refused by the database itself.
    let err = db
        .execute("UPDATE balances SET balance = 999999 WHERE reseller_id = $1", &[&pk])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("balance_ledger") || format!("{err:?}").contains("balance_ledger"));
}

#[tokio::test]
async fn admin_actions_are_audited_with_actor_and_address() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    app.create_product(&t, "audited").await;
    let log = app
        .admin_ok(&t, Method::GET, "/admin/v1/audit?action=product.create", None, 200)
        .await;
    let e = &log["entries"][0];
    assert_eq!(
        (e["actor"].as_str(), e["target"].as_str(), e["ip"].as_str()),
        (Some(ROOT_USER), Some("audited"), Some("127.0.0.1"))
    );
    let all = app
        .admin_ok(&t, Method::GET, "/admin/v1/audit?actor=root", None, 200)
        .await;
    let actions: Vec<&str> = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"login") && actions.contains(&"product.create"),
        "{actions:?}"
    );
}
