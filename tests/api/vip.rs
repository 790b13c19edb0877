//! The VIP programme (docs/api.md §6): credit lines held by Redis and by Postgres, and
//! tiers earned by spend, changed once however many gateways evaluate them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::orders::{buyer, shop_with, GOLD, SKU};

/// The default tiers with thresholds: gold is earned at 5 gold-priced codes, diamond at 20.
fn with_growth(env: &mut HashMap<String, String>) {
    let toml = format!(
        "[tiers.gold]
         priority = 30
         orders_per_second = 200
         orders_burst = 400
         reads_per_second = 500
         reads_burst = 1000
         max_quantity = 100
         max_batch = 100
         upgrade_spend = {gold}
         [tiers.diamond]
         priority = 40
         orders_per_second = 1000
         orders_burst = 2000
         reads_per_second = 2000
         reads_burst = 4000
         max_quantity = 100
         max_batch = 100
         upgrade_spend = {diamond}
        ",
        gold = 5 * 9800,
        diamond = 20 * 9650,
    );
    let path = std::env::temp_dir().join(format!("cardgate-vip-{}.toml", random_suffix()));
    std::fs::write(&path, toml).unwrap();
    env.insert("CARDGATE_CONFIG".into(), path.display().to_string());
    env.insert(MANUAL_BACKGROUND.into(), "1".into());
}

async fn patch(app: &TestApp, t: &str, reseller_id: &str, body: Value) -> Value {
    let path = format!("/admin/v1/resellers/{reseller_id}");
    app.admin_ok(t, Method::PATCH, &path, Some(body), 200).await
}

