//! Upstream-filled sales in the products report (`cost`, `margin`, `upstream_orders`,
//! `refunded_cost`; docs/api.md §4 "Reports", §8) and refunds of upstream orders: two real
//! gateways, the upstream one the hub's supplier, as in `upstream.rs`. The hub buys at
//! the upstream's gold price (9650) and sells at its standard price (9800): 150 a code.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::orders::buyer;

const SKU: &str = "GIFT-50";
/// A product of the hub's with no source: sold from its own stock only.
const LOCAL_SKU: &str = "LOCAL-10";
const PRICE: i64 = 9800;
const COST: i64 = 9650;

struct Chain {
    up: TestApp,
    up_token: String,
    hub_key: ResellerKey,
    down: TestApp,
    down_token: String,
    buyer: ResellerKey,
}

/// The upstream holds `codes` codes of `SKU`; the hub has none of it and buys it there.
/// The hub's background loops are the test's to run (`upstream::step`).
async fn chain(codes: usize, answer_within_ms: u64) -> Chain {
    let up = spawn_app().await;
    let up_token = up.root_token().await;
    up.create_product(&up_token, SKU).await;
    let imported: Vec<String> = (0..codes).map(|i| format!("UP-{i:04}-{}", random_suffix())).collect();
    if codes > 0 {
        assert_eq!(up.import_codes(&up_token, SKU, imported.join("\n")).await.status(), 200);
    }
    let hub_key = buyer(&up, &up_token, "gold", 100 * COST).await;

    let down = spawn_app_with(|env| {
        env.insert(
            "CARDGATE_UPSTREAM__ANSWER_WITHIN_MS".into(),
            answer_within_ms.to_string(),
        );
        env.insert(MANUAL_BACKGROUND.into(), "1".into());
    })
    .await;
    let down_token = down.root_token().await;
    down.create_product(&down_token, SKU).await;
    let supplier = down
        .admin_ok(
            &down_token,
            Method::POST,
            "/admin/v1/suppliers",
            Some(json!({"name": "upstream", "protocol": "cardgate", "base_url": up.base,
                        "key_id": hub_key.key_id, "secret": hub_key.secret, "timeout_ms": 5000})),
            201,
        )
        .await;
    let sp = supplier["supplier_id"].as_str().unwrap().to_string();
    down.admin_ok(
        &down_token,
        Method::PATCH,
        &format!("/admin/v1/products/{SKU}"),
        Some(
            json!({"sources": [{"supplier_id": sp, "sku": SKU, "max_unit_cost": PRICE, "priority": 1}],
                    "source_mode": "local_first"}),
        ),
        200,
    )
    .await;
    let buyer = buyer(&down, &down_token, "standard", 10 * PRICE).await;
    Chain {
        up,
        up_token,
        hub_key,
        down,
        down_token,
        buyer,
    }
}

impl Chain {
    async fn assert_clean(&self) {
        self.up.assert_reconciled(&self.up_token).await;
        self.down.assert_reconciled(&self.down_token).await;
    }

    async fn refund(&self, order_id: &str) -> reqwest::Response {
        self.down
            .admin(
                &self.down_token,
                Method::POST,
                &format!("/admin/v1/orders/{order_id}/refund"),
                Some(json!({"reason": "test"})),
            )
            .await
    }

    /// The order as its reseller reads it.
    async fn order_status(&self, order_id: &str) -> String {
        let resp = self
            .down
            .signed(&self.buyer, Method::GET, &format!("/v1/orders/{order_id}"), None)
            .await;
        assert_eq!(resp.status(), 200);
        let got: Value = resp.json().await.unwrap();
        got["status"].as_str().unwrap().to_string()
    }

