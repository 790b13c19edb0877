//! Monthly rebates (docs/api.md §6 "Rebates"; docs/invariants.md invariant 11): a month's
//! spend earns its bracket's rate once, however many closes race, and a closed month
//! stays as it was credited.
//!
//! Orders carry the gateway's clock as their time, so each test runs its gateway on a
//! manual clock set inside November 2025, places the month's orders (signed at that
//! time), then moves the clock past the month's end.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

use reqwest::Method;
use serde_json::{json, Value};
use time::macros::datetime;
use time::OffsetDateTime;

use crate::helpers::*;
use crate::orders::{buyer, GOLD, SKU};

const NOVEMBER: &str = "2025-11";
/// Two brackets: 15,000 earns 1 %, 50,000 earns 3 %, each on the whole month's spend.
const BRACKETS: &str =
    "[[rebates]]\nmin_spend = 15000\nrate_bp = 100\n\n[[rebates]]\nmin_spend = 50000\nrate_bp = 300\n";
const FUNDS: i64 = 200_000;
/// Where callbacks would go; never delivered, since the tests run no dispatcher.
const HOOK: &str = "http://127.0.0.1:9/rebates";

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// A gateway on `clock` with the brackets above, a product in stock, and its background
/// loops left to the test; `overrides` may change any setting.
async fn rebates_app(clock: &ManualClock, overrides: impl FnOnce(&mut HashMap<String, String>)) -> (TestApp, String) {
    let config = std::env::temp_dir().join(format!("cardgate-rebates-{}.toml", random_suffix()));
    std::fs::write(&config, BRACKETS).unwrap();
    let mut env = test_env(&create_database().await);
    env.insert("CARDGATE_CONFIG".into(), config.display().to_string());
    env.insert("CARDGATE_CALLBACKS__ALLOW_PRIVATE_TARGETS".into(), "true".into());
    env.insert(MANUAL_BACKGROUND.into(), "1".into());
    overrides(&mut env);
    let app = start_with_clock(env, clock.clone().into()).await;
    let t = app.root_token().await;
    app.create_product(&t, SKU).await;
    let codes: Vec<String> = (0..20).map(|i| format!("REBATE-{i:03}-{}", random_suffix())).collect();
    assert_eq!(app.import_codes(&t, SKU, codes.join("\n")).await.status(), 200);
    (app, t)
}

/// A second gateway on the first one's database, Redis and clock.
async fn second_gateway(app: &TestApp, clock: &ManualClock) -> TestApp {
    let mut env = app.env.clone();
    env.insert(MANUAL_BACKGROUND.into(), "1".into());
    start_with_clock(env, clock.clone().into()).await
}

