//! The order path (docs/api.md §3 orders, docs/invariants.md invariants 1, 2, 3, 4 and 6) against real
//! Redis and Postgres.

use std::collections::HashSet;
use std::sync::Arc;

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

pub const SKU: &str = "steam-cn-100";
/// The gold price of the helpers' product.
pub const GOLD: i64 = 9650;

pub async fn shop(codes: usize) -> (TestApp, String, Vec<String>) {
    shop_with(codes, |_| {}).await
}

pub async fn shop_with(
    codes: usize,
    overrides: impl FnOnce(&mut std::collections::HashMap<String, String>),
) -> (TestApp, String, Vec<String>) {
    let app = spawn_app_with(overrides).await;
    let t = app.root_token().await;
    app.create_product(&t, SKU).await;
    let imported: Vec<String> = (0..codes).map(|i| format!("CODE-{i:05}-{}", random_suffix())).collect();
    let resp = app.import_codes(&t, SKU, imported.join("\n")).await;
    assert_eq!(resp.status(), 200);
    (app, t, imported)
}

pub async fn buyer(app: &TestApp, t: &str, tier: &str, balance: i64) -> ResellerKey {
    let k = app.reseller_with_key(t, tier, json!({})).await;
    if balance > 0 {
        app.fund(t, &k.reseller_id, balance).await;
    }
    k
}

#[tokio::test]
async fn an_order_delivers_its_codes_charges_once_and_replays_the_same_answer() {
    let (app, t, imported) = shop(5).await;
    let k = buyer(&app, &t, "gold", 100_000).await;

    let (status, first, replayed) = app.order(&k, order_body(SKU, 2, "M20261123-0001")).await;
    assert_eq!(status, 201, "{first}");
    assert!(!replayed);
    let codes = codes_of(&first);
    assert_eq!(codes.len(), 2);
    assert_ne!(codes[0], codes[1]);
    assert!(codes.iter().all(|c| imported.contains(c)));
    assert!(first["order_id"].as_str().unwrap().starts_with("ord_"));
    for (field, want) in [
        ("merchant_order_no", json!("M20261123-0001")),
        ("sku", json!(SKU)),
        ("quantity", json!(2)),
        ("unit_price", json!(GOLD)),
        ("amount", json!(2 * GOLD)),
        ("currency", json!("CNY")),
        ("status", json!("fulfilled")),
    ] {
        assert_eq!(first[field], want, "{field}");
    }
    assert!(first["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(app.balance_of(&k).await, 100_000 - 2 * GOLD);
    assert_eq!(app.stock_len(SKU).await, 3);

    // Committed before the answer (invariant 2): the order, its codes, its charge (the
    // order is its own ledger entry).
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT o.amount, (SELECT count(*) FROM order_codes oc WHERE oc.order_id = o.id),
                    (SELECT sum(amount) FROM ledger_entries l WHERE l.reference = o.order_id AND l.kind = 'order')::int8,
                    (SELECT balance FROM balances b WHERE b.reseller_id = o.reseller_id)
               FROM orders o WHERE o.order_id = $1",
            &[&first["order_id"].as_str().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3)
        ),
        (2 * GOLD, 2, -2 * GOLD, 100_000 - 2 * GOLD)
    );

    // The same number again: the same order, not a second one.
    let (status, again, replayed) = app.order(&k, order_body(SKU, 2, "M20261123-0001")).await;
    assert_eq!((status, replayed), (200, true), "{again}");
    assert_eq!(again, first, "a replay is the original answer");
    // max_unit_price is not part of what a replay must match; sku and quantity are.
    let mut with_cap = order_body(SKU, 2, "M20261123-0001");
    with_cap["max_unit_price"] = json!(1);
    assert_eq!(app.order(&k, with_cap).await.0, 200);
    for body in [
        order_body(SKU, 3, "M20261123-0001"),
        order_body("other-sku", 2, "M20261123-0001"),
    ] {
        let resp = app.post_order(&k, body).await;
        assert_eq!(error_of(resp).await.1, "idempotency_conflict");
    }
    assert_eq!(app.balance_of(&k).await, 100_000 - 2 * GOLD, "charged once");

    // Read back by id and by number; every reveal is audited.
    let id = first["order_id"].as_str().unwrap();
    let by_id: serde_json::Value = app
        .signed(&k, Method::GET, &format!("/v1/orders/{id}"), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_id, first);
    let resp = app
        .signed(&k, Method::GET, "/v1/orders?merchant_order_no=M20261123-0001", None)
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap(), first);
    let reveals: i64 = db
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'order.reveal' AND target = $1 AND actor = $2",
            &[&id, &k.reseller_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reveals, 4, "two replays and two reads");

    // Another reseller sees neither the order nor the number.
    let other = buyer(&app, &t, "gold", 0).await;
    let resp = app.signed(&other, Method::GET, &format!("/v1/orders/{id}"), None).await;
    assert_eq!(error_of(resp).await.1, "not_found");
    let resp = app
        .signed(&other, Method::GET, "/v1/orders?merchant_order_no=M20261123-0001", None)
        .await;
    assert_eq!(error_of(resp).await.1, "not_found");
    // The same number is another reseller's own.
    app.fund(&t, &other.reseller_id, GOLD).await;
    assert_eq!(app.order(&other, order_body(SKU, 1, "M20261123-0001")).await.0, 201);

    // Operators see the order path in the metrics, and never a code there.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for name in [
        "cardgate_orders_total{outcome=\"created\",tier=\"gold\"}",
        "cardgate_orders_total{outcome=\"idempotency_conflict\",tier=\"gold\"}",
        "cardgate_reservation_seconds_bucket",
        "cardgate_ledger_batch_size_bucket",
        "cardgate_ledger_commit_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} in /metrics");
    }
    assert!(codes.iter().all(|c| !metrics.contains(c.as_str())));
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn refusals_take_nothing() {
    let (app, t, _) = shop(3).await;
    let k = buyer(&app, &t, "standard", 3 * 9800 - 1).await;
    let before = app.balance_of(&k).await;

    let refused = |body: serde_json::Value| {
        let app = &app;
        let k = &k;
        async move {
            let resp = app.post_order(k, body).await;
            let (s, c, _) = error_of(resp).await;
            (s, c)
        }
    };
    let code = |s: u16, c: &str| (s, c.to_string());
    assert_eq!(refused(order_body(SKU, 4, "M-1")).await, code(409, "out_of_stock"));
    assert_eq!(
        refused(order_body(SKU, 3, "M-1")).await,
        code(402, "insufficient_balance")
    );
    assert_eq!(
        refused(order_body(SKU, 0, "M-1")).await,
        code(422, "quantity_out_of_range")
    );
    assert_eq!(
        refused(order_body(SKU, -5, "M-1")).await,
        code(422, "quantity_out_of_range")
    );
    assert_eq!(
        refused(order_body(SKU, 11, "M-1")).await,
        code(422, "quantity_out_of_range"),
        "standard tier caps quantity at 10"
    );
    assert_eq!(
        refused(json!({"sku": SKU, "quantity": 1_000_000_000_000_000i64, "merchant_order_no": "M-1"})).await,
        code(422, "quantity_out_of_range")
    );
    let mut capped = order_body(SKU, 1, "M-1");
    capped["max_unit_price"] = json!(9799);
    assert_eq!(refused(capped).await, code(409, "price_changed"));
    // A misspelt guard is refused, not ignored: the order would have gone through at 9800.
    let mut misspelt = order_body(SKU, 1, "M-1");
    misspelt["max_unit_prce"] = json!(9799);
    assert_eq!(refused(misspelt).await, code(400, "invalid_request"));
    assert_eq!(
        refused(order_body("no-such-sku", 1, "M-1")).await,
        code(404, "not_found")
    );
    for bad in [
        json!({"sku": SKU, "quantity": 1}),
        json!({"sku": SKU, "quantity": "1", "merchant_order_no": "M-1"}),
        json!({"sku": SKU, "quantity": 1, "merchant_order_no": "M 1"}),
        json!({"sku": SKU, "quantity": 1, "merchant_order_no": ""}),
        json!({"sku": SKU, "quantity": 1, "merchant_order_no": "M".repeat(65)}),
        json!({"sku": 5, "quantity": 1, "merchant_order_no": "M-1"}),
        json!([1, 2]),
    ] {
        assert_eq!(refused(bad.clone()).await, code(400, "invalid_request"), "{bad}");
    }
    let resp = app.signed(&k, Method::POST, "/v1/orders", Some("{\"sku\":")).await;
    assert_eq!(error_of(resp).await.1, "invalid_json");
    app.admin_ok(
        &t,
        Method::PATCH,
        &format!("/admin/v1/products/{SKU}"),
        Some(json!({"status": "off_sale"})),
        200,
    )
    .await;
    assert_eq!(
        refused(order_body(SKU, 1, "M-1")).await,
        code(422, "product_unavailable")
    );
    app.admin_ok(
        &t,
        Method::PATCH,
        &format!("/admin/v1/products/{SKU}"),
        Some(json!({"status": "on_sale"})),
        200,
    )
    .await;

    // Refused before the body is read or parsed: forged, stale, oversized.
    let body = order_body(SKU, 1, "M-1").to_string();
    let forged = ResellerKey {
        secret: "f".repeat(k.secret.len()),
        ..k.clone()
    };
    let resp = app.signed(&forged, Method::POST, "/v1/orders", Some(&body)).await;
    assert_eq!(error_of(resp).await.1, "invalid_signature");
    let resp = app
        .signed_at(
            &k,
            Method::POST,
            "/v1/orders",
            Some(&body),
            now_secs() - 3_600,
            &nonce(),
            &[],
        )
        .await;
    assert_eq!(error_of(resp).await.1, "timestamp_out_of_window");
    let huge = format!(
        "{{\"sku\":\"{SKU}\",\"quantity\":1,\"merchant_order_no\":\"M-1\",\"pad\":\"{}\"}}",
        "x".repeat(200_000)
    );
    let resp = app.signed(&k, Method::POST, "/v1/orders", Some(&huge)).await;
    assert_eq!(resp.status(), 413);

    // Nothing moved: stock, balance, orders; and the refused number is still free.
    assert_eq!(app.stock_len(SKU).await, 3);
    assert_eq!(app.balance_of(&k).await, before);
    let orders: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orders, 0);
    assert_eq!(app.order(&k, order_body(SKU, 2, "M-1")).await.0, 201);
    assert_eq!(app.balance_of(&k).await, before - 2 * 9800);
    app.assert_reconciled(&t).await;
}

