//! Operator reports (docs/api.md §4, "Reports"): figures checked against orders placed through
//! the API and moved back in time, JSON and CSV, and the rollup against the orders.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::orders::{buyer, shop, SKU};

fn at(days_ago: f64) -> String {
    let t = Clock::System.now() - time::Duration::seconds_f64(days_ago * 86_400.0);
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

async fn report(app: &TestApp, t: &str, which: &str, from: &str, to: &str) -> Value {
    let q = format!(
        "/admin/v1/reports/{which}?from={}&to={}",
        from.replace('+', "%2B"),
        to.replace('+', "%2B")
    );
    app.admin_ok(t, reqwest::Method::GET, &q, None, 200).await
}

fn line<'a>(r: &'a Value, key: &str, field: &str, value: &str) -> &'a Value {
    r[key]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l[field] == value)
        .unwrap_or_else(|| panic!("{value} in {r:#}"))
}

#[tokio::test]
async fn reseller_loyalty_and_product_sales_over_a_range() {
    let (app, t, _) = shop(20).await;
    let steady = buyer(&app, &t, "silver", 1_000_000).await;
    let gone = buyer(&app, &t, "gold", 1_000_000).await;
    let idle = buyer(&app, &t, "silver", 0).await;
    let db = app.db().await;
    // Each order is placed now, then moved to the day it stands for (the rollup follows).
    // Orders are append-only ledger entries; only a test may move one in time.
    db.batch_execute("ALTER TABLE orders DISABLE TRIGGER orders_append_only")
        .await
        .unwrap();
    let place = async |k: &ResellerKey, mon: &str, quantity: i64, days_ago: f64| {
        let (status, body, _) = app.order(k, order_body(SKU, quantity, mon)).await;
        assert_eq!(status, 201, "{body}");
        db.execute(
            "UPDATE orders SET created_at = now() - $2 * interval '1 day' WHERE merchant_order_no = $1",
            &[&mon, &days_ago],
        )
        .await
        .unwrap();
        body
    };
    // steady: every 10 days, the last today; one more today that is refunded.
    place(&steady, "s-1", 1, 20.0).await;
    place(&steady, "s-2", 2, 10.0).await;
    place(&steady, "s-3", 1, 0.0).await;
    let refunded = place(&steady, "s-4", 3, 0.0).await;
    // gone: three days in a row, 40 to 38 days ago, then nothing.
    place(&gone, "g-1", 1, 40.0).await;
    place(&gone, "g-2", 1, 39.0).await;
    place(&gone, "g-3", 1, 38.0).await;
    let path = format!("/admin/v1/orders/{}/refund", refunded["order_id"].as_str().unwrap());
    app.admin_ok(&t, reqwest::Method::POST, &path, Some(json!({"reason": "test"})), 200)
        .await;

    let r = report(&app, &t, "resellers", &at(60.0), &at(-1.0 / 24.0)).await;
    let s = line(&r, "resellers", "reseller_id", &steady.reseller_id);
    assert_eq!(
        (s["orders"].as_i64(), s["codes"].as_i64(), s["amount"].as_i64()),
        (Some(3), Some(4), Some(4 * 9800))
    );
    assert_eq!(
        (s["average_order_value"].as_i64(), s["currency"].as_str()),
        (Some(13067), Some("CNY")),
        "money in whole minor units, with its currency"
    );
    assert_eq!(s["active_days"], 3);
    assert_eq!(
        s["repeat_purchase_rate"].as_f64(),
        Some(0.67),
        "two of three buying days were followed within 30 days"
    );
    assert_eq!(s["usual_gap_days"].as_f64(), Some(10.0));
    assert!(s["days_since_last_order"].as_f64().is_some_and(|d| d < 0.1));
    assert_eq!(s["churn_risk"], false);
    let g = line(&r, "resellers", "reseller_id", &gone.reseller_id);
    assert_eq!(
        (g["orders"].as_i64(), g["amount"].as_i64(), g["active_days"].as_i64()),
        (Some(3), Some(3 * 9650), Some(3))
    );
    assert_eq!(g["usual_gap_days"].as_f64(), Some(1.0));
    assert!(g["days_since_last_order"]
        .as_f64()
        .is_some_and(|d| (37.9..38.1).contains(&d)));
    assert_eq!(g["churn_risk"], true, "38 days since the last order, usually 1: {g}");
    let i = line(&r, "resellers", "reseller_id", &idle.reseller_id);
    assert_eq!(
        (i["orders"].as_i64(), &i["average_order_value"], &i["churn_risk"]),
        (Some(0), &Value::Null, &json!(false))
    );

    // Partial days only (no whole day inside): the edges are read from orders.
    let narrow = report(&app, &t, "resellers", &at(39.5), &at(38.5)).await;
    let g = line(&narrow, "resellers", "reseller_id", &gone.reseller_id);
    assert_eq!(g["orders"], 1, "only the order 39 days ago: {narrow:#}");
    assert_eq!(
        line(&narrow, "resellers", "reseller_id", &steady.reseller_id)["orders"],
        0
    );

    let p = report(&app, &t, "products", &at(60.0), &at(0.0)).await;
    let sku = line(&p, "products", "sku", SKU);
    assert_eq!((sku["orders"].as_i64(), sku["codes_sold"].as_i64()), (Some(6), Some(7)));
    assert_eq!(sku["amount"].as_i64(), Some(4 * 9800 + 3 * 9650));
    // 20 imported, 10 delivered of which 3 refunded and voided.
    assert_eq!(sku["available"], 10);
    assert!((p["days"].as_f64().unwrap() - 60.0).abs() < 0.02);
    assert!((sku["sell_rate_per_day"].as_f64().unwrap() - 7.0 / 60.0).abs() < 0.01);
    assert!((sku["days_of_stock"].as_f64().unwrap() - 10.0 / (7.0 / 60.0)).abs() < 1.0);
    let nothing = report(&app, &t, "products", &at(200.0), &at(100.0)).await;
    let sku = line(&nothing, "products", "sku", SKU);
    assert_eq!(
        (sku["codes_sold"].as_i64(), &sku["days_of_stock"]),
        (Some(0), &Value::Null)
    );

    // The rollups agree with the orders they summarise.
    db.execute("SELECT sales_fold()", &[]).await.unwrap();
    let rollup: Vec<(i64, i64, i64)> = db
        .query(
            "SELECT (SELECT coalesce(sum(orders), 0)::bigint FROM reseller_daily),
                    (SELECT coalesce(sum(codes), 0)::bigint FROM product_daily),
                    (SELECT count(*) FROM orders WHERE status = 'fulfilled')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rollup, vec![(6, 7, 6)]);
}