/// A request signed at the gateway's time, as a reseller whose clock agrees with it.
async fn signed_now(
    app: &TestApp,
    clock: &ManualClock,
    key: &ResellerKey,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> reqwest::Response {
    let at = clock.now_unix_ms().div_euclid(1000);
    app.signed_at(key, method, path, body, at, &nonce(), &[]).await
}

async fn order_now(app: &TestApp, clock: &ManualClock, key: &ResellerKey, quantity: i64) -> Value {
    let body = order_body(SKU, quantity, &format!("M-{}", random_suffix())).to_string();
    let resp = signed_now(app, clock, key, Method::POST, "/v1/orders", Some(&body)).await;
    let status = resp.status();
    let order: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{order}");
    order
}

/// The spendable (hot) balance as the reseller reads it.
async fn spendable(app: &TestApp, clock: &ManualClock, key: &ResellerKey) -> i64 {
    let resp = signed_now(app, clock, key, Method::GET, "/v1/balance", None).await;
    assert_eq!(resp.status(), 200);
    resp.json::<Value>().await.unwrap()["balance"].as_i64().unwrap()
}

/// The balance Postgres holds and the hot balance Redis holds.
async fn balances(app: &TestApp, key: &ResellerKey) -> (i64, i64) {
    let row = app
        .db()
        .await
        .query_one(
            "SELECT r.id, b.balance FROM resellers r JOIN balances b ON b.reseller_id = r.id WHERE r.reseller_id = $1",
            &[&key.reseller_id],
        )
        .await
        .unwrap();
    let (pk, pg): (i64, i64) = (row.get(0), row.get(1));
    let hot: Option<i64> = redis::cmd("GET")
        .arg(app.keys().balance(pk))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    (pg, hot.expect("a hot balance"))
}

/// The month's rebate rows in the ledger: (reseller_id, amount), by reseller.
async fn ledger_rebates(app: &TestApp) -> Vec<(String, i64)> {
    app.db()
        .await
        .query(
            "SELECT r.reseller_id, l.amount FROM balance_ledger l JOIN resellers r ON r.id = l.reseller_id
              WHERE l.kind = 'rebate' AND l.reference = 'rebate:2025-11' ORDER BY r.reseller_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.db().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// `POST /admin/v1/rebates/close`: the status, the body and whether it was a replay.
async fn close(app: &TestApp, token: &str, month: &str) -> (u16, Value, bool) {
    let resp = app
        .admin(
            token,
            Method::POST,
            "/admin/v1/rebates/close",
            Some(json!({"month": month})),
        )
        .await;
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    (status, resp.json().await.unwrap(), replayed)
}

/// November's buyers: `big` spends 6 codes (57,900: 3 %, 1,737), the last one a
/// millisecond before the month ends; `mid` 2 (19,300: 1 %, 193) and one more in
/// December, which is not November's; `small` 1 (9,650: no bracket, a line without a
/// rebate); `idle` nothing (no line). Only `big` has a callback URL. Leaves the clock at
/// the first instant of December.
struct November {
    big: ResellerKey,
    mid: ResellerKey,
    small: ResellerKey,
    idle: ResellerKey,
    /// `big`'s one-code orders.
    big_orders: Vec<String>,
}

async fn november(app: &TestApp, t: &str, clock: &ManualClock) -> November {
    clock.set(ms(datetime!(2025-11-10 12:00 UTC)));
    let big = app.reseller_with_key(t, "gold", json!({"callback_url": HOOK})).await;
    app.fund(t, &big.reseller_id, FUNDS).await;
    let (mid, small, idle) = (
        buyer(app, t, "gold", FUNDS).await,
        buyer(app, t, "gold", FUNDS).await,
        buyer(app, t, "gold", FUNDS).await,
    );
    let mut big_orders = Vec::new();
    for _ in 0..2 {
        big_orders.push(
            order_now(app, clock, &big, 1).await["order_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    order_now(app, clock, &big, 3).await;
    order_now(app, clock, &mid, 2).await;
    order_now(app, clock, &small, 1).await;
    clock.set(ms(datetime!(2025-11-30 23:59:59.999 UTC)));
    big_orders.push(
        order_now(app, clock, &big, 1).await["order_id"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    clock.set(ms(datetime!(2025-12-01 00:00 UTC)));
    order_now(app, clock, &mid, 1).await;
    November {
        big,
        mid,
        small,
        idle,
        big_orders,
    }
}

/// November's rebates as every answer must show them.
fn november_rebates(n: &November) -> Value {
    json!({
        "month": NOVEMBER,
        "closed": true,
        "lines": [
            {"reseller_id": n.big.reseller_id, "spend": 6 * GOLD, "rate_bp": 300, "rebate": 6 * GOLD * 300 / 10_000},
            {"reseller_id": n.mid.reseller_id, "spend": 2 * GOLD, "rate_bp": 100, "rebate": 2 * GOLD / 100},
            {"reseller_id": n.small.reseller_id, "spend": GOLD, "rate_bp": 0, "rebate": 0},
        ],
        "total": 1737 + 193,
        "currency": "CNY",
    })
}

#[tokio::test]
async fn a_month_closed_twice_and_from_two_gateways_at_once_credits_each_rebate_once() {
    let clock = ManualClock::at_unix_ms(ms(datetime!(2025-11-10 12:00 UTC)));
    let (a, t) = rebates_app(&clock, |_| {}).await;
    let b = second_gateway(&a, &clock).await;
    let n = november(&a, &t, &clock).await;
    let want = november_rebates(&n);
    assert_eq!(6 * GOLD * 300 / 10_000, 1737, "the brackets the test means");
    let before = [
        balances(&a, &n.big).await.0,
        balances(&a, &n.mid).await.0,
        balances(&a, &n.small).await.0,
    ];

    // Three closes from each gateway at once: one closes, the others wait on its month
    // row and answer what it recorded.
    let closes = (0..6).map(|i| close(if i % 2 == 0 { &a } else { &b }, &t, NOVEMBER));
    let answers = futures_util::future::join_all(closes).await;
    for (status, body, _) in &answers {
        assert_eq!((*status, body), (200, &want));
    }
    let fresh = answers.iter().filter(|(_, _, replayed)| !replayed).count();
    assert_eq!(fresh, 1, "exactly one close is not a replay");
    let (status, again, replayed) = close(&b, &t, NOVEMBER).await;
    assert_eq!((status, &again, replayed), (200, &want, true));
    let read = a
        .admin_ok(&t, Method::GET, "/admin/v1/rebates?month=2025-11", None, 200)
        .await;
    assert_eq!(read, want);

    // One ledger row per rebate, each applied to the hot balance once.
    let mut credited = vec![(n.big.reseller_id.clone(), 1737), (n.mid.reseller_id.clone(), 193)];
    credited.sort();
    assert_eq!(ledger_rebates(&a).await, credited);
    for (key, before, rebate) in [
        (&n.big, before[0], 1737),
        (&n.mid, before[1], 193),
        (&n.small, before[2], 0),
    ] {
        assert_eq!(balances(&a, key).await, (before + rebate, before + rebate));
        assert_eq!(spendable(&b, &clock, key).await, before + rebate);
    }
    assert_eq!(balances(&a, &n.idle).await, (FUNDS, FUNDS));
    assert_eq!(count(&a, "SELECT count(*) FROM hot_balance_pending").await, 0);
    let state = a.state.clone().unwrap();
    assert_eq!(cardgate::hot_balance::settle_due(&state).await.unwrap(), 0);
    assert_eq!(balances(&a, &n.big).await.1, before[0] + 1737, "nothing applied twice");

    // The callback to the one reseller with a URL; one audited close.
    let events = a
        .db()
        .await
        .query(
            "SELECT r.reseller_id, e.data FROM events e JOIN resellers r ON r.id = e.reseller_id
              WHERE e.type = 'balance.rebate_credited'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].get::<_, String>(0), n.big.reseller_id);
    assert_eq!(
        events[0].get::<_, Value>(1),
        json!({"month": NOVEMBER, "spend": 6 * GOLD, "rate_bp": 300, "amount": 1737, "currency": "CNY"})
    );
    let audit = a
        .db()
        .await
        .query(
            "SELECT actor, actor_kind, target FROM audit_log WHERE action = 'rebates.close'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(audit.len(), 1, "the replays audited nothing");
    assert_eq!(
        (
            audit[0].get::<_, &str>(0),
            audit[0].get::<_, &str>(1),
            audit[0].get::<_, &str>(2)
        ),
        (ROOT_USER, "admin", NOVEMBER)
    );
    assert!(metric(&a, "cardgate_rebates_credited_amount_total").await >= 1930.0);
    a.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_refund_after_the_close_leaves_the_closed_months_rebate_alone() {
    let clock = ManualClock::at_unix_ms(ms(datetime!(2025-11-10 12:00 UTC)));
    let (app, t) = rebates_app(&clock, |_| {}).await;
    let n = november(&app, &t, &clock).await;
    let want = november_rebates(&n);
    assert_eq!(close(&app, &t, NOVEMBER).await, (200, want.clone(), false));
    let (balance, _) = balances(&app, &n.big).await;

    // Back under the top bracket: had the month been open, big's rate would drop to 1 %.
    clock.set(ms(datetime!(2025-12-05 09:00 UTC)));
    let order = &n.big_orders[0];
    app.admin_ok(
        &t,
        Method::POST,
        &format!("/admin/v1/orders/{order}/refund"),
        Some(json!({"reason": "after the close"})),
        200,
    )
    .await;
    let read = app
        .admin_ok(&t, Method::GET, "/admin/v1/rebates?month=2025-11", None, 200)
        .await;
    assert_eq!(read, want, "the closed month as it was credited");
    assert_eq!(close(&app, &t, NOVEMBER).await, (200, want, true));
    let mut credited = vec![(n.big.reseller_id.clone(), 1737), (n.mid.reseller_id.clone(), 193)];
    credited.sort();
    assert_eq!(ledger_rebates(&app).await, credited, "no rebate taken back or added");
    assert_eq!(
        balances(&app, &n.big).await,
        (balance + GOLD, balance + GOLD),
        "the refund alone moved the balance"
    );
    // The rollups do follow the refund: an open month would have shown it.
    cardgate::rollups::step(app.state.as_ref().unwrap()).await.unwrap();
    let spend: i64 = app
        .db()
        .await
        .query_one(
            "SELECT sum(amount)::int8 FROM reseller_daily d JOIN resellers r ON r.id = d.reseller_id
              WHERE r.reseller_id = $1 AND d.day < '2025-12-01'",
            &[&n.big.reseller_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(spend, 5 * GOLD);
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn an_open_month_is_previewed_and_closes_that_cannot_be_are_refused() {
    let clock = ManualClock::at_unix_ms(ms(datetime!(2025-11-10 12:00 UTC)));
    let (app, t) = rebates_app(&clock, |_| {}).await;
    let k = buyer(&app, &t, "gold", FUNDS).await;
    order_now(&app, &clock, &k, 2).await;

    // An open month: what would be credited so far.
    let preview = app
        .admin_ok(&t, Method::GET, "/admin/v1/rebates?month=2025-11", None, 200)
        .await;
    assert_eq!(
        preview,
        json!({"month": NOVEMBER, "closed": false, "currency": "CNY", "total": 193,
               "lines": [{"reseller_id": k.reseller_id, "spend": 2 * GOLD, "rate_bp": 100, "rebate": 193}]})
    );
    let future = app
        .admin_ok(&t, Method::GET, "/admin/v1/rebates?month=2026-01", None, 200)
        .await;
    assert_eq!(
        (&future["closed"], &future["lines"], &future["total"]),
        (&json!(false), &json!([]), &json!(0))
    );

    // Not ended by the gateway's clock, even a millisecond before its end.
    clock.set(ms(datetime!(2025-11-30 23:59:59.999 UTC)));
    let resp = app
        .admin(
            &t,
            Method::POST,
            "/admin/v1/rebates/close",
            Some(json!({"month": NOVEMBER})),
        )
        .await;
    let (status, code, body) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2025-12-01T00:00:00Z"));

    // Malformed months, named; an unknown field too.
    for bad in ["2025-13", "25-11", "2025-11-01", "2025/11", "", "1969-12"] {
        let (s, c, body) = error_of(
            app.admin(&t, Method::POST, "/admin/v1/rebates/close", Some(json!({"month": bad})))
                .await,
        )
        .await;
        assert_eq!((s, c.as_str()), (400, "invalid_request"), "{bad:?}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().starts_with("month"),
            "{body}"
        );
        let (s, c, _) = error_of(
            app.admin(&t, Method::GET, &format!("/admin/v1/rebates?month={bad}"), None)
                .await,
        )
        .await;
        assert_eq!((s, c.as_str()), (400, "invalid_request"), "GET {bad:?}");
    }
    for body in [
        json!({}),
        json!({"month": 202511}),
        json!({"month": NOVEMBER, "force": true}),
    ] {
        let (s, c, _) = error_of(
            app.admin(&t, Method::POST, "/admin/v1/rebates/close", Some(body.clone()))
                .await,
        )
        .await;
        assert_eq!((s, c.as_str()), (400, "invalid_request"), "{body}");
    }
    let (s, _, _) = error_of(app.admin(&t, Method::GET, "/admin/v1/rebates", None).await).await;
    assert_eq!(s, 400, "month is required");

    // Admin only; any role reads.
    clock.set(ms(datetime!(2025-12-05 00:00 UTC)));
    for (user, role) in [("op", "operator"), ("aud", "auditor")] {
        app.admin_ok(
            &t,
            Method::POST,
            "/admin/v1/admins",
            Some(json!({"username": user, "password": "password-123", "role": role})),
            201,
        )
        .await;
        let token = app.login(user, "password-123").await;
        let (s, c, _) = error_of(
            app.admin(
                &token,
                Method::POST,
                "/admin/v1/rebates/close",
                Some(json!({"month": NOVEMBER})),
            )
            .await,
        )
        .await;
        assert_eq!((s, c.as_str()), (403, "forbidden"), "{role}");
        let read = app
            .admin_ok(&token, Method::GET, "/admin/v1/rebates?month=2025-11", None, 200)
            .await;
        assert_eq!(read["closed"], false, "{role}");
    }
    assert_eq!(
        count(&app, "SELECT count(*) FROM rebate_months").await,
        0,
        "nothing closed"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM balance_ledger WHERE kind = 'rebate'").await,
        0
    );

    // A month without spend closes with no lines.
    assert_eq!(
        close(&app, &t, "2025-10").await,
        (
            200,
            json!({"month": "2025-10", "closed": true, "lines": [], "total": 0, "currency": "CNY"}),
            false
        )
    );
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn the_step_closes_a_month_once_its_delay_has_passed_and_not_before() {
    let clock = ManualClock::at_unix_ms(ms(datetime!(2025-11-10 12:00 UTC)));
    let (app, t) = rebates_app(&clock, |env| {
        env.insert("CARDGATE_VIP__REBATE_CLOSE_DELAY_HOURS".into(), "48".into());
    })
    .await;
    let state: Arc<cardgate::app::App> = app.state.clone().unwrap();
    let step = || {
        let state = state.clone();
        async move { cardgate::rebates::step(&state).await.unwrap().map(|r| r.month) }
    };
    // A gateway with brackets closes the last month whose close is due: October, here.
    assert_eq!(step().await.as_deref(), Some("2025-10"));
    assert_eq!(step().await, None);

    let n = november(&app, &t, &clock).await;
    let (before, _) = balances(&app, &n.big).await;
    for not_yet in [datetime!(2025-12-01 00:00 UTC), datetime!(2025-12-02 23:59:59.999 UTC)] {
        clock.set(ms(not_yet));
        assert_eq!(step().await, None, "{not_yet}");
    }
    assert_eq!(
        count(&app, "SELECT count(*) FROM rebate_months WHERE month = '2025-11'").await,
        0
    );

    clock.set(ms(datetime!(2025-12-03 00:00 UTC)));
    let closed = cardgate::rebates::step(&state).await.unwrap().expect("November closed");
    assert_eq!(serde_json::to_value(&closed).unwrap(), november_rebates(&n));
    assert_eq!(step().await, None, "closed once");
    clock.set(ms(datetime!(2025-12-20 00:00 UTC)));
    assert_eq!(step().await, None);
    assert_eq!(close(&app, &t, NOVEMBER).await, (200, november_rebates(&n), true));

    let audit = app
        .db()
        .await
        .query(
            "SELECT actor, actor_kind FROM audit_log WHERE action = 'rebates.close' AND target = '2025-11'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].get::<_, &str>(0), audit[0].get::<_, &str>(1)),
        ("system", "system")
    );
    assert_eq!(balances(&app, &n.big).await, (before + 1737, before + 1737));
    assert_eq!(spendable(&app, &clock, &n.big).await, before + 1737);
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn the_command_closes_a_month_and_answers_a_closed_one_again() {
    let clock = ManualClock::at_unix_ms(ms(datetime!(2025-11-10 12:00 UTC)));
    let (app, t) = rebates_app(&clock, |_| {}).await;
    let n = november(&app, &t, &clock).await;
    let (before, _) = balances(&app, &n.big).await;
    let env = app.env.clone();
    let run = move |args: &'static [&'static str]| {
        let env = env.clone();
        // Off the test's runtime: the command runs its own.
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_cardgate"))
                .args(args)
                .env_clear()
                .envs(&env)
                .output()
                .unwrap()
        })
    };

    // The command reads the system clock, long past November 2025.
    let out = run(&["rebates", "close", NOVEMBER]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, november_rebates(&n));
    let out = run(&["rebates", "close", NOVEMBER]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "a replay succeeds");
    assert!(String::from_utf8_lossy(&out.stderr).contains("closed already"));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        november_rebates(&n)
    );

    for (args, code, says) in [
        (&["rebates", "close", "9998-12"][..], 1, "has not ended yet"),
        (&["rebates", "close", "2025-13"][..], 2, "month must be YYYY-MM"),
        (&["rebates", "close"][..], 2, "usage: cardgate rebates close"),
        (&["rebates", "open", NOVEMBER][..], 2, "usage: cardgate rebates close"),
    ] {
        let out = run(args).await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }

    let audit = app
        .db()
        .await
        .query_one(
            "SELECT actor, actor_kind FROM audit_log WHERE action = 'rebates.close'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (audit.get::<_, &str>(0), audit.get::<_, &str>(1)),
        ("cardgate rebates close", "system")
    );
    // The command reached the hot balance itself.
    assert_eq!(balances(&app, &n.big).await, (before + 1737, before + 1737));
    assert_eq!(count(&app, "SELECT count(*) FROM hot_balance_pending").await, 0);
    app.assert_reconciled(&t).await;
}