    /// What a refund would have changed: the buyer's balance (hot and recorded), refund
    /// ledger rows, refund audit rows, voided codes.
    async fn refund_traces(&self) -> (i64, i64, i64, i64, i64) {
        let db = self.down.db().await;
        let count = |sql: &'static str| {
            let db = &db;
            async move { db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        (
            self.down.balance_of(&self.buyer).await,
            self.down.recorded_balance(&self.buyer.reseller_id).await,
            count("SELECT count(*) FROM balance_ledger WHERE kind = 'refund'").await,
            count("SELECT count(*) FROM audit_log WHERE action = 'order.refund'").await,
            count("SELECT count(*) FROM codes WHERE status = 'voided'").await,
        )
    }
}

/// The products report's line for `sku` over `[from, to)`.
async fn report_line(
    app: &TestApp,
    token: &str,
    sku: &str,
    from: time::OffsetDateTime,
    to: time::OffsetDateTime,
) -> Value {
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
            .replace('+', "%2B")
    };
    let r = app
        .admin_ok(
            token,
            Method::GET,
            &format!("/admin/v1/reports/products?from={}&to={}", fmt(from), fmt(to)),
            None,
            200,
        )
        .await;
    r["products"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["sku"] == sku)
        .unwrap_or_else(|| panic!("{sku} in {r:#}"))
        .clone()
}

/// `(orders, codes_sold, amount, upstream_orders, cost, margin, refunded_cost)` of a line.
fn figures(line: &Value) -> [i64; 7] {
    [
        "orders",
        "codes_sold",
        "amount",
        "upstream_orders",
        "cost",
        "margin",
        "refunded_cost",
    ]
    .map(|f| line[f].as_i64().unwrap_or_else(|| panic!("{f} in {line:#}")))
}

/// The line for `sku` read two ways, which must agree: a two-hour range around now (its
/// edges, read from orders and purchases) and yesterday and today as whole UTC days (the
/// rollup; yesterday too, so a test running across midnight reads the same orders).
async fn report_both_ways(app: &TestApp, token: &str, sku: &str) -> [i64; 7] {
    let now = Clock::System.now();
    let edges = figures(
        &report_line(
            app,
            token,
            sku,
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        )
        .await,
    );
    let midnight = now.replace_time(time::Time::MIDNIGHT);
    let day = time::Duration::days(1);
    let whole = figures(&report_line(app, token, sku, midnight - day, midnight + day).await);
    assert_eq!(edges, whole, "edges and rollup agree");
    edges
}

