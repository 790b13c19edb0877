use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn healthz_answers_with_a_request_id() {
    let app = spawn_app().await;
    let resp = app.get("/healthz").await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.starts_with("req_") && id.len() > 10, "{id}");
    let again = app.get("/healthz").await;
    assert_ne!(
        again.headers()["x-request-id"].to_str().unwrap(),
        id,
        "request ids are unique"
    );
}

#[tokio::test]
async fn readyz_turns_503_naming_redis_while_redis_is_down_and_recovers() {
    let mut redis = PrivateRedis::start().await;
    let url = redis.url();
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_REDIS_URL".into(), url);
    })
    .await;
    assert_eq!(app.get("/readyz").await.status(), 200);

    redis.stop();
    let resp = app.get("/readyz").await;
    assert_eq!(
        resp.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let (status, code, body) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (503, "unavailable"));
    assert!(body["error"]["message"].as_str().unwrap().contains("redis"), "{body}");
    // The process itself is still up.
    assert_eq!(app.get("/healthz").await.status(), 200);

    redis.restart().await;
    let back = eventually(Duration::from_secs(10), || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    assert!(back, "readyz did not recover after Redis came back");
}

#[tokio::test]
async fn readyz_turns_503_naming_postgres_when_its_database_is_gone() {
    let app = spawn_app().await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    // Dropping the app's database (forcing its connections closed) is Postgres becoming
    // unreachable for this gateway without stopping the shared server.
    let base = env_url("CARDGATE_DATABASE_URL");
    let (admin, conn) = tokio_postgres::connect(&with_database(&base, "postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let db = app.database_url.rsplit_once('/').unwrap().1.to_string();
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();

    let resp = app.get("/readyz").await;
    let (status, code, body) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (503, "unavailable"));
    assert!(
        body["error"]["message"].as_str().unwrap().contains("postgres"),
        "{body}"
    );
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_with_latency_and_in_flight() {
    let app = spawn_app().await;
    app.get("/healthz").await;
    app.get("/no-such-route").await;
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains(r#"cardgate_http_requests_total{route="/healthz",method="GET",status="200"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"cardgate_http_requests_total{route="unmatched",method="GET",status="404"}"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"cardgate_http_request_duration_seconds_bucket{route="/healthz",method="GET",status="200",le="0.005"}"#
        ),
        "{text}"
    );
    assert!(text.contains("cardgate_http_requests_in_flight"), "{text}");
}

#[tokio::test]
async fn metrics_show_stock_per_sku_sales_readiness_and_the_callback_queue() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let sku = format!("gauge-{}", random_suffix());
    app.create_product(&t, &sku).await;
    app.admin_ok(
        &t,
        reqwest::Method::PATCH,
        &format!("/admin/v1/products/{sku}"),
        Some(serde_json::json!({"low_stock_threshold": 5})),
        200,
    )
    .await;
    assert_eq!(app.import_codes(&t, &sku, "G-1\nG-2\nG-3").await.status(), 200);
    let k = app.reseller_with_key(&t, "gold", serde_json::json!({})).await;
    app.fund(&t, &k.reseller_id, 100_000).await;
    assert_eq!(app.order(&k, order_body(&sku, 1, "gauge-1")).await.0, 201);

    let stock = format!("cardgate_stock_available{{sku=\"{sku}\"}} 2");
    let threshold = format!("cardgate_stock_low_threshold{{sku=\"{sku}\"}} 5");
    let sold = format!("cardgate_codes_sold_total{{sku=\"{sku}\"}} 1");
    // One metrics registry serves every gateway of the test process, and the readiness
    // tests take a store away from theirs meanwhile: readiness is waited for like the rest.
    let ready = "cardgate_ready 1".to_string();
    let wanted = [&stock, &threshold, &sold, &ready];
    let mut text = String::new();
    let mut shown = false;
    // The stock gauges are refreshed every 5 seconds; the mover may be spreading the
    // import over the cells at one refresh.
    for _ in 0..200 {
        text = app.get("/metrics").await.text().await.unwrap();
        shown = wanted.iter().all(|w| text.lines().any(|l| l == w.as_str()));
        if shown {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(shown, "{stock} / {threshold} / {sold} / {ready} in:\n{text}");
    for name in [
        "cardgate_callbacks_pending ",
        "cardgate_resellers_low_balance ",
        "cardgate_last_guard_total ",
    ] {
        assert!(text.lines().any(|l| l.starts_with(name)), "{name} in:\n{text}");
    }
}