#[tokio::test]
async fn reports_come_as_csv_and_refuse_bad_ranges() {
    let (app, t, _) = shop(5).await;
    let k = buyer(&app, &t, "silver", 100_000).await;
    assert_eq!(app.order(&k, order_body(SKU, 2, "csv-1")).await.0, 201);
    for (which, header) in [
        (
            "resellers",
            "reseller_id,name,tier,orders,codes,amount,currency,average_order_value,active_days",
        ),
        (
            "products",
            "sku,name,status,orders,codes_sold,amount,currency,sell_rate_per_day,available,days_of_stock",
        ),
    ] {
        let resp = app
            .client
            .get(app.url(&format!("/admin/v1/reports/{which}")))
            .bearer_auth(&t)
            .header("accept", "text/csv")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
        let text = resp.text().await.unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with(header), "{which}: {text}");
        assert_eq!(lines.len(), 2, "a header and one line: {text}");
        assert!(lines[1].contains(",2,"), "the order's two codes: {text}");
    }
    for q in ["from=yesterday", "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z"] {
        let resp = app
            .admin(
                &t,
                reqwest::Method::GET,
                &format!("/admin/v1/reports/resellers?{q}"),
                None,
            )
            .await;
        let (status, code, _) = error_of(resp).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{q}");
    }
}