#[tokio::test]
async fn the_products_report_carries_cost_and_margin_of_upstream_filled_sales() {
    let c = chain(10, 3000).await;
    let (down, t) = (&c.down, &c.down_token);
    down.create_product(t, LOCAL_SKU).await;
    let local: Vec<String> = (0..3).map(|i| format!("L-{i}-{}", random_suffix())).collect();
    assert_eq!(down.import_codes(t, LOCAL_SKU, local.join("\n")).await.status(), 200);
    let own: Vec<String> = (0..2).map(|i| format!("OWN-{i}-{}", random_suffix())).collect();
    assert_eq!(down.import_codes(t, SKU, own.join("\n")).await.status(), 200);

    // Two codes of the hub's own stock, then three orders bought upstream (four codes),
    // one of which is refunded; and a sale of the product without sources.
    let mut ids = Vec::new();
    for (mon, quantity) in [("R-1", 2), ("R-2", 1), ("R-3", 2), ("R-4", 1)] {
        let (status, order, _) = down.order(&c.buyer, order_body(SKU, quantity, mon)).await;
        assert_eq!(status, 201, "{mon}: {order}");
        ids.push(order["order_id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        codes_of(&down.order(&c.buyer, order_body(SKU, 2, "R-1")).await.1).len(),
        2,
        "a replay"
    );
    let (status, order, _) = down.order(&c.buyer, order_body(LOCAL_SKU, 1, "R-5")).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(
        c.up.balance_of(&c.hub_key).await,
        100 * COST - 4 * COST,
        "the hub paid 4 codes"
    );
    assert_eq!(c.refund(&ids[3]).await.status(), 200);

    // Sales: the local order (2 codes) and R-2, R-3 (3 codes upstream); R-4 refunded.
    let line = report_both_ways(down, t, SKU).await;
    assert_eq!(
        line,
        [3, 5, 5 * PRICE, 2, 3 * COST, 3 * (PRICE - COST), COST],
        "orders, codes_sold, amount, upstream_orders, cost, margin, refunded_cost"
    );
    assert_eq!(
        report_both_ways(down, t, LOCAL_SKU).await,
        [1, 1, PRICE, 0, 0, 0, 0],
        "no upstream figures for local sales"
    );

    // The same columns in CSV, after the existing ones.
    let resp = down
        .client
        .get(down.url("/admin/v1/reports/products"))
        .bearer_auth(t)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let mut lines = text.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .ends_with(",available,days_of_stock,upstream_orders,cost,margin,refunded_cost"),
        "{text}"
    );
    let row = lines.find(|l| l.starts_with(SKU)).unwrap();
    assert!(
        row.ends_with(&format!(",2,{},{},{COST}", 3 * COST, 3 * (PRICE - COST))),
        "{text}"
    );
    c.assert_clean().await;
}

#[tokio::test]
async fn processing_and_failed_upstream_orders_are_not_refunded_and_a_fulfilled_one_is() {
    // Answer window 0: every upstream order is answered 202 and waits for the step. The
    // upstream has one code: the first order gets it, the second fails.
    let c = chain(1, 0).await;
    let (down, t) = (&c.down, &c.down_token);
    let state = down.state.clone().unwrap();
    let (status, order, _) = down.order(&c.buyer, order_body(SKU, 1, "P-1")).await;
    assert_eq!(status, 202, "{order}");
    assert_eq!(order["status"], "processing");
    let id = order["order_id"].as_str().unwrap().to_string();

    // Charged, but no code delivered yet: not a sale until it is fulfilled.
    assert_eq!(report_both_ways(down, t, SKU).await, [0, 0, 0, 0, 0, 0, 0]);

    let before = c.refund_traces().await;
    assert_eq!((before.0, before.1), (9 * PRICE, 9 * PRICE));
    let (status, code, body) = error_of(c.refund(&id).await).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("processing"),
        "{body}"
    );
    assert_eq!(c.refund_traces().await, before, "nothing changed");
    assert_eq!(c.order_status(&id).await, "processing");

    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 1);
    assert_eq!(c.order_status(&id).await, "fulfilled");
    assert_eq!(
        report_both_ways(down, t, SKU).await,
        [1, 1, PRICE, 1, COST, PRICE - COST, 0]
    );

    // The upstream is out of stock now: the next order fails and its money comes back.
    let (status, failed, _) = down.order(&c.buyer, order_body(SKU, 1, "P-2")).await;
    assert_eq!(status, 202, "{failed}");
    let failed_id = failed["order_id"].as_str().unwrap().to_string();
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 1);
    assert_eq!(c.order_status(&failed_id).await, "failed");
    let before = c.refund_traces().await;
    assert_eq!(
        (before.0, before.1),
        (9 * PRICE, 9 * PRICE),
        "the failed order's money is back"
    );
    let (status, code, body) = error_of(c.refund(&failed_id).await).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("upstream_failed"),
        "{body}"
    );
    assert_eq!(c.refund_traces().await, before, "nothing changed");
    assert_eq!(c.order_status(&failed_id).await, "failed");
    assert_eq!(
        report_both_ways(down, t, SKU).await,
        [1, 1, PRICE, 1, COST, PRICE - COST, 0],
        "a failed order is no sale"
    );

    // The fulfilled one refunds like any order: money back, its code voided, its sale out
    // of the report and what the hub paid for it in refunded_cost.
    let resp = c.refund(&id).await;
    assert_eq!(resp.status(), 200);
    let refunded: Value = resp.json().await.unwrap();
    assert_eq!(
        (refunded["status"].as_str(), refunded["amount"].as_i64()),
        (Some("refunded"), Some(PRICE))
    );
    let after = c.refund_traces().await;
    assert_eq!(
        (after.0, after.1, after.2, after.3, after.4),
        (10 * PRICE, 10 * PRICE, 1, 1, 1)
    );
    assert_eq!(c.order_status(&id).await, "refunded");
    assert_eq!(report_both_ways(down, t, SKU).await, [0, 0, 0, 0, 0, 0, COST]);
    assert_eq!(
        c.up.balance_of(&c.hub_key).await,
        100 * COST - COST,
        "the supplier keeps what the hub paid"
    );
    c.assert_clean().await;
}

