//! VIP priority under overload (docs/operations.md): orders waiting for a stalled ledger fill the
//! gateway, the lower tiers are refused with `503 overloaded` first, nothing is taken
//! from them, and the top tier is still admitted.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::orders::{buyer, shop_with, SKU};

#[tokio::test]
async fn lower_tiers_are_shed_first_while_the_top_tier_is_admitted() {
    // Thresholds with four tiers and 3: standard from 1 in flight, silver from 2, gold
    // from 3, once 1 (half of 3) has stood in flight for 50 ms.
    let (app, t, _) = shop_with(20, |env| {
        env.insert("CARDGATE_OVERLOAD__MAX_IN_FLIGHT_ORDERS".into(), "3".into());
        env.insert("CARDGATE_OVERLOAD__STANDING_MS".into(), "50".into());
        env.insert("CARDGATE_ORDERS__COMMIT_TIMEOUT_MS".into(), "20000".into());
    })
    .await;
    let app = Arc::new(app);
    let standard = Arc::new(buyer(&app, &t, "standard", 1_000_000).await);
    let silver = buyer(&app, &t, "silver", 1_000_000).await;
    let diamond = Arc::new(buyer(&app, &t, "diamond", 1_000_000).await);

    // Stall the ledger: its inserts wait for this lock, so admitted orders stay in flight.
    let mut db = app.db().await;
    let stall = db.transaction().await.unwrap();
    stall.execute("LOCK TABLE orders IN SHARE MODE", &[]).await.unwrap();

    let waiting = |k: Arc<ResellerKey>, mon: &'static str| {
        let app = app.clone();
        tokio::spawn(async move { app.order(&k, order_body(SKU, 1, mon)).await })
    };
    let first = waiting(standard.clone(), "std-1");
    assert!(
        eventually(Duration::from_secs(5), || async { app.stock_len(SKU).await == 19 }).await,
        "the first order is reserved and waits for the ledger"
    );
    tokio::time::sleep(Duration::from_millis(200)).await; // a standing queue, not a burst

    let shed = |resp: reqwest::Response| async move {
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let (status, code, _) = error_of(resp).await;
        assert_eq!((status, code.as_str()), (503, "overloaded"));
        assert!(retry_after.is_some_and(|s| s >= 1), "Retry-After in whole seconds");
    };
    shed(app.post_order(&standard, order_body(SKU, 1, "std-2")).await).await;
    let batch = json!({"orders": [order_body(SKU, 1, "std-b1"), order_body(SKU, 1, "std-b2")]});
    shed(
        app.signed(
            &standard,
            reqwest::Method::POST,
            "/v1/orders/batch",
            Some(&batch.to_string()),
        )
        .await,
    )
    .await;

    let top = waiting(diamond.clone(), "dia-1");
    assert!(eventually(Duration::from_secs(5), || async { app.stock_len(SKU).await == 18 }).await);
    shed(app.post_order(&silver, order_body(SKU, 1, "sil-1")).await).await;
    let more_top = waiting(diamond.clone(), "dia-2");
    assert!(
        eventually(Duration::from_secs(5), || async { app.stock_len(SKU).await == 17 }).await,
        "the top tier is admitted with the lower tiers' limits full"
    );
    assert_eq!(app.stock_len(SKU).await, 17, "refused orders took no codes");

    stall.commit().await.unwrap();
    for task in [first, top, more_top] {
        let (status, body, _) = task.await.unwrap();
        assert_eq!(status, 201, "admitted orders complete once the ledger moves: {body}");
    }
    // Nothing of the shed orders exists: not charged, not recorded, and the numbers are free.
    assert_eq!(app.balance_of(&standard).await, 1_000_000 - 9800);
    assert_eq!(app.balance_of(&silver).await, 1_000_000);
    let (status, _, replayed) = app.order(&standard, order_body(SKU, 1, "std-2")).await;
    assert_eq!((status, replayed), (201, false), "a shed order's retry is a new order");
    app.assert_reconciled(&t).await;

    let metrics = app.get("/metrics").await.text().await.unwrap();
    for tier in ["standard", "silver"] {
        let line = format!("cardgate_orders_shed_total{{tier=\"{tier}\"}}");
        assert!(metrics.lines().any(|l| l.starts_with(&line)), "{line} is exported");
    }
}
