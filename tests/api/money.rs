//! Money bounds (docs/invariants.md invariant 11): every price, threshold, adjustment and balance
//! within 10^15 minor units, refused by the API naming the field and by Postgres itself.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

const MAX: i64 = 1_000_000_000_000_000;

async fn refused(app: &TestApp, token: &str, method: Method, path: &str, body: Value, field: &str) {
    let resp = app.admin(token, method, path, Some(body.clone())).await;
    let (status, code, err) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"), "{body}: {err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains(field), "{body}: the message names {field}: {message}");
}

#[tokio::test]
async fn prices_thresholds_and_adjustments_past_the_bound_are_400_and_change_nothing() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let product = |field: &str, v: Value| {
        let mut p = json!({"sku": "big", "name": "Big", "face_value": 1, "base_price": 1,
                           "tier_prices": {"gold": 1}, "max_quantity": 10});
        if field == "tier_prices" {
            p["tier_prices"] = json!({"gold": v});
        } else {
            p[field] = v;
        }
        p
    };
    for field in ["face_value", "base_price", "tier_prices"] {
        let body = product(field, json!(MAX + 1));
        refused(&app, &t, Method::POST, "/admin/v1/products", body, field).await;
    }
    let resp = app.admin(&t, Method::GET, "/admin/v1/products/big", None).await;
    assert_eq!(resp.status(), 404, "nothing was created");
    // The bound itself is a valid price.
    app.admin_ok(
        &t,
        Method::POST,
        "/admin/v1/products",
        Some(product("base_price", json!(MAX))),
        201,
    )
    .await;
    for (field, body) in [
        ("face_value", json!({"face_value": MAX + 1})),
        ("base_price", json!({"base_price": MAX + 1})),
        ("tier_prices", json!({"tier_prices": {"gold": MAX + 1}})),
    ] {
        refused(&app, &t, Method::PATCH, "/admin/v1/products/big", body, field).await;
    }
    let p = app.admin_ok(&t, Method::GET, "/admin/v1/products/big", None, 200).await;
    assert_eq!(
        (p["face_value"].as_i64(), p["base_price"].as_i64()),
        (Some(1), Some(MAX))
    );
    assert_eq!(p["tier_prices"], json!({"gold": 1}));

    let body = json!({"name": "Shop", "tier": "gold", "low_balance_threshold": MAX + 1});
    refused(
        &app,
        &t,
        Method::POST,
        "/admin/v1/resellers",
        body,
        "low_balance_threshold",
    )
    .await;
    let r = app.create_reseller(&t, "gold").await;
    let rid = r["reseller_id"].as_str().unwrap();
    let path = format!("/admin/v1/resellers/{rid}");
    refused(
        &app,
        &t,
        Method::PATCH,
        &path,
        json!({"low_balance_threshold": MAX + 1}),
        "low_balance_threshold",
    )
    .await;

    let balance = format!("/admin/v1/resellers/{rid}/balance");
    for amount in [MAX + 1, -(MAX + 1), i64::MIN, i64::MAX] {
        let body = json!({"amount": amount, "reference": format!("r{amount}")});
        refused(&app, &t, Method::POST, &balance, body, "amount").await;
    }
    // Written out as a client would send it: no Rust value between it and the server.
    let resp = app
        .client
        .post(app.url(&balance))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(r#"{"amount": -9223372036854775808, "reference": "min"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 400);
    let r = app.admin_ok(&t, Method::GET, &path, None, 200).await;
    assert_eq!(
        (r["balance"].as_i64(), r["low_balance_threshold"].as_i64()),
        (Some(0), Some(0))
    );
    let db = app.db().await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM balance_ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn a_credit_that_would_take_the_balance_past_the_bound_is_400() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let r = app.create_reseller(&t, "gold").await;
    let rid = r["reseller_id"].as_str().unwrap();
    let db = app.db().await;
    // Near the bound through the ledger, as only Postgres can put it there.
    db.execute(
        "INSERT INTO balance_ledger (reseller_id, amount, kind, reference)
         SELECT id, $2, 'adjustment', 'seed' FROM resellers WHERE reseller_id = $1",
        &[&rid, &(MAX - 5)],
    )
    .await
    .unwrap();
    let body = json!({"amount": 10, "reference": "over"});
    refused(
        &app,
        &t,
        Method::POST,
        &format!("/admin/v1/resellers/{rid}/balance"),
        body,
        "amount",
    )
    .await;
    assert_eq!(app.recorded_balance(rid).await, MAX - 5);
}

