//! Money committed in Postgres reaches the hot balance exactly once, however Redis fails
//! in between (docs/invariants.md invariant 11; `hot_balance`): a credit, a refund and a debit
//! that is given back, each with Redis cut at the worst moment.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::orders::{buyer, shop_with, SKU};

/// A gateway whose Redis goes through a proxy the test can cut.
async fn shop_behind_a_redis_proxy() -> (TestApp, String, TcpProxy) {
    let real = env_url("CARDGATE_REDIS_URL");
    let hostport = real.trim_start_matches("redis://").trim_end_matches('/').to_string();
    let proxy = TcpProxy::to(hostport).await;
    let port = proxy.port;
    let (app, t, _) = shop_with(5, move |env| {
        env.insert("CARDGATE_REDIS_URL".into(), format!("redis://127.0.0.1:{port}/"));
        env.insert("CARDGATE_REDIS__RESPONSE_TIMEOUT_MS".into(), "500".into());
    })
    .await;
    (app, t, proxy)
}

/// The hot balance as Redis holds it, read past the proxy.
async fn hot(app: &TestApp, key: &ResellerKey) -> i64 {
    let pk = app.reseller_pk(&key.reseller_id).await;
    let mut r = redis::Client::open(env_url("CARDGATE_REDIS_URL"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let v: Option<i64> = redis::cmd("GET")
        .arg(app.keys().balance(pk))
        .query_async(&mut r)
        .await
        .unwrap();
    v.expect("a hot balance")
}

async fn pending(app: &TestApp) -> i64 {
    app.db()
        .await
        .query_one("SELECT count(*) FROM hot_balance_pending", &[])
        .await
        .unwrap()
        .get(0)
}

async fn redis_back(app: &TestApp, proxy: &TcpProxy) {
    proxy.restore();
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.get("/readyz").await.status() == 200
        })
        .await,
        "the gateway reaches Redis again"
    );
}

#[tokio::test]
async fn a_credit_and_a_refund_committed_while_redis_is_away_reach_the_hot_balance_once() {
    let (app, t, proxy) = shop_behind_a_redis_proxy().await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let (status, order, _) = app.order(&k, order_body(SKU, 1, "M-HOT-1")).await;
    assert_eq!(status, 201, "{order}");
    let before = hot(&app, &k).await;
    assert_eq!(before, app.recorded_balance(&k.reseller_id).await);

    proxy.cut();
    let credit = json!({"amount": 5_000, "reference": "credit-while-away"});
    let path = format!("/admin/v1/resellers/{}/balance", k.reseller_id);
    let resp = app.admin(&t, reqwest::Method::POST, &path, Some(credit.clone())).await;
    assert_eq!(resp.status(), 200, "committed in Postgres, so answered as done");
    let order_id = order["order_id"].as_str().unwrap();
    let refund_path = format!("/admin/v1/orders/{order_id}/refund");
    let resp = app
        .admin(&t, reqwest::Method::POST, &refund_path, Some(json!({"reason": "test"})))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(hot(&app, &k).await, before, "Redis was away: not applied yet");
    assert_eq!(pending(&app).await, 2, "both recorded as still to apply");

    redis_back(&app, &proxy).await;
    // Not yet applied is not a difference: reconciliation knows what is pending.
    // (The background step may have applied them by now; either way it is clean.)
    app.assert_reconciled(&t).await;
    // Replays apply what their first call could not, and only that.
    let resp = app.admin(&t, reqwest::Method::POST, &path, Some(credit)).await;
    assert_eq!(resp.status(), 200);
    let resp = app
        .admin(&t, reqwest::Method::POST, &refund_path, Some(json!({"reason": "test"})))
        .await;
    assert_eq!(resp.status(), 200);
    let state = app.state.clone().unwrap();
    for _ in 0..3 {
        cardgate::hot_balance::settle_due(&state).await.unwrap();
    }
    let expected = app.recorded_balance(&k.reseller_id).await;
    assert_eq!(expected, before + 5_000 + order["amount"].as_i64().unwrap());
    assert_eq!(hot(&app, &k).await, expected, "applied exactly once");
    assert_eq!(pending(&app).await, 0);
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_debit_whose_ledger_row_fails_is_given_back_once_even_with_redis_away() {
    let (app, t, proxy) = shop_behind_a_redis_proxy().await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let db = app.db().await;
    // The ledger row of this one debit waits for the test, then fails.
    db.batch_execute(
        "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.reference = 'debit-fails' THEN
             PERFORM pg_advisory_xact_lock(4242);
             RAISE EXCEPTION 'refused by the test';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER test_refuse BEFORE INSERT ON balance_ledger FOR EACH ROW EXECUTE FUNCTION test_refuse();
         SELECT pg_advisory_lock(4242);",
    )
    .await
    .unwrap();
    let path = format!("/admin/v1/resellers/{}/balance", k.reseller_id);
    let debit = {
        let (app_url, client, token) = (app.url(&path), app.client.clone(), t.clone());
        tokio::spawn(async move {
            client
                .post(app_url)
                .bearer_auth(token)
                .json(&json!({"amount": -30_000, "reference": "debit-fails"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || async { advisory_waiters(&db).await > 0 }).await,
        "the debit reaches its ledger row"
    );
    assert_eq!(hot(&app, &k).await, 70_000, "held in the hot balance first");
    proxy.cut();
    db.execute("SELECT pg_advisory_unlock(4242)", &[]).await.unwrap();
    let status = debit.await.unwrap();
    assert!(status >= 500, "the debit failed: {status}");
    assert_eq!(hot(&app, &k).await, 70_000, "Redis was away: not given back yet");

    redis_back(&app, &proxy).await;
    let state = app.state.clone().unwrap();
    for _ in 0..3 {
        cardgate::hot_balance::settle_due(&state).await.unwrap();
    }
    assert_eq!(hot(&app, &k).await, 100_000, "given back exactly once");
    assert_eq!(app.recorded_balance(&k.reseller_id).await, 100_000);
    assert_eq!(pending(&app).await, 0);

    // A debit that goes through is held once and kept.
    let resp = app
        .admin(
            &t,
            reqwest::Method::POST,
            &path,
            Some(json!({"amount": -30_000, "reference": "debit-ok"})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    cardgate::hot_balance::settle_due(&state).await.unwrap();
    assert_eq!(hot(&app, &k).await, 70_000);
    assert_eq!(app.recorded_balance(&k.reseller_id).await, 70_000);
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_debit_whose_reference_is_held_already_takes_nothing_and_frees_nothing() {
    let (app, t, _) = crate::orders::shop_with(1, |_| {}).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let pk = app.reseller_pk(&k.reseller_id).await;
    // Another debit with this reference holds money in Redis and has not finished.
    let mut r = app.redis().await;
    let marker = app.keys().hot_movement(pk, &format!("hold:{pk}:twice"));
    let _: () = redis::cmd("SET").arg(&marker).arg(1).query_async(&mut r).await.unwrap();
    let path = format!("/admin/v1/resellers/{}/balance", k.reseller_id);
    let resp = app
        .admin(
            &t,
            reqwest::Method::POST,
            &path,
            Some(json!({"amount": -1_000, "reference": "twice"})),
        )
        .await;
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (409, "conflict"));
    assert_eq!(hot(&app, &k).await, 100_000, "nothing taken");
    assert_eq!(pending(&app).await, 0, "its record dropped");
    let still: bool = redis::cmd("EXISTS").arg(&marker).query_async(&mut r).await.unwrap();
    assert!(still, "the other hold's marker is left to it");
}
