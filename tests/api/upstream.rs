//! Upstream sourcing (docs/api.md §8, docs/invariants.md invariant 10): two real
//! gateways, each with its own database and Redis prefix. The upstream one has stock and
//! sells to the hub; the downstream one (the hub) has a supplier pointing at the
//! upstream's address and a source for its product, and no stock of its own.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;
use crate::orders::buyer;

const SKU: &str = "GIFT-50";

struct Chain {
    up: TestApp,
    up_token: String,
    /// The hub, as the upstream's reseller.
    hub_key: ResellerKey,
    imported: Vec<String>,
    down: TestApp,
    down_token: String,
    buyer: ResellerKey,
}

async fn chain(codes: usize, answer_within_ms: u64) -> Chain {
    let up = spawn_app().await;
    let up_token = up.root_token().await;
    up.create_product(&up_token, SKU).await;
    let imported: Vec<String> = (0..codes).map(|i| format!("UP-{i:04}-{}", random_suffix())).collect();
    if codes > 0 {
        assert_eq!(up.import_codes(&up_token, SKU, imported.join("\n")).await.status(), 200);
    }
    let hub_key = buyer(&up, &up_token, "standard", 100 * 9800).await;

    let down = spawn_app_with(|env| {
        env.insert(
            "CARDGATE_UPSTREAM__ANSWER_WITHIN_MS".into(),
            answer_within_ms.to_string(),
        );
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
    assert!(supplier.get("secret").is_none(), "{supplier}");
    let sp = supplier["supplier_id"].as_str().unwrap().to_string();
    let product = down
        .admin_ok(
            &down_token,
            Method::PATCH,
            &format!("/admin/v1/products/{SKU}"),
            Some(json!({"sources": [{"supplier_id": sp, "sku": SKU, "max_unit_cost": 9800, "priority": 1}]})),
            200,
        )
        .await;
    assert_eq!(product["sources"][0]["supplier_id"], sp);
    let buyer = buyer(&down, &down_token, "standard", 10 * 9800).await;
    Chain {
        up,
        up_token,
        hub_key,
        imported,
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
}

#[tokio::test]
async fn an_order_local_stock_cannot_fill_is_bought_upstream_once_and_answered_201() {
    let c = chain(3, 3000).await;
    let (status, order, _) = c.down.order(&c.buyer, order_body(SKU, 2, "M-UP-1")).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["status"], "fulfilled");
    let codes = codes_of(&order);
    assert_eq!(codes.len(), 2);
    assert!(
        codes.iter().all(|code| c.imported.contains(code)),
        "codes come from upstream"
    );

    // A replay answers the same order and buys nothing more.
    let (status, again, replayed) = c.down.order(&c.buyer, order_body(SKU, 2, "M-UP-1")).await;
    assert_eq!((status, replayed), (200, true));
    assert_eq!(codes_of(&again), codes);

    assert_eq!(
        c.up.balance_of(&c.hub_key).await,
        100 * 9800 - 2 * 9800,
        "the hub paid once"
    );
    assert_eq!(c.down.balance_of(&c.buyer).await, 10 * 9800 - 2 * 9800, "charged once");
    assert_eq!(c.up.stock_len(SKU).await, 1);
    let db = c.down.db().await;
    let bought: i64 = db
        .query_one("SELECT count(*) FROM purchases WHERE state = 'fulfilled'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bought, 1);
    c.assert_clean().await;
}

#[tokio::test]
async fn every_source_refusing_is_a_clean_409_and_the_number_stays_free() {
    let c = chain(0, 3000).await;
    let resp = c.down.post_order(&c.buyer, order_body(SKU, 1, "M-UP-2")).await;
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (409, "out_of_stock"));
    assert_eq!(c.down.balance_of(&c.buyer).await, 10 * 9800, "nothing charged");
    assert_eq!(c.up.balance_of(&c.hub_key).await, 100 * 9800);
    c.assert_clean().await;

    // The number is free: once stock arrives locally, it sells under it.
    let local = format!("LOCAL-{}", random_suffix());
    assert_eq!(
        c.down.import_codes(&c.down_token, SKU, local.clone()).await.status(),
        200
    );
    let (status, order, _) = c.down.order(&c.buyer, order_body(SKU, 1, "M-UP-2")).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(codes_of(&order), vec![local]);
    c.assert_clean().await;
}

#[tokio::test]
async fn an_upstream_slower_than_the_window_is_answered_202_and_fulfilled_by_the_step() {
    let c = chain(2, 0).await;
    let (status, order, _) = c.down.order(&c.buyer, order_body(SKU, 1, "M-UP-3")).await;
    assert_eq!(status, 202, "{order}");
    assert_eq!(order["status"], "processing");
    assert!(codes_of(&order).is_empty());
    assert_eq!(c.down.balance_of(&c.buyer).await, 10 * 9800 - 9800, "charged at once");
    c.assert_clean().await;

    let state = c.down.state.clone().unwrap();
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 1);
    let id = order["order_id"].as_str().unwrap();
    let resp = c
        .down
        .signed(&c.buyer, Method::GET, &format!("/v1/orders/{id}"), None)
        .await;
    assert_eq!(resp.status(), 200);
    let got: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(got["status"], "fulfilled");
    let codes = codes_of(&got);
    assert_eq!(codes.len(), 1);
    assert!(c.imported.contains(&codes[0]));
    assert_eq!(
        c.up.balance_of(&c.hub_key).await,
        100 * 9800 - 9800,
        "the hub paid once"
    );
    assert_eq!(c.down.balance_of(&c.buyer).await, 10 * 9800 - 9800, "charged once");
    assert_eq!(cardgate::upstream::step(&state).await.unwrap(), 0, "nothing left open");
    c.assert_clean().await;
}