/// Commits append to `sales_pending` and folds move it into the rollups, concurrently
/// with each other and with refunds: nothing is counted twice or lost.
#[tokio::test]
async fn folds_racing_commits_and_refunds_count_every_order_once() {
    let (app, t, _) = shop(120).await;
    let buyers = [
        buyer(&app, &t, "gold", 10_000_000).await,
        buyer(&app, &t, "silver", 10_000_000).await,
    ];
    let db = app.db().await;
    let folding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let folder = {
        let (db, folding) = (app.db().await, folding.clone());
        tokio::spawn(async move {
            let mut folds = 0;
            while folding.load(std::sync::atomic::Ordering::Relaxed) {
                db.execute("SELECT sales_fold()", &[]).await.unwrap();
                folds += 1;
            }
            folds
        })
    };
    let orders = futures_util::future::join_all((0..100).map(|i| {
        let (app, k) = (&app, &buyers[i % 2]);
        async move { app.order(k, order_body(SKU, 1, &format!("FOLD-{i}"))).await }
    }))
    .await;
    let ids: Vec<String> = orders
        .iter()
        .map(|(s, o, _)| {
            assert_eq!(*s, 201, "{o}");
            o["order_id"].as_str().unwrap().to_string()
        })
        .collect();
    futures_util::future::join_all(ids.iter().take(30).map(|id| {
        let (app, t) = (&app, &t);
        async move {
            app.admin_ok(t, Method::POST, &format!("/admin/v1/orders/{id}/refund"), None, 200)
                .await
        }
    }))
    .await;
    folding.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(folder.await.unwrap() > 1, "the folds did not race the commits");
    db.execute("SELECT sales_fold()", &[]).await.unwrap();
    let row = db
        .query_one(
            "SELECT (SELECT coalesce(sum(orders), 0)::bigint FROM reseller_daily),
                    (SELECT coalesce(sum(codes), 0)::bigint FROM product_daily),
                    (SELECT coalesce(sum(amount), 0)::bigint FROM reseller_daily),
                    (SELECT coalesce(sum(amount), 0)::bigint FROM orders WHERE status = 'fulfilled'),
                    (SELECT count(*) FROM sales_pending)",
            &[],
        )
        .await
        .unwrap();
    let figures: (i64, i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!((figures.0, figures.1, figures.4), (70, 70, 0), "{figures:?}");
    assert_eq!(figures.2, figures.3, "rollup amount vs fulfilled orders");
}

/// A CSV always has its header row, and no cell an operator typed can run as a formula
/// in the spreadsheet it is opened in.
#[tokio::test]
async fn csv_reports_have_a_header_even_when_empty_and_defuse_formulas() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let csv = |which: &'static str| {
        let (app, t) = (&app, &t);
        async move {
            let resp = app
                .client
                .get(app.url(&format!("/admin/v1/reports/{which}")))
                .bearer_auth(t)
                .header("accept", "text/csv")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.text().await.unwrap()
        }
    };
    assert_eq!(
        csv("products").await,
        "sku,name,status,orders,codes_sold,amount,currency,sell_rate_per_day,available,days_of_stock,\
         upstream_orders,cost,margin,refunded_cost\n"
    );
    assert!(csv("resellers").await.starts_with("reseller_id,name,tier,orders,"));
    assert_eq!(csv("resellers").await.lines().count(), 1);

    app.admin_ok(
        &t,
        Method::POST,
        "/admin/v1/products",
        Some(json!({"sku": "=1+1", "name": "@SUM(A1:A9)", "face_value": 100, "base_price": 90, "max_quantity": 5})),
        201,
    )
    .await;
    app.admin_ok(
        &t,
        Method::POST,
        "/admin/v1/resellers",
        Some(json!({"name": "-2+3", "tier": "gold"})),
        201,
    )
    .await;
    let products = csv("products").await;
    assert!(
        products.contains("\n'=1+1,'@SUM(A1:A9),on_sale,0,0,0,CNY,"),
        "{products}"
    );
    let resellers = csv("resellers").await;
    assert!(resellers.contains(",'-2+3,gold,0,"), "{resellers}");
    // JSON carries the names as they are.
    let json = app
        .admin_ok(&t, Method::GET, "/admin/v1/reports/products", None, 200)
        .await;
    assert_eq!(json["products"][0]["sku"], "=1+1");
}

/// A time the gateway cannot represent (in UTC, or after the day's arithmetic a report
/// does) is `400 invalid_request` naming the parameter on every route that takes times,
/// and the connection stays up; a normal time still answers.
#[tokio::test]
async fn times_outside_what_the_gateway_represents_are_invalid_requests() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let routes = [
        "/admin/v1/reports/resellers",
        "/admin/v1/reports/products",
        "/admin/v1/orders",
        "/admin/v1/audit",
    ];
    let bad = [
        "9999-12-31T23:00:00-05:00",
        "9999-12-31T23:59:59Z",
        "-9999-01-01T00:00:00Z",
        "%2B10000-01-01T00:00:00Z",
        "0000-01-01T00:00:00Z",
        "0000-01-01T00:00:00%2B01:00",
        "1969-12-31T23:59:59Z",
    ];
    for route in routes {
        for param in ["from", "to"] {
            for value in bad {
                let resp = app
                    .client
                    .get(app.url(&format!("{route}?{param}={value}")))
                    .bearer_auth(&t)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{route}?{param}={value}: no answer: {e}"));
                let (status, code, body) = error_of(resp).await;
                assert_eq!(
                    (status, code.as_str()),
                    (400, "invalid_request"),
                    "{route}?{param}={value}"
                );
                let message = body["error"]["message"].as_str().unwrap();
                assert!(
                    message.starts_with(&format!("{param} ")),
                    "{route}?{param}={value}: {message}"
                );
            }
        }
        for good in [
            "from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00%2B08:00",
            "from=1970-01-01T00:00:00Z&to=9998-12-31T23:59:59Z",
            "to=9999-01-01T00:30:00%2B01:00",
        ] {
            app.admin_ok(&t, Method::GET, &format!("{route}?{good}"), None, 200)
                .await;
        }
    }
}