async fn balance(app: &TestApp, k: &ResellerKey) -> Value {
    app.signed(k, Method::GET, "/v1/balance", None)
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn orders_racing_into_credit_never_pass_the_limit_and_postgres_refuses_a_debit_past_it() {
    let (app, t, _) = shop_with(40, |_| {}).await;
    let app = Arc::new(app);
    let k = Arc::new(buyer(&app, &t, "gold", 10_000).await);

    // Only admins lend money.
    let op = app
        .admin_ok(
            &t,
            Method::POST,
            "/admin/v1/admins",
            Some(json!({"username": "op", "password": "op-password-1", "role": "operator"})),
            201,
        )
        .await;
    assert_eq!(op["role"], "operator");
    let op = app.login("op", "op-password-1").await;
    let path = format!("/admin/v1/resellers/{}", k.reseller_id);
    let resp = app
        .admin(&op, Method::PATCH, &path, Some(json!({"credit_limit": 50_000})))
        .await;
    assert_eq!(error_of(resp).await.1, "forbidden");
    let resp = app
        .admin(&t, Method::PATCH, &path, Some(json!({"credit_limit": -1})))
        .await;
    assert_eq!(error_of(resp).await.0, 400);
    let r = patch(&app, &t, &k.reseller_id, json!({"credit_limit": 50_000})).await;
    assert_eq!(
        (r["credit_limit"].as_i64(), r["available"].as_i64()),
        (Some(50_000), Some(60_000))
    );

    // 60,000 can be spent: six gold codes (57,900), whatever the race.
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (app, k) = (app.clone(), k.clone());
            tokio::spawn(async move { app.order(&k, order_body(SKU, 1, &format!("CR-{i}"))).await })
        })
        .collect();
    let mut sold = 0;
    for task in tasks {
        let (s, body, _) = task.await.unwrap();
        match s {
            201 => sold += 1,
            _ => assert_eq!(body["error"]["code"], "insufficient_balance", "{body}"),
        }
    }
    assert_eq!(sold, 6);
    let owed = 10_000 - 6 * GOLD;
    assert_eq!(app.recorded_balance(&k.reseller_id).await, owed);
    let b = balance(&app, &k).await;
    assert_eq!(
        (
            b["balance"].as_i64(),
            b["credit_limit"].as_i64(),
            b["available"].as_i64()
        ),
        (Some(owed), Some(50_000), Some(owed + 50_000))
    );
    // An operator's debit may use the credit left, not more.
    let debit = |amount: i64, reference: &str| json!({"amount": amount, "reference": reference});
    let bal_path = format!("/admin/v1/resellers/{}/balance", k.reseller_id);
    let resp = app
        .admin(&t, Method::POST, &bal_path, Some(debit(-(owed + 50_001), "past")))
        .await;
    assert_eq!(error_of(resp).await.1, "insufficient_balance");
    // Postgres refuses a debit past the limit whatever writes it.
    let db = app.db().await;
    let err = db
        .execute(
            "INSERT INTO balance_ledger (reseller_id, amount, kind, reference)
             SELECT id, $2, 'adjustment', 'around-the-gateway' FROM resellers WHERE reseller_id = $1",
            &[&k.reseller_id, &-(owed + 50_001)],
        )
        .await
        .expect_err("past the credit limit");
    assert_eq!(
        err.as_db_error().and_then(|e| e.constraint()),
        Some("balance_within_credit")
    );
    assert_eq!(app.recorded_balance(&k.reseller_id).await, owed);
    // The operators' report shows the line and what of it is used.
    let report = app
        .admin_ok(
            &t,
            Method::GET,
            "/admin/v1/reports/resellers?from=2026-01-01T00:00:00Z",
            None,
            200,
        )
        .await;
    let line = report["resellers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["reseller_id"] == k.reseller_id.as_str())
        .unwrap();
    assert_eq!(
        (
            line["credit_limit"].as_i64(),
            line["credit_used"].as_i64(),
            line["spend_in_window"].as_i64()
        ),
        (Some(50_000), Some(-owed), Some(6 * GOLD))
    );
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_limit_lowered_below_the_debt_stops_orders_until_the_balance_covers_them() {
    let mut redis = PrivateRedis::start().await;
    let url = redis.url();
    let (app, t, _) = shop_with(10, |env| {
        env.insert("CARDGATE_REDIS_URL".into(), url);
    })
    .await;
    let k = buyer(&app, &t, "gold", 1_000).await;
    patch(&app, &t, &k.reseller_id, json!({"credit_limit": 30_000})).await;
    for i in 0..2 {
        let (s, body, _) = app.order(&k, order_body(SKU, 1, &format!("LOW-{i}"))).await;
        assert_eq!(s, 201, "{body}");
    }
    let owed = 1_000 - 2 * GOLD;
    // Lowering the line below what is owed is allowed; the debt stays, orders stop.
    let r = patch(&app, &t, &k.reseller_id, json!({"credit_limit": 0})).await;
    assert_eq!(
        (r["balance"].as_i64(), r["available"].as_i64()),
        (Some(owed), Some(owed))
    );
    let (s, body, _) = app.order(&k, order_body(SKU, 1, "LOW-2")).await;
    assert_eq!((s, body["error"]["code"].as_str()), (402, Some("insufficient_balance")));
    let b = balance(&app, &k).await;
    assert_eq!(
        (b["balance"].as_i64(), b["available"].as_i64()),
        (Some(owed), Some(owed))
    );
    app.assert_reconciled(&t).await;

    // Redis loses everything: the rebuilt hot balance is the debt, still negative.
    redis.stop();
    redis.restart().await;
    let ready = eventually(Duration::from_secs(15), || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    assert!(ready, "rebuilt");
    assert_eq!(balance(&app, &k).await["balance"].as_i64(), Some(owed));
    let (s, _, _) = app.order(&k, order_body(SKU, 1, "LOW-3")).await;
    assert_eq!(s, 402);
    // A credit that covers the next order lets it through.
    app.fund(&t, &k.reseller_id, -owed + GOLD).await;
    let (s, body, _) = app.order(&k, order_body(SKU, 1, "LOW-4")).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(app.recorded_balance(&k.reseller_id).await, 0);
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn concurrent_orders_crossing_a_threshold_upgrade_once_however_many_gateways_evaluate() {
    let (a, t, _) = shop_with(30, with_growth).await;
    let mut env = a.env.clone();
    env.insert(MANUAL_BACKGROUND.into(), "1".into());
    let b = start(env).await;
    let a = Arc::new(a);
    let k = Arc::new(buyer(&a, &t, "standard", 1_000_000).await);
    // A callback target, so the change is queued as an event (nothing delivers it here).
    a.db()
        .await
        .execute(
            "UPDATE resellers SET callback_url = 'https://shop.example/cb' WHERE reseller_id = $1",
            &[&k.reseller_id],
        )
        .await
        .unwrap();
    let before = balance(&a, &k).await;
    assert_eq!(before["tier"], "standard");
    assert_eq!(
        before["next_tier"],
        json!({"tier": "gold", "upgrade_spend": 5 * 9800, "remaining": 5 * 9800})
    );
    assert_eq!(before["spend"], json!({"window_days": 30, "amount": 0}));

    // Eight standard-priced orders at once: the threshold is crossed by the fifth.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (a, k) = (a.clone(), k.clone());
            tokio::spawn(async move { a.order(&k, order_body(SKU, 1, &format!("UP-{i}"))).await.0 })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 201);
    }
    let (sa, sb) = (a.state.clone().unwrap(), b.state.clone().unwrap());
    let (ca, cb) = tokio::join!(cardgate::growth::step(&sa), cardgate::growth::step(&sb));
    let changes: Vec<_> = ca.unwrap().into_iter().chain(cb.unwrap()).collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!((changes[0].from.as_str(), changes[0].to.as_str()), ("standard", "gold"));
    // Again: nothing more to do.
    assert!(cardgate::growth::step(&sa).await.unwrap().is_empty());

    let db = a.db().await;
    let counts = db
        .query_one(
            "SELECT (SELECT count(*) FROM audit_log WHERE action = 'reseller.tier_change' AND actor_kind = 'system'),
                    (SELECT count(*) FROM events WHERE type = 'reseller.tier_changed'),
                    (SELECT data FROM events WHERE type = 'reseller.tier_changed')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((counts.get::<_, i64>(0), counts.get::<_, i64>(1)), (1, 1));
    assert_eq!(
        counts.get::<_, Value>(2),
        json!({"previous_tier": "standard", "tier": "gold", "reason": "upgrade"})
    );
    // The new tier's price applies at once, on both gateways.
    let after = balance(&b, &k).await;
    assert_eq!(after["tier"], "gold");
    assert_eq!(after["spend"]["amount"], 8 * 9800);
    assert_eq!(after["next_tier"]["tier"], "diamond");
    assert_eq!(after["next_tier"]["remaining"], 20 * 9650 - 8 * 9800);
    for (app, mon) in [(&*a, "UP-A"), (&b, "UP-B")] {
        let (s, body, _) = app.order(&k, order_body(SKU, 1, mon)).await;
        assert_eq!((s, body["unit_price"].as_i64()), (201, Some(GOLD)), "{body}");
    }
    a.assert_reconciled(&t).await;
}

#[tokio::test]
async fn spend_falling_away_downgrades_after_the_grace_never_below_the_base_tier_and_not_when_locked() {
    let clock = ManualClock::at_system_now();
    let db = create_database().await;
    let mut env = test_env(&db);
    with_growth(&mut env);
    let app = start_with_clock(env, clock.clone().into()).await;
    let t = app.root_token().await;
    app.create_product(&t, SKU).await;
    let codes: Vec<String> = (0..60).map(|i| format!("DOWN-{i}-{}", random_suffix())).collect();
    assert_eq!(app.import_codes(&t, SKU, codes.join("\n")).await.status(), 200);
    // Three resellers reach diamond: one given standard, one given silver, one locked after.
    let mut keys = Vec::new();
    for (n, base) in ["standard", "silver", "standard"].into_iter().enumerate() {
        let k = buyer(&app, &t, base, 1_000_000).await;
        // Two orders of ten: the standard tier's cap on one order's quantity.
        for half in 0..2 {
            let (s, body, _) = app.order(&k, order_body(SKU, 10, &format!("D-{n}-{half}"))).await;
            assert_eq!(s, 201, "{body}");
        }
        keys.push(k);
    }
    let state = app.state.clone().unwrap();
    let tier_of = |reseller_id: String| {
        let db = app.db();
        async move {
            db.await
                .query_one(
                    "SELECT tier, base_tier FROM resellers WHERE reseller_id = $1",
                    &[&reseller_id],
                )
                .await
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .unwrap()
        }
    };
    assert_eq!(cardgate::growth::step(&state).await.unwrap().len(), 3);
    for k in &keys {
        assert_eq!(tier_of(k.reseller_id.clone()).await.0, "diamond");
    }
    patch(&app, &t, &keys[2].reseller_id, json!({"tier_locked": true})).await;

    // The spend leaves the 30-day window: the grace period starts, nothing moves yet.
    let day = Duration::from_secs(86_400);
    clock.advance(31 * day);
    assert!(cardgate::growth::step(&state).await.unwrap().is_empty());
    clock.advance(6 * day + Duration::from_secs(23 * 3600));
    assert!(
        cardgate::growth::step(&state).await.unwrap().is_empty(),
        "still within 7 days"
    );
    clock.advance(Duration::from_secs(3600));
    let mut changes = cardgate::growth::step(&state).await.unwrap();
    changes.sort_by(|a, b| a.to.cmp(&b.to));
    let moved: Vec<_> = changes.iter().map(|c| (c.to.as_str(), c.reason)).collect();
    assert_eq!(moved, [("silver", "downgrade"), ("standard", "downgrade")]);
    assert_eq!(
        tier_of(keys[0].reseller_id.clone()).await,
        ("standard".into(), "standard".into())
    );
    assert_eq!(
        tier_of(keys[1].reseller_id.clone()).await,
        ("silver".into(), "silver".into())
    );
    assert_eq!(tier_of(keys[2].reseller_id.clone()).await.0, "diamond", "locked");
    // At the base already: further steps change nothing.
    clock.advance(30 * day);
    assert!(cardgate::growth::step(&state).await.unwrap().is_empty());
}
