//! Faults (docs/invariants.md invariants 2, 5 and 6): Redis restarting empty, a reservation caught
//! by a rebuild, Postgres going away, against real Redis and Postgres.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;

use crate::helpers::*;
use crate::orders::{buyer, shop, shop_with, GOLD, SKU};

#[tokio::test]
async fn redis_restarting_empty_is_rebuilt_from_postgres_and_never_resells_a_delivered_code() {
    let mut redis = PrivateRedis::start().await;
    let url = redis.url();
    let (app, t, _) = shop_with(10, |env| {
        env.insert("CARDGATE_REDIS_URL".into(), url);
    })
    .await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let (s, first, _) = app.order(&k, order_body(SKU, 2, "M-1")).await;
    assert_eq!(s, 201, "{first}");
    let (s, refunded, _) = app.order(&k, order_body(SKU, 1, "M-2")).await;
    assert_eq!(s, 201, "{refunded}");
    let path = format!("/admin/v1/orders/{}/refund", refunded["order_id"].as_str().unwrap());
    app.admin_ok(&t, Method::POST, &path, Some(serde_json::json!({})), 200)
        .await;
    let rebuilds_before = metric(&app, "cardgate_redis_rebuilds_total").await;

    // Hold the rebuild back, so that what the gateway does without its Redis state shows.
    let db = app.db().await;
    db.execute("SELECT pg_advisory_lock($1)", &[&REBUILD_LOCK])
        .await
        .unwrap();
    redis.stop();
    // Reads share Redis pipelines: with Redis gone they are refused promptly, not held.
    let asked = std::time::Instant::now();
    let (s, code, _) = error_of(app.signed(&k, Method::GET, "/v1/products", None).await).await;
    assert_eq!((s, code.as_str()), (503, "unavailable"));
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    // Reconciliation cannot run without Redis: the store is away (503), not a bug (500).
    let resp = app.admin(&t, Method::GET, "/admin/v1/reconcile", None).await;
    assert!(resp.headers().contains_key("retry-after"));
    let (s, code, _) = error_of(resp).await;
    assert_eq!((s, code.as_str()), (503, "unavailable"));
    // Operators can still sign in to look at the outage.
    app.login(ROOT_USER, ROOT_PASSWORD).await;
    redis.restart().await;
    let refused = eventually(Duration::from_secs(10), || async {
        let resp = app.post_order(&k, order_body(SKU, 1, "M-3")).await;
        let retry_after = resp.headers().get("retry-after").is_some();
        let (s, code, _) = error_of(resp).await;
        s == 503 && code == "unavailable" && retry_after
    })
    .await;
    assert!(
        refused,
        "orders are refused 503 with Retry-After while Redis is not rebuilt"
    );
    assert_eq!(app.get("/readyz").await.status(), 503);
    // Postgres still answers replays while Redis is being rebuilt.
    let (s, again, replayed) = app.order(&k, order_body(SKU, 2, "M-1")).await;
    assert_eq!((s, replayed), (200, true), "{again}");
    assert_eq!(codes_of(&again), codes_of(&first));

    db.execute("SELECT pg_advisory_unlock($1)", &[&REBUILD_LOCK])
        .await
        .unwrap();
    let ready = eventually(Duration::from_secs(10), || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    assert!(ready, "readyz recovers once Redis is rebuilt");
    let counted = eventually(Duration::from_secs(5), || async {
        metric(&app, "cardgate_redis_rebuilds_total").await > rebuilds_before
    })
    .await;
    assert!(counted, "the rebuild is counted");
    // 10 imported, 2 delivered, 1 delivered and voided by the refund: 7 on sale again.
    assert_eq!(app.stock_len(SKU).await, 7);
    let (s, body, _) = app.order(&k, order_body(SKU, 8, "M-4")).await;
    assert_eq!((s, body["error"]["code"].as_str()), (409, Some("out_of_stock")));
    let (s, rest, _) = app.order(&k, order_body(SKU, 7, "M-5")).await;
    assert_eq!(s, 201, "{rest}");
    let sold: HashSet<String> = codes_of(&first).into_iter().chain(codes_of(&refunded)).collect();
    assert!(
        codes_of(&rest).iter().all(|c| !sold.contains(c)),
        "a delivered or voided code was sold again"
    );
    // The hot balance was rebuilt from the ledger: exactly what is left can be spent.
    assert_eq!(app.balance_of(&k).await, 100_000 - 9 * GOLD);
    let (s, again, replayed) = app.order(&k, order_body(SKU, 2, "M-1")).await;
    assert_eq!((s, replayed), (200, true), "{again}");
    assert_eq!(codes_of(&again), codes_of(&first));
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_reservation_a_rebuild_overtakes_is_never_committed_and_the_order_is_placed_again() {
    let (app, t, _) = shop(5).await;
    let app = Arc::new(app);
    let k = Arc::new(buyer(&app, &t, "gold", 100_000).await);
    let db = app.db().await;
    db.execute("SELECT pg_advisory_lock($1)", &[&REBUILD_LOCK])
        .await
        .unwrap();
    // An operator's rebuild queues first...
    let rebuild = Command::new(env!("CARGO_BIN_EXE_cardgate"))
        .arg("rebuild")
        .env_clear()
        .envs(&app.env)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || async { advisory_waiters(&db).await == 1 }).await);
    // ...then an order is reserved in the Redis state the rebuild is about to replace, and
    // its ledger commit queues behind the rebuild.
    let order = {
        let (app, k) = (app.clone(), k.clone());
        tokio::spawn(async move { app.order(&k, order_body(SKU, 1, "M-1")).await })
    };
    assert!(eventually(Duration::from_secs(10), || async { advisory_waiters(&db).await == 2 }).await);
    db.execute("SELECT pg_advisory_unlock($1)", &[&REBUILD_LOCK])
        .await
        .unwrap();

    let out = rebuild.wait_with_output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["dropped_in_flight"], 1, "{report}");
    assert_eq!(report["codes"], 5, "the reserved code is back in stock: {report}");

    let (s, placed, _) = order.await.unwrap();
    assert_eq!(s, 201, "the order is placed again from the rebuilt state: {placed}");
    let orders: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(orders, 1, "the overtaken reservation was not committed");
    assert_eq!(app.balance_of(&k).await, 100_000 - GOLD, "charged once");
    assert_eq!(app.stock_len(SKU).await, 4, "its code was not handed back twice");
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn orders_are_refused_promptly_while_postgres_is_away_and_reservations_commit_when_it_returns() {
    let proxy = TcpProxy::start(&env_url("CARDGATE_DATABASE_URL")).await;
    let database_url = proxy.url_for(&create_database().await);
    let mut env = test_env(&database_url);
    env.insert("CARDGATE_ORDERS__COMMIT_TIMEOUT_MS".into(), "2000".into());
    let app = start(env).await;
    let t = app.root_token().await;
    app.create_product(&t, SKU).await;
    let codes: Vec<String> = (0..5).map(|i| format!("PG-{i}-{}", random_suffix())).collect();
    assert_eq!(app.import_codes(&t, SKU, codes.join("\n")).await.status(), 200);
    let k = buyer(&app, &t, "gold", 100_000).await;
    let (s, _, _) = app.order(&k, order_body(SKU, 1, "M-1")).await;
    assert_eq!(s, 201);
    let stock_key = app.import_pool(app.product_pk(SKU).await);

    proxy.cut();
    // The first order after the cut is reserved and waits for its commit: 503 within the
    // commit timeout, never a hang.
    let started = Instant::now();
    let resp = app.post_order(&k, order_body(SKU, 1, "M-2")).await;
    let (s, code, _) = error_of(resp).await;
    assert_eq!((s, code.as_str()), (503, "unavailable"));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    // Once the gateway knows, orders are refused at once and reserve nothing.
    let prompt = eventually(Duration::from_secs(5), || async {
        let started = Instant::now();
        let resp = app.post_order(&k, order_body(SKU, 1, "M-3")).await;
        resp.status() == 503 && started.elapsed() < Duration::from_millis(500)
    })
    .await;
    assert!(prompt, "orders are refused promptly while Postgres is away");
    let stock: i64 = redis::cmd("LLEN")
        .arg(&stock_key)
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert_eq!(stock, 3, "only M-2 holds a code");
    assert_eq!(app.get("/readyz").await.status(), 503);

    proxy.restore();
    // M-2 was reserved: it is committed once Postgres is back, and its retry gets it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, body, replayed) = app.order(&k, order_body(SKU, 1, "M-2")).await;
        if s == 200 && replayed {
            break;
        }
        assert!(
            s == 409 || s == 503,
            "M-2 is in progress until committed, then replayed: {s} {body}"
        );
        assert!(
            Instant::now() < deadline,
            "M-2 was not committed after Postgres came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, _, _) = app.order(&k, order_body(SKU, 1, "M-3")).await;
    assert_eq!(s, 201, "M-3 was refused without a trace, so it is a new order now");
    assert_eq!(app.balance_of(&k).await, 100_000 - 3 * GOLD);
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_rebuild_that_fails_part_way_never_hands_its_epoch_out_again() {
    // Reservations made against a rebuild's Redis state carry its epoch. Were a failed
    // rebuild's number handed out again by the next one, those it had let through (its epoch
    // already written to Redis when Postgres went away) would commit as current, though the
    // next rebuild gave their codes and money back.
    let (app, t, _) = shop_with(5, |env| {
        env.insert(MANUAL_BACKGROUND.into(), "1".into());
    })
    .await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let state = app.state.clone().unwrap();
    let db = app.db().await;
    let pg_epoch = || async {
        db.query_one("SELECT epoch FROM redis_epoch", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let pk = app.reseller_pk(&k.reseller_id).await;
    let before = pg_epoch().await;

    // A key of the wrong type stops the rebuild part way, after it has taken its epoch.
    let risk = app.keys().risk(pk);
    let mut r = app.redis().await;
    let _: () = redis::cmd("SET").arg(&risk).arg("x").query_async(&mut r).await.unwrap();
    assert!(cardgate::rebuild::rebuild(&state, true).await.is_err());
    let failed = pg_epoch().await;
    assert!(
        failed > before,
        "the failed rebuild's epoch {failed} is not taken for good"
    );

    let _: () = redis::cmd("DEL").arg(&risk).query_async(&mut r).await.unwrap();
    let report = cardgate::rebuild::rebuild(&state, true).await.unwrap().unwrap();
    assert!(report.epoch > failed, "{report:?}");
    assert_eq!(pg_epoch().await, report.epoch);
    let (s, placed, _) = app.order(&k, order_body(SKU, 1, "M-1")).await;
    assert_eq!(s, 201, "{placed}");
    app.assert_reconciled(&t).await;
}
