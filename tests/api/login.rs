//! Operator logins under attack: the lock-out counted before the password check, the
//! per-address limit before any work, Argon2 bounded on its own, and password changes
//! ending older tokens.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

async fn try_login(client: &reqwest::Client, app: &TestApp, user: &str, password: &str) -> reqwest::Response {
    client
        .post(app.url("/admin/v1/login"))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_wrong_passwords_are_verified_at_most_the_limit_then_even_the_right_one_is_429() {
    // Only the lock-out is under test: the per-address limit and the Argon2 queue are
    // opened wide so that every one of the guesses reaches it.
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_ADMIN__LOGIN_PER_ADDRESS_PER_MINUTE".into(), "10000".into());
        env.insert("CARDGATE_ADMIN__LOGIN_PER_ADDRESS_BURST".into(), "10000".into());
        env.insert("CARDGATE_ADMIN__PASSWORD_HASH_WAIT_MS".into(), "120000".into());
    })
    .await;
    let guesses = (0..30).map(|i| {
        let app = &app;
        async move { try_login(&app.client, app, ROOT_USER, &format!("wrong-guess-{i}")).await }
    });
    let mut statuses = Vec::new();
    for resp in futures_util::future::join_all(guesses).await {
        let retry_after = resp.headers().get("retry-after").is_some();
        let (status, code, _) = error_of(resp).await;
        match status {
            401 => assert_eq!(code, "unauthenticated"),
            429 => assert!(code == "rate_limited" && retry_after, "{code}"),
            other => panic!("unexpected {other} {code}"),
        }
        statuses.push(status);
    }
    let verified = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(
        verified, 5,
        "exactly the limit was checked against the password: {statuses:?}"
    );
    let failed_audits: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM audit_log WHERE action = 'login.failed'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed_audits, 5);
    // Locked: the right password too, until the window ends.
    let resp = try_login(&app.client, &app, ROOT_USER, ROOT_PASSWORD).await;
    assert!(resp.headers().get("retry-after").is_some());
    assert_eq!(error_of(resp).await.0, 429);
}

#[tokio::test]
async fn logins_are_limited_per_client_address_before_the_body_is_read_and_a_sign_in_gives_its_token_back() {
    // The defaults: 20 a minute, a burst of 10.
    let app = spawn_app().await;
    // Each sign-in gives back the token its attempt took: a script signing in one login
    // after another is never refused.
    for _ in 0..25 {
        assert_eq!(
            try_login(&app.client, &app, ROOT_USER, ROOT_PASSWORD).await.status(),
            200
        );
    }
    // Bodies that are not a login at all spend the address's tokens: the limit comes
    // before the body is read, so a flood costs us no parsing, Postgres or Argon2. (The
    // sign-ins above took a few seconds, in which a token or two came back.)
    let bad_body = || async {
        app.client
            .post(app.url("/admin/v1/login"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
    };
    for _ in 0..10 {
        assert_eq!(error_of(bad_body().await).await.0, 400);
    }
    let mut refusal = None;
    for _ in 0..5 {
        let resp = bad_body().await;
        if resp.status() == 429 {
            refusal = Some(resp);
            break;
        }
        assert_eq!(error_of(resp).await.0, 400);
    }
    let resp = refusal.expect("refused once the tokens and the sign-ins' credits are spent");
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=3).contains(&retry_after), "a token comes every 3 s: {retry_after}");
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));

    // Another address has a bucket of its own.
    let elsewhere = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    let resp = try_login(&elsewhere, &app, ROOT_USER, ROOT_PASSWORD).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn argon2_work_past_its_bound_and_its_wait_is_503_overloaded() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_ADMIN__LOGIN_PER_ADDRESS_BURST".into(), "100".into());
        env.insert("CARDGATE_ADMIN__PASSWORD_HASH_CONCURRENCY".into(), "1".into());
        env.insert("CARDGATE_ADMIN__PASSWORD_HASH_WAIT_MS".into(), "1".into());
    })
    .await;
    // Distinct usernames, so that the lock-out plays no part.
    let logins = (0..8).map(|i| {
        let app = &app;
        async move { try_login(&app.client, app, &format!("user{i}"), "some-password").await }
    });
    let mut overloaded = 0;
    for resp in futures_util::future::join_all(logins).await {
        let retry_after = resp.headers().get("retry-after").is_some();
        let (status, code, _) = error_of(resp).await;
        match (status, code.as_str()) {
            (401, "unauthenticated") => {}
            (503, "overloaded") => {
                assert!(retry_after);
                overloaded += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        overloaded >= 1,
        "eight Argon2 verifications at once, one at a time allowed"
    );
    // Free again, the next one is verified.
    let resp = try_login(&app.client, &app, ROOT_USER, ROOT_PASSWORD).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_password_change_ends_the_tokens_issued_before_it() {
    let app = spawn_app().await;
    let root = app.root_token().await;
    app.admin_ok(
        &root,
        Method::POST,
        "/admin/v1/admins",
        Some(json!({"username": "alice", "password": "alice-password-1", "role": "operator"})),
        201,
    )
    .await;
    let old = app.login("alice", "alice-password-1").await;
    assert_eq!(
        app.admin(&old, Method::GET, "/admin/v1/products", None).await.status(),
        200
    );

    app.admin_ok(
        &root,
        Method::PATCH,
        "/admin/v1/admins/alice",
        Some(json!({"password": "alice-password-2"})),
        200,
    )
    .await;
    let resp = app.admin(&old, Method::GET, "/admin/v1/products", None).await;
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    // At once, in the same second as the change: the new password's token works.
    let new = app.login("alice", "alice-password-2").await;
    assert_eq!(
        app.admin(&new, Method::GET, "/admin/v1/products", None).await.status(),
        200
    );
    assert_eq!(
        try_login(&app.client, &app, "alice", "alice-password-1").await.status(),
        401
    );
    // Other accounts' tokens are untouched.
    assert_eq!(
        app.admin(&root, Method::GET, "/admin/v1/products", None).await.status(),
        200
    );
    // A role change is not a password change.
    app.admin_ok(
        &root,
        Method::PATCH,
        "/admin/v1/admins/alice",
        Some(json!({"role": "auditor"})),
        200,
    )
    .await;
    assert_eq!(
        app.admin(&new, Method::GET, "/admin/v1/products", None).await.status(),
        200
    );
}