/// 300 buyers from several resellers race for 100 codes of one SKU.
#[tokio::test]
async fn sell_out_race_delivers_each_code_exactly_once() {
    let (app, t, imported) = shop(100).await;
    let app = Arc::new(app);
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(Arc::new(buyer(&app, &t, "diamond", 1_000_000).await));
    }
    let mut tasks = Vec::new();
    for i in 0..300 {
        let (app, k) = (app.clone(), keys[i % keys.len()].clone());
        tasks.push(tokio::spawn(async move {
            let (s, body, _) = app.order(&k, order_body(SKU, 1, &format!("race-{i}"))).await;
            (i % 5, s, body)
        }));
    }
    let mut delivered = Vec::new();
    let mut bought = [0i64; 5];
    let mut out_of_stock = 0;
    for task in tasks {
        let (who, s, body) = task.await.unwrap();
        match s {
            201 => {
                delivered.extend(codes_of(&body));
                bought[who] += 1;
            }
            409 if body["error"]["code"] == "out_of_stock" => out_of_stock += 1,
            _ => panic!("unexpected answer {s}: {body}"),
        }
    }
    assert_eq!(delivered.len(), 100, "every code sold");
    assert_eq!(out_of_stock, 200);
    let distinct: HashSet<_> = delivered.iter().collect();
    assert_eq!(distinct.len(), 100, "no code delivered twice");
    assert!(delivered.iter().all(|c| imported.contains(c)));
    for (who, k) in keys.iter().enumerate() {
        assert_eq!(
            app.balance_of(k).await,
            1_000_000 - bought[who] * 9800,
            "reseller {who}"
        );
    }
    let db = app.db().await;
    let (orders, codes): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT (SELECT count(*) FROM orders), (SELECT count(DISTINCT code_id) FROM order_codes)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((orders, codes), (100, 100));
    let report = app.assert_reconciled(&t).await;
    assert_eq!(report["products"][0]["delivered"], 100);
    assert_eq!(report["products"][0]["available"], 0);
}