#[tokio::test]
async fn postgres_refuses_money_past_the_bound_whatever_writes_it() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    app.create_product(&t, "p1").await;
    let r = app.create_reseller(&t, "gold").await;
    let rid = r["reseller_id"].as_str().unwrap().to_string();
    let db = app.db().await;
    let pk = app.reseller_pk(&rid).await;
    let (over, under) = (MAX + 1, -(MAX + 1));
    let statements: [(&str, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>); 7] = [
        (
            "INSERT INTO products (sku, name, face_value, base_price, max_quantity) VALUES ('x', 'x', 1, $1, 1)",
            vec![&over],
        ),
        ("UPDATE products SET face_value = $1 WHERE sku = 'p1'", vec![&over]),
        (
            "INSERT INTO product_tier_prices (product_id, tier, price) SELECT id, 'silver', $1 FROM products WHERE sku = 'p1'",
            vec![&over],
        ),
        ("UPDATE resellers SET low_balance_threshold = $1 WHERE id = $2", vec![&over, &pk]),
        (
            "INSERT INTO balance_ledger (reseller_id, amount, kind, reference) VALUES ($2, $1, 'adjustment', 'big')",
            vec![&over, &pk],
        ),
        (
            "INSERT INTO balance_ledger (reseller_id, amount, kind, reference) VALUES ($2, $1, 'adjustment', 'small')",
            vec![&under, &pk],
        ),
        (
            "INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
             SELECT 'ord_x', $2, 'M-1', id, sku, 1, $1, $1, 'CNY', now() FROM products WHERE sku = 'p1'",
            vec![&over, &pk],
        ),
    ];
    for (sql, params) in statements {
        let e = db.execute(sql, &params).await.expect_err(sql);
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
            "{sql}: {e}"
        );
    }
    // Two movements each within the bound cannot take the balance past it either.
    db.execute(
        "INSERT INTO balance_ledger (reseller_id, amount, kind, reference) VALUES ($1, $2, 'adjustment', 'a')",
        &[&pk, &MAX],
    )
    .await
    .unwrap();
    let e = db
        .execute(
            "INSERT INTO balance_ledger (reseller_id, amount, kind, reference) VALUES ($1, 1, 'adjustment', 'b')",
            &[&pk],
        )
        .await
        .expect_err("balance past the bound");
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION));
}

/// Postgres holds merchant_order_no to docs/api.md's shape itself, whatever writes it:
/// 1 to 64 characters of A-Z a-z 0-9 _ . : -.
#[tokio::test]
async fn postgres_refuses_a_merchant_order_no_of_another_shape() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    app.create_product(&t, "p1").await;
    let r = app.create_reseller(&t, "gold").await;
    let pk = app.reseller_pk(r["reseller_id"].as_str().unwrap()).await;
    let db = app.db().await;
    let insert = "INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
                  SELECT 'ord_' || md5($2), $1, $2, id, sku, 1, 0, 0, 'CNY', now() FROM products WHERE sku = 'p1'";
    let longest = format!("{}_.:-09az", "A".repeat(56));
    for bad in ["", "a b", "a/b", "é", "a\n", &format!("{longest}Z")] {
        let e = db.execute(insert, &[&pk, &bad]).await.expect_err(bad);
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
            "{bad:?}: {e}"
        );
    }
    // The longest and every kind of character it may hold go in (and are rolled back).
    db.batch_execute("BEGIN").await.unwrap();
    for good in [longest.as_str(), "M", "M20261123-0001"] {
        assert_eq!(db.execute(insert, &[&pk, &good]).await.unwrap(), 1, "{good}");
    }
    db.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn an_order_whose_amount_would_pass_the_bound_is_refused_and_takes_nothing() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    app.admin_ok(
        &t,
        Method::POST,
        "/admin/v1/products",
        Some(json!({"sku": "dear", "name": "Dear", "face_value": MAX, "base_price": MAX, "max_quantity": 10})),
        201,
    )
    .await;
    assert_eq!(app.import_codes(&t, "dear", "A-1\nA-2\n").await.status(), 200);
    let k = app.reseller_with_key(&t, "gold", json!({})).await;
    let resp = app.post_order(&k, order_body("dear", 2, "M-DEAR")).await;
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (422, "quantity_out_of_range"));
    assert_eq!(app.stock_len("dear").await, 2);
}