/// Purchases fulfilled before the report counted their cost (migrations/V9) are counted
/// by it once the gateway migrates: an upstream order sold, one refunded, a local one.
#[tokio::test]
async fn purchases_fulfilled_before_the_upgrade_are_counted() {
    let (url, _) = crate::schema::database_at(
        8,
        "INSERT INTO resellers (reseller_id, name, tier, base_tier, webhook_secret_enc) VALUES ('rsl_old', 'Old', 'gold', 'gold', '\\x00');
         INSERT INTO balances (reseller_id) SELECT id FROM resellers;
         INSERT INTO balance_ledger (reseller_id, amount, kind, reference) SELECT id, 100000, 'adjustment', 'seed' FROM resellers;
         INSERT INTO products (sku, name, face_value, base_price, max_quantity) VALUES ('old', 'Old', 1000, 1000, 10);
         INSERT INTO suppliers (supplier_id, name, protocol, base_url, key_id, secret_enc, timeout_ms)
              VALUES ('sp_old', 'Old', 'cardgate', 'http://127.0.0.1:9', 'ak_old', '\\x00', 1000);
         INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount,
                             currency, created_at)
              SELECT 'ord_old' || g, r.id, 'OLD-' || g, p.id, 'old', g, 1000, 1000 * g, 'CNY', now()
                FROM resellers r, products p, generate_series(1, 3) g;
         INSERT INTO purchases (order_id, upstream_no, reseller_id, merchant_order_no, product_id, sku, quantity,
                                unit_price, amount, order_created_at, lease_until, state, supplier_id, cost, finished_at)
              SELECT o.order_id, 'cg-' || o.order_id, o.reseller_id, o.merchant_order_no, o.product_id, o.sku,
                     o.quantity, o.unit_price, o.amount, o.created_at, now(), 'fulfilled', s.id, 900 * o.quantity, now()
                FROM orders o, suppliers s WHERE o.order_id IN ('ord_old2', 'ord_old3');
         UPDATE orders SET status = 'refunded', refunded_at = now() WHERE order_id = 'ord_old3';",
    )
    .await;

    let app = start(test_env(&url)).await;
    let t = app.root_token().await;
    assert_eq!(
        report_both_ways(&app, &t, "old").await,
        [2, 3, 3000, 1, 1800, 200, 2700],
        "orders, codes_sold, amount, upstream_orders, cost, margin, refunded_cost"
    );
}

/// An order processing when the gateway migrates (migrations/V13) was counted as sold by
/// the rule before it: it leaves the report, and comes back once it is fulfilled.
#[tokio::test]
async fn an_order_processing_at_the_upgrade_counts_once_it_is_fulfilled() {
    let (url, db) = crate::schema::database_at(
        12,
        "INSERT INTO resellers (reseller_id, name, tier, base_tier, webhook_secret_enc) VALUES ('rsl_old', 'Old', 'gold', 'gold', '\\x00');
         INSERT INTO balances (reseller_id) SELECT id FROM resellers;
         INSERT INTO balance_ledger (reseller_id, amount, kind, reference) SELECT id, 100000, 'adjustment', 'seed' FROM resellers;
         INSERT INTO products (sku, name, face_value, base_price, max_quantity) VALUES ('old', 'Old', 1000, 1000, 10);
         INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount,
                             currency, created_at, status)
              SELECT 'ord_old' || g, r.id, 'OLD-' || g, p.id, 'old', g, 1000, 1000 * g, 'CNY', now(),
                     CASE g WHEN 1 THEN 'fulfilled' ELSE 'processing' END
                FROM resellers r, products p, generate_series(1, 2) g;",
    )
    .await;

    let app = start(test_env(&url)).await;
    let t = app.root_token().await;
    let sold = |figures: [i64; 7]| [figures[0], figures[1], figures[2]];
    assert_eq!(
        sold(report_both_ways(&app, &t, "old").await),
        [1, 1, 1000],
        "orders, codes_sold, amount: the fulfilled order only"
    );
    db.batch_execute("UPDATE orders SET status = 'fulfilled' WHERE order_id = 'ord_old2'")
        .await
        .unwrap();
    assert_eq!(sold(report_both_ways(&app, &t, "old").await), [2, 3, 3000]);
}