/// 50 concurrent requests with one merchant_order_no: one order, one charge.
#[tokio::test]
async fn retry_storm_makes_one_order_and_one_charge() {
    let (app, t, _) = shop(10).await;
    let app = Arc::new(app);
    let k = Arc::new(buyer(&app, &t, "diamond", 1_000_000).await);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (app, k) = (app.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            app.order(&k, order_body(SKU, 3, "STORM-1")).await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let created = answers.iter().filter(|(s, _, _)| *s == 201).count();
    assert_eq!(created, 1, "exactly one 201");
    let successes: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 201 || *s == 200).collect();
    let first = codes_of(&successes[0].1);
    for (s, body, replayed) in &successes {
        assert_eq!(codes_of(body), first, "every success carries the same codes");
        assert_eq!(*replayed, *s == 200);
    }
    for (s, body, _) in &answers {
        if *s != 201 && *s != 200 {
            assert_eq!(
                (*s, body["error"]["code"].as_str()),
                (409, Some("order_in_progress")),
                "{body}"
            );
        }
    }
    // Once it settled, a retry is a replay.
    let (s, body, replayed) = app.order(&k, order_body(SKU, 3, "STORM-1")).await;
    assert_eq!((s, replayed, codes_of(&body)), (200, true, first));
    assert_eq!(app.balance_of(&k).await, 1_000_000 - 3 * 9800);
    let db = app.db().await;
    let r = db
        .query_one(
            "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM ledger_entries WHERE kind = 'order')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (1, 1));
    app.assert_reconciled(&t).await;
}

/// A committed order's Redis record still says `pending` (settling only acknowledges the
/// outbox): a retry (the first answer lost on the way) is a replay of the order from
/// Postgres, not `order_in_progress`, for the first request is done.
#[tokio::test]
async fn a_retry_of_a_committed_order_whose_record_says_pending_replays_the_order() {
    let (app, t, _) = shop(3).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let (s, first, _) = app.order(&k, order_body(SKU, 1, "GAP-1")).await;
    assert_eq!(s, 201, "{first}");
    let record = app.keys().idempotency(app.reseller_pk(&k.reseller_id).await, "GAP-1");
    let state: String = redis::cmd("HGET")
        .arg(record)
        .arg("state")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert_eq!(state, "pending");

    let (s, again, replayed) = app.order(&k, order_body(SKU, 1, "GAP-1")).await;
    assert_eq!((s, replayed), (200, true), "{again}");
    assert_eq!(again["order_id"], first["order_id"]);
    assert_eq!(codes_of(&again), codes_of(&first));
    // Another quantity under the number is still a conflict, not a second order.
    let resp = app.post_order(&k, order_body(SKU, 2, "GAP-1")).await;
    assert_eq!(error_of(resp).await.1, "idempotency_conflict");
    assert_eq!(app.balance_of(&k).await, 100_000 - GOLD);
    assert_eq!(app.stock_len(SKU).await, 2);
}

/// Invariant 11: orders are the ledger's order entries, so Postgres keeps them like the
/// ledger itself: never deleted or rewritten, their one change the refund, and the
/// balance always the sum of the statement.
#[tokio::test]
async fn orders_and_the_ledger_are_append_only_and_the_balance_is_their_sum() {
    let (app, t, _) = shop(3).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let (s, order, _) = app.order(&k, order_body(SKU, 1, "AO-1")).await;
    assert_eq!(s, 201, "{order}");
    let id = order["order_id"].as_str().unwrap();
    let db = app.db().await;
    for (sql, what) in [
        (
            "UPDATE orders SET amount = 0, unit_price = 0 WHERE order_id = $1",
            "an order's amount",
        ),
        (
            "UPDATE orders SET created_at = created_at - interval '1 day' WHERE order_id = $1",
            "an order's time",
        ),
        ("DELETE FROM orders WHERE order_id = $1", "an order"),
        ("DELETE FROM balance_ledger WHERE reference <> $1", "a ledger row"),
        (
            "UPDATE balance_ledger SET amount = amount + 1 WHERE reference <> $1",
            "a ledger row's amount",
        ),
    ] {
        let err = db.execute(sql, &[&id]).await.expect_err(what);
        let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
        assert!(message.contains("append-only"), "{what}: {err:?}");
    }
    for table in ["orders", "balance_ledger"] {
        let err = db
            .batch_execute(&format!("TRUNCATE {table} CASCADE"))
            .await
            .expect_err(table);
        let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
        assert!(message.contains("append-only"), "{table}: {err:?}");
    }
    // The refund, through the API, is the one change.
    app.admin_ok(
        &t,
        Method::POST,
        &format!("/admin/v1/orders/{id}/refund"),
        Some(json!({})),
        200,
    )
    .await;
    let (s, _, _) = app.order(&k, order_body(SKU, 2, "AO-2")).await;
    assert_eq!(s, 201);
    let r = db
        .query_one(
            "SELECT b.balance, (SELECT sum(amount) FROM ledger_entries l WHERE l.reseller_id = b.reseller_id)::int8,
                    (SELECT count(*) FROM ledger_entries l WHERE l.reseller_id = b.reseller_id)
               FROM balances b JOIN orders o ON o.reseller_id = b.reseller_id WHERE o.order_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (balance, sum, entries): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    assert_eq!((balance, sum), (100_000 - 2 * GOLD, 100_000 - 2 * GOLD));
    assert_eq!(entries, 4, "the credit, two orders and one refund");
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn refunds_credit_once_and_refunded_codes_are_never_sold_again() {
    let (app, t, _) = shop(4).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let (_, order, _) = app.order(&k, order_body(SKU, 2, "R-1")).await;
    let refunded_codes = codes_of(&order);
    let id = order["order_id"].as_str().unwrap();
    let path = format!("/admin/v1/orders/{id}/refund");

    let auditor = app
        .admin_ok(
            &t,
            Method::POST,
            "/admin/v1/admins",
            Some(json!({"username": "aud", "password": "aud-password-1", "role": "auditor"})),
            201,
        )
        .await;
    assert_eq!(auditor["role"], "auditor");
    let aud = app.login("aud", "aud-password-1").await;
    let resp = app.admin(&aud, Method::POST, &path, Some(json!({"reason": "x"}))).await;
    assert_eq!(error_of(resp).await.1, "forbidden");

    let r = app
        .admin_ok(
            &t,
            Method::POST,
            &path,
            Some(json!({"reason": "customer complaint"})),
            200,
        )
        .await;
    assert_eq!(
        (r["status"].as_str(), r["amount"].as_i64()),
        (Some("refunded"), Some(2 * GOLD))
    );
    let again = app
        .admin_ok(&t, Method::POST, &path, Some(json!({"reason": "twice"})), 200)
        .await;
    assert_eq!(again, r, "idempotent: the first refund's answer");
    // A bodiless replay (the reason is optional) says it is one.
    let resp = app.client.post(app.url(&path)).bearer_auth(&t).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(app.balance_of(&k).await, 100_000, "credited once");
    let resp = app
        .admin(&t, Method::POST, "/admin/v1/orders/ord_nope/refund", Some(json!({})))
        .await;
    assert_eq!(error_of(resp).await.1, "not_found");

    // The reseller still sees the order, now refunded.
    let seen: serde_json::Value = app
        .signed(&k, Method::GET, &format!("/v1/orders/{id}"), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(seen["status"], "refunded");
    // The rest of the stock sells; the refunded codes never come back.
    let (s, rest, _) = app.order(&k, order_body(SKU, 2, "R-2")).await;
    assert_eq!(s, 201);
    assert!(codes_of(&rest).iter().all(|c| !refunded_codes.contains(c)));
    let resp = app.post_order(&k, order_body(SKU, 1, "R-3")).await;
    assert_eq!(error_of(resp).await.1, "out_of_stock");
    let report = app.assert_reconciled(&t).await;
    assert_eq!(
        (
            report["products"][0]["voided"].as_i64(),
            report["products"][0]["delivered"].as_i64()
        ),
        (Some(2), Some(2))
    );

    // The operator's order search sees both, with filters and paging.
    let all = app
        .admin_ok(&t, Method::GET, "/admin/v1/orders?limit=1", None, 200)
        .await;
    assert_eq!(all["orders"].as_array().unwrap().len(), 1);
    assert_eq!(all["orders"][0]["merchant_order_no"], "R-2", "newest first");
    assert!(all["orders"][0].get("codes").is_none(), "the search never shows codes");
    let cursor = all["next_cursor"].as_str().unwrap();
    let next = app
        .admin_ok(
            &t,
            Method::GET,
            &format!("/admin/v1/orders?limit=1&cursor={cursor}"),
            None,
            200,
        )
        .await;
    assert_eq!(next["orders"][0]["merchant_order_no"], "R-1");
    assert_eq!(
        next["next_cursor"],
        serde_json::Value::Null,
        "the last page, though full, has no cursor to an empty one"
    );
    // An offset's `+` sent unencoded still reads as a time; an empty range, a parameter
    // given twice, are refused.
    let plus = app
        .admin_ok(
            &t,
            Method::GET,
            "/admin/v1/orders?from=2020-01-01T08:00:00+08:00",
            None,
            200,
        )
        .await;
    assert_eq!(plus["orders"].as_array().unwrap().len(), 2);
    for q in ["from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "sku=a&sku=b"] {
        let resp = app.admin(&t, Method::GET, &format!("/admin/v1/orders?{q}"), None).await;
        assert_eq!(error_of(resp).await.1, "invalid_request", "{q}");
    }
    let mine = app
        .admin_ok(
            &t,
            Method::GET,
            &format!(
                "/admin/v1/orders?reseller_id={}&sku={SKU}&status=refunded",
                k.reseller_id
            ),
            None,
            200,
        )
        .await;
    assert_eq!(mine["orders"].as_array().unwrap().len(), 1);
    let none = app
        .admin_ok(&t, Method::GET, "/admin/v1/orders?sku=other", None, 200)
        .await;
    assert!(none["orders"].as_array().unwrap().is_empty());
}

/// The pool's first code pushed again, so that Redis holds it twice, as a bug could.
pub async fn hold_the_head_twice(r: &mut (impl redis::aio::ConnectionLike + Send), pool: &str) {
    let head: Vec<u8> = redis::cmd("LINDEX").arg(pool).arg(0).query_async(r).await.unwrap();
    let _: i64 = redis::cmd("LPUSH").arg(pool).arg(&head).query_async(r).await.unwrap();
}

/// A code put into Redis twice (corrupted stock) is still delivered at most once: the
/// Postgres constraint refuses the second delivery and the order is served from other
/// stock.
#[tokio::test]
async fn the_last_guard_delivers_a_duplicated_code_at_most_once() {
    let (app, t, _) = shop(3).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let key = app.import_pool(app.product_pk(SKU).await);
    let mut r = app.redis().await;
    hold_the_head_twice(&mut r, &key).await;
    let guard_before = last_guard_hits(&app).await;

    // Both copies in one order: refused as it stands, completed from other stock.
    let (s, first, _) = app.order(&k, order_body(SKU, 2, "G-1")).await;
    assert_eq!(s, 201, "{first}");
    let mut delivered = codes_of(&first);
    assert_ne!(delivered[0], delivered[1]);
    let (s, second, _) = app.order(&k, order_body(SKU, 1, "G-2")).await;
    assert_eq!(s, 201, "{second}");
    delivered.extend(codes_of(&second));
    let resp = app.post_order(&k, order_body(SKU, 1, "G-3")).await;
    assert_eq!(error_of(resp).await.1, "out_of_stock");
    assert_eq!(delivered.iter().collect::<HashSet<_>>().len(), 3);
    assert_eq!(
        app.balance_of(&k).await,
        100_000 - 3 * GOLD,
        "charged for what was delivered"
    );
    assert!(
        last_guard_hits(&app).await > guard_before,
        "the guard fired and was counted"
    );

    // Now the copy comes after its original was sold.
    let (app2, t2, _) = shop(2).await;
    let k2 = buyer(&app2, &t2, "gold", 100_000).await;
    let (s, one, _) = app2.order(&k2, order_body(SKU, 1, "H-1")).await;
    assert_eq!(s, 201);
    let key2 = app2.import_pool(app2.product_pk(SKU).await);
    let db = app2.db().await;
    let row = db
        .query_one(
            "SELECT c.id, c.code_enc FROM codes c JOIN order_codes oc ON oc.code_id = c.id",
            &[],
        )
        .await
        .unwrap();
    let mut element = row.get::<_, i64>(0).to_be_bytes().to_vec();
    element.extend_from_slice(row.get::<_, &[u8]>(1));
    let mut r2 = app2.redis().await;
    let _: i64 = redis::cmd("LPUSH")
        .arg(&key2)
        .arg(&element)
        .query_async(&mut r2)
        .await
        .unwrap();
    let (s, two, _) = app2.order(&k2, order_body(SKU, 1, "H-2")).await;
    assert_eq!(s, 201, "{two}");
    assert_ne!(codes_of(&two), codes_of(&one), "the sold code is not sold again");
    assert_eq!(app2.stock_len(SKU).await, 0, "the stray copy is gone");
    app2.assert_reconciled(&t2).await;
}

async fn last_guard_hits(app: &TestApp) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with("cardgate_last_guard_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn batches_are_all_or_nothing_on_shape_and_tokens_but_per_order_on_outcome() {
    let (app, t, _) = shop(3).await;
    let k = buyer(&app, &t, "standard", 1_000_000).await;
    let batch = |orders: Vec<serde_json::Value>| json!({ "orders": orders }).to_string();

    let resp = app
        .signed(
            &k,
            Method::POST,
            "/v1/orders/batch",
            Some(&batch(vec![
                order_body(SKU, 2, "B-1"),
                order_body(SKU, 2, "B-2"),
                json!({"sku": SKU, "quantity": 1}),
                order_body(SKU, 1, "B-4"),
            ])),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    let mons: Vec<_> = results.iter().map(|r| r["merchant_order_no"].clone()).collect();
    assert_eq!(
        mons,
        vec![json!("B-1"), json!("B-2"), json!(null), json!("B-4")],
        "in the order given"
    );
    assert_eq!(results[2]["status"], 400);
    assert_eq!(results[2]["error"]["code"], "invalid_request");
    // Three codes, five asked for by the valid orders: one of the two-code orders fails.
    let statuses: Vec<i64> = results.iter().map(|r| r["status"].as_i64().unwrap()).collect();
    let sold: usize = results
        .iter()
        .filter(|r| r["status"] == 201)
        .map(|r| codes_of(&r["order"]).len())
        .sum();
    assert!(
        sold <= 3 && statuses.iter().filter(|s| **s == 409).count() >= 1,
        "{body}"
    );
    for r in results.iter().filter(|r| r["status"] == 409) {
        assert_eq!(r["error"]["code"], "out_of_stock");
    }

    // Replays inside a batch are replays.
    let resp = app
        .signed(
            &k,
            Method::POST,
            "/v1/orders/batch",
            Some(&batch(vec![order_body(SKU, 1, "B-4")])),
        )
        .await;
    let body: serde_json::Value = resp.json().await.unwrap();
    let was = results[3]["status"].as_i64().unwrap();
    assert_eq!(
        body["results"][0]["status"],
        if was == 201 { 200 } else { 409 },
        "{body}"
    );

    // Duplicate numbers, empty and over-cap batches: refused whole, nothing processed.
    let before = app.stock_len(SKU).await;
    for bad in [
        batch(vec![order_body(SKU, 1, "D-1"), order_body(SKU, 1, "D-1")]),
        // a duplicate whose other copy is malformed is a duplicate all the same
        batch(vec![
            order_body(SKU, 1, "D-2"),
            json!({"merchant_order_no": "D-2", "sku": SKU, "quantity": 0}),
        ]),
        batch(vec![]),
        batch((0..11).map(|i| order_body(SKU, 1, &format!("C-{i}"))).collect()),
        json!({"orders": "no"}).to_string(),
        json!({"orders": [order_body(SKU, 1, "U-1")], "dry_run": true}).to_string(),
    ] {
        let resp = app.signed(&k, Method::POST, "/v1/orders/batch", Some(&bad)).await;
        assert_eq!(error_of(resp).await.1, "invalid_request", "{bad}");
    }
    assert_eq!(app.stock_len(SKU).await, before);
    let d2: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM orders WHERE merchant_order_no = 'D-2'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(d2, 0, "nothing of a refused batch is processed");

    // A batch over the tier's cap (10 for standard) is refused for one token, not eleven.
    let fresh = buyer(&app, &t, "standard", 1_000_000).await;
    let over = batch((0..11).map(|i| order_body(SKU, 1, &format!("O-{i}"))).collect());
    let resp = app.signed(&fresh, Method::POST, "/v1/orders/batch", Some(&over)).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["ratelimit-limit"], "40");
    assert_eq!(resp.headers()["ratelimit-remaining"], "39");
    // So is one that names a number twice, whatever its size.
    let twice = batch((0..10).map(|i| order_body(SKU, 1, &format!("W-{}", i % 9))).collect());
    let resp = app.signed(&fresh, Method::POST, "/v1/orders/batch", Some(&twice)).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["ratelimit-remaining"], "38");
    // And one with another field, or a string holding NUL: refused whole, one token.
    let items: Vec<serde_json::Value> = (0..10).map(|i| order_body(SKU, 1, &format!("F-{i}"))).collect();
    let mut nul = items.clone();
    nul[3]["merchant_order_no"] = json!("F\u{0}3");
    for (body, left) in [
        (json!({"orders": items, "dry_run": true}).to_string(), "37"),
        (json!({ "orders": nul }).to_string(), "36"),
    ] {
        let resp = app.signed(&fresh, Method::POST, "/v1/orders/batch", Some(&body)).await;
        assert_eq!(resp.status(), 400, "{body}");
        assert_eq!(resp.headers()["ratelimit-remaining"], left, "{body}");
    }

    // The standard tier's write burst is 40: a batch that needs more tokens than are
    // left is refused whole (a fresh reseller, so no earlier call spent any).
    let k = buyer(&app, &t, "standard", 1_000_000).await;
    let ten = |n: usize| {
        batch(
            (0..10)
                .map(|i| order_body("no-such", 1, &format!("T-{n}-{i}")))
                .collect(),
        )
    };
    let mut refused_at = None;
    for n in 0..5 {
        let resp = app.signed(&k, Method::POST, "/v1/orders/batch", Some(&ten(n))).await;
        if resp.status() == 429 {
            assert!(resp.headers().contains_key("retry-after"));
            refused_at = Some(n);
            break;
        }
    }
    assert_eq!(refused_at, Some(4), "four batches of ten take the 40 tokens");
    let orders: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert!(orders <= 3);
    app.assert_reconciled(&t).await;
}

/// Behind the ledger's own checks, Postgres refuses a delivered code in a second order
/// whatever writes it (`delivered_code_unique`).
#[tokio::test]
async fn postgres_refuses_a_code_delivered_twice_whatever_writes_it() {
    let (app, t, _) = shop(1).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let (status, order, _) = app.order(&k, order_body(SKU, 1, "G-1")).await;
    assert_eq!(status, 201, "{order}");
    let mut db = app.db().await;
    let tx = db.transaction().await.unwrap();
    let second: i64 = tx
        .query_one(
            "INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
             SELECT 'ord_second', reseller_id, 'G-2', product_id, sku, 1, 0, 0, currency, now() FROM orders WHERE merchant_order_no = 'G-1'
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let e = tx
        .execute(
            "INSERT INTO order_codes (order_id, code_id, position)
             SELECT $1, oc.code_id, 0 FROM order_codes oc JOIN orders o ON o.id = oc.order_id
              WHERE o.merchant_order_no = 'G-1'",
            &[&second],
        )
        .await
        .expect_err("a delivered code went into a second order");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "{e}"
    );
    drop(tx);
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn reconciliation_catches_what_it_claims_to_catch() {
    let (app, t, _) = shop(3).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    assert_eq!(app.order(&k, order_body(SKU, 1, "X-1")).await.0, 201);
    app.assert_reconciled(&t).await;

    // A sellable code lost from Redis.
    let key = app.import_pool(app.product_pk(SKU).await);
    let mut r = app.redis().await;
    let lost: Vec<u8> = redis::cmd("LPOP").arg(&key).query_async(&mut r).await.unwrap();
    let report = app.admin_ok(&t, Method::GET, "/admin/v1/reconcile", None, 200).await;
    assert_eq!(report["ok"], false);
    assert!(
        report["problems"].to_string().contains("missing from Redis"),
        "{report}"
    );
    let _: i64 = redis::cmd("RPUSH")
        .arg(&key)
        .arg(&lost)
        .query_async(&mut r)
        .await
        .unwrap();

    // A hot balance that drifted from the ledger.
    let bal = format!("{}:*:bal:*", app.redis_prefix());
    let keys: Vec<String> = redis::cmd("KEYS").arg(&bal).query_async(&mut r).await.unwrap();
    let _: i64 = redis::cmd("INCRBY")
        .arg(&keys[0])
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap();
    let report = app.admin_ok(&t, Method::GET, "/admin/v1/reconcile", None, 200).await;
    assert!(report["problems"].to_string().contains("hot balance"), "{report}");
    let _: i64 = redis::cmd("DECRBY")
        .arg(&keys[0])
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap();
    app.assert_reconciled(&t).await;

    // Each fault below is planted, named by the report, and taken back.
    let problems = |want: &'static str| {
        let (app, t) = (&app, &t);
        async move {
            let report = app.admin_ok(t, Method::GET, "/admin/v1/reconcile", None, 200).await;
            assert_eq!(report["ok"], false, "{want}: {report}");
            assert!(report["problems"].to_string().contains(want), "{want}: {report}");
        }
    };
    // A code held twice in Redis, which the conservation sum counts twice too.
    hold_the_head_twice(&mut r, &key).await;
    problems("held twice in Redis").await;
    problems("imported 3 != available 3 + in flight 0 + delivered 1").await;
    let _: Vec<u8> = redis::cmd("LPOP").arg(&key).query_async(&mut r).await.unwrap();
    app.assert_reconciled(&t).await;

    // A code Postgres no longer sells, still in Redis; and marked delivered by no order.
    let db = app.db().await;
    let code: i64 = db
        .query_one(
            "SELECT id FROM codes WHERE status = 'available' ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mark = |status: &'static str| {
        let db = &db;
        async move {
            db.execute("UPDATE codes SET status = $2 WHERE id = $1", &[&code, &status])
                .await
                .unwrap();
        }
    };
    mark("delivered").await;
    problems("not sellable in Postgres").await;
    problems("2 codes marked delivered, 1 delivered by fulfilled orders").await;
    mark("available").await;
    app.assert_reconciled(&t).await;

    // Last, as orders are append-only: an order that holds none of its codes.
    db.execute(
        "INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
         SELECT 'ord_empty', reseller_id, 'X-EMPTY', product_id, sku, 1, 0, 0, currency, now() FROM orders WHERE merchant_order_no = 'X-1'",
        &[],
    )
    .await
    .unwrap();
    problems("orders do not hold exactly their quantity of codes").await;
}

/// Two gateways share the outbox: an order taken by one may be committed by the other's
/// ledger writer, which then wakes the waiting request over Redis.
#[tokio::test]
async fn orders_committed_by_another_gateways_writer_are_answered_promptly() {
    let mut env = {
        let db = create_database().await;
        test_env(&db)
    };
    env.insert("CARDGATE_ORDERS__LEDGER_WRITERS".into(), "1".into());
    // A short commit timeout: a request left waiting would fail instead of passing late.
    env.insert("CARDGATE_ORDERS__COMMIT_TIMEOUT_MS".into(), "3000".into());
    let a = Arc::new(start(env.clone()).await);
    env.insert("CARDGATE_ORDERS__LEDGER_WRITERS".into(), "4".into());
    let b = start(env).await;
    let t = a.root_token().await;
    a.create_product(&t, SKU).await;
    let codes: Vec<String> = (0..60).map(|i| format!("TWO-{i}-{}", random_suffix())).collect();
    assert_eq!(a.import_codes(&t, SKU, codes.join("\n")).await.status(), 200);
    let k = Arc::new(buyer(&a, &t, "diamond", 10_000_000).await);

    let mut tasks = Vec::new();
    for i in 0..60 {
        let (a, k) = (a.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let (s, body, _) = a.order(&k, order_body(SKU, 1, &format!("TWO-{i}"))).await;
            (s, body, started.elapsed())
        }));
    }
    let mut delivered = HashSet::new();
    for task in tasks {
        let (s, body, took) = task.await.unwrap();
        assert_eq!(s, 201, "{body}");
        assert!(took < std::time::Duration::from_secs(2), "answered in {took:?}");
        delivered.extend(codes_of(&body));
    }
    assert_eq!(delivered.len(), 60);
    // Most of the outbox went to B's four writers; every order was answered on A.
    let settled_elsewhere = b.get("/metrics").await.text().await.unwrap();
    assert!(settled_elsewhere.contains("cardgate_ledger_batch_size_count"));
    a.assert_reconciled(&t).await;
}

/// An order's nonce is spent by the reservation script itself (one Redis round trip per
/// order): a replayed request must still be refused before anything is taken, whether
/// the first was placed, refused, malformed, a batch, or a read.
#[tokio::test]
async fn a_replayed_order_request_is_refused_and_takes_nothing() {
    let (app, t, _) = shop(30).await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;
    let now = now_secs();
    let send = |path: &'static str, method: Method, body: Option<String>, n: String| {
        let req = app.signed_request(&k, method, path, body.as_deref(), now, &n, &[]);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let v: serde_json::Value = resp.json().await.unwrap();
            (status, v["error"]["code"].as_str().map(str::to_owned))
        }
    };
    let reused = (401, Some("nonce_reused".to_string()));

    // Placed, then the identical request again: not the idempotent replay, a refusal.
    let n = nonce();
    let body = order_body(SKU, 1, "M-NONCE-1").to_string();
    assert_eq!(
        send("/v1/orders", Method::POST, Some(body.clone()), n.clone()).await.0,
        201
    );
    assert_eq!(send("/v1/orders", Method::POST, Some(body), n).await, reused);

    // Twenty copies at once: one order, nineteen refusals.
    let n = nonce();
    let body = order_body(SKU, 1, "M-NONCE-2").to_string();
    let answers = futures_util::future::join_all(
        (0..20).map(|_| send("/v1/orders", Method::POST, Some(body.clone()), n.clone())),
    )
    .await;
    assert_eq!(answers.iter().filter(|a| a.0 == 201).count(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|a| **a == reused).count(), 19, "{answers:?}");

    // Refused by the script (no such product), malformed, a batch, a read: each nonce
    // counts as used.
    for (path, method, body) in [
        (
            "/v1/orders",
            Method::POST,
            Some(order_body("no-such-sku", 1, "M-NONCE-3").to_string()),
        ),
        ("/v1/orders", Method::POST, Some("{\"sku\":".to_string())),
        (
            "/v1/orders/batch",
            Method::POST,
            Some(json!({"orders": [order_body(SKU, 1, "M-NONCE-4")]}).to_string()),
        ),
        ("/v1/balance", Method::GET, None),
    ] {
        let n = nonce();
        let first = send(path, method.clone(), body.clone(), n.clone()).await;
        assert_ne!(first, reused, "{path}: the first use");
        assert_eq!(send(path, method, body, n).await, reused, "{path}: the replay");
    }
    // A nonce spent on a read cannot be used for an order.
    let n = nonce();
    assert_eq!(send("/v1/balance", Method::GET, None, n.clone()).await.0, 200);
    let body = order_body(SKU, 1, "M-NONCE-5").to_string();
    assert_eq!(send("/v1/orders", Method::POST, Some(body), n).await, reused);

    // Three orders were placed (1, 2 and the batch's 4), each charged once.
    assert_eq!(app.balance_of(&k).await, 1_000_000 - 3 * GOLD);
    assert_eq!(app.stock_len(SKU).await, 27);
    app.assert_reconciled(&t).await;
}

/// A replay in a batch shows codes again only once its reveal is audited; when that
/// write fails, that order is an error without its codes and the others are answered.
#[tokio::test]
async fn a_batch_replay_whose_audit_fails_withholds_only_its_own_codes() {
    let (app, t, _) = shop(10).await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;
    let (s1, first, _) = app.order(&k, order_body(SKU, 1, "AUDIT-1")).await;
    let (s2, _, _) = app.order(&k, order_body(SKU, 1, "AUDIT-2")).await;
    assert_eq!((s1, s2), (201, 201));
    let doomed = first["order_id"].as_str().unwrap().to_string();
    // The audit log refuses this one order's reveal.
    let db = app.db().await;
    db.batch_execute(&format!(
        "CREATE FUNCTION refuse_reveal() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'audit unavailable'; END $$;
         CREATE TRIGGER refuse_reveal BEFORE INSERT ON audit_log FOR EACH ROW
           WHEN (NEW.action = 'order.reveal' AND NEW.target = '{doomed}') EXECUTE FUNCTION refuse_reveal();"
    ))
    .await
    .unwrap();
    let body = json!({"orders": [order_body(SKU, 1, "AUDIT-1"), order_body(SKU, 1, "AUDIT-2"), order_body(SKU, 1, "AUDIT-3")]});
    let resp = app
        .signed(&k, Method::POST, "/v1/orders/batch", Some(&body.to_string()))
        .await;
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["status"], 500, "{v:#}");
    assert_eq!(r[0]["error"]["code"], "internal_error", "{v:#}");
    assert!(r[0].get("order").is_none(), "codes shown without an audit: {v:#}");
    assert_eq!(r[1]["status"], 200, "{v:#}");
    assert_eq!(codes_of(&r[1]["order"]).len(), 1);
    assert_eq!(r[2]["status"], 201, "{v:#}");
    let audited: i64 = db
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'order.reveal' AND target = $1",
            &[&doomed],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 0);
}

/// A replayed signed read of an order is refused before the order is loaded: no second
/// decryption of its codes, no second reveal in the audit log.
#[tokio::test]
async fn a_replayed_order_read_reveals_nothing_and_audits_no_second_reveal() {
    let (app, t, _) = shop(2).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let (status, order, _) = app.order(&k, order_body(SKU, 1, "M-REPLAYED-READ")).await;
    assert_eq!(status, 201, "{order}");
    let id = order["order_id"].as_str().unwrap();
    let db = app.db().await;
    let reveals = || async {
        db.query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'order.reveal' AND target = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    for path in [
        format!("/v1/orders/{id}"),
        "/v1/orders?merchant_order_no=M-REPLAYED-READ".to_string(),
    ] {
        let (n, now) = (nonce(), now_secs());
        let before = reveals().await;
        let first = app.signed_at(&k, Method::GET, &path, None, now, &n, &[]).await;
        assert_eq!(first.status(), 200, "{path}");
        assert_eq!(reveals().await, before + 1, "{path}: the read is audited");
        let replay = app.signed_at(&k, Method::GET, &path, None, now, &n, &[]).await;
        let (status, code, _) = error_of(replay).await;
        assert_eq!((status, code.as_str()), (401, "nonce_reused"), "{path}");
        assert_eq!(reveals().await, before + 1, "{path}: the replay revealed nothing");
    }
}

/// A reservation script that runs twice is one order. A cluster connection sends a script
/// again when its first answer was lost to a failing node; the second run must find its
/// own reservation (the request then waits for its commit, docs/design.md), not refuse
/// the nonce it spent itself, while a true replay of that nonce is still refused.
#[tokio::test]
async fn a_reservation_sent_twice_finds_its_own_order_and_not_a_reused_nonce() {
    use cardgate::reserve::{fingerprint, reserve, reserve_cmd, Fulfilment, Guards, Refusal, Reserved, Sourcing};
    let (app, t, _) = shop_with(2, |env| {
        env.insert("CARDGATE_REDIS__CELLS".into(), "1".into());
    })
    .await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let keys = app.keys();
    let f = Fulfilment {
        order_id: cardgate::ids::order_id(),
        reseller: app.reseller_pk(&k.reseller_id).await,
        merchant_order_no: "TWICE-1".into(),
        product: app.product_pk(SKU).await,
        sku: SKU.into(),
        quantity: 1,
        unit_price: GOLD,
        amount: GOLD,
        created_at: Clock::System.now_unix_secs(),
        created_ms: 0,
        key_id: k.key_id.clone(),
    };
    let fp = fingerprint(SKU, 1);
    // A signed request's reservation, with its nonce.
    let cmd = |f: &Fulfilment, nonce: &str, sourcing| {
        let nonce = keys.nonce(f.reseller, &k.key_id, nonce);
        reserve_cmd(
            &keys,
            f,
            &fp,
            None,
            3600,
            Some(&nonce),
            None,
            &Guards::default(),
            sourcing,
            false,
            "",
        )
    };
    // Sends it twice: the second run finds the first's reservation, pending, and whether it
    // went upstream; returns what the first run answered.
    let sent_twice = async |r: &mut redis::aio::MultiplexedConnection,
                            f: &Fulfilment,
                            nonce: &str,
                            sourcing: Sourcing,
                            upstream: bool| {
        let first = reserve(r, &cmd(f, nonce, sourcing)).await.unwrap();
        let again = reserve(r, &cmd(f, nonce, sourcing)).await.unwrap();
        assert_eq!(
            again.reserved,
            Reserved::Seen {
                pending: true,
                fingerprint: fp.clone(),
                order_id: f.order_id.clone(),
                upstream
            }
        );
        first.reserved
    };
    let nonce = "sent-twice-0000001";
    let mut r = app.redis().await;
    let first = sent_twice(&mut r, &f, nonce, Sourcing::Local, false).await;
    assert!(matches!(first, Reserved::Ok { .. }), "{first:?}");
    let other = Fulfilment {
        order_id: cardgate::ids::order_id(),
        merchant_order_no: "TWICE-2".into(),
        ..f.clone()
    };
    let replay = reserve(&mut r, &cmd(&other, nonce, Sourcing::Local)).await.unwrap();
    assert_eq!(replay.reserved, Reserved::Refused(Refusal::NonceReused));

    // The gateway's writer commits the one reservation: one order, one code, one charge.
    let db = app.db().await;
    let committed = eventually(std::time::Duration::from_secs(10), || async {
        let n: i64 = db
            .query_one("SELECT count(*) FROM orders WHERE reseller_id = $1", &[&f.reseller])
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    assert!(committed, "the reservation was committed");
    assert_eq!(app.balance_of(&k).await, 100_000 - GOLD);
    assert_eq!(app.stock_len(SKU).await, 1);
    app.assert_reconciled(&t).await;

    // One to be bought upstream says so when sent again: the request must begin its
    // purchase itself, since no outbox entry will commit it.
    let up = Fulfilment {
        order_id: cardgate::ids::order_id(),
        merchant_order_no: "TWICE-UP".into(),
        ..f.clone()
    };
    let first = sent_twice(&mut r, &up, "sent-twice-0000002", Sourcing::Only, true).await;
    assert!(matches!(first, Reserved::Upstream { .. }), "{first:?}");
}
