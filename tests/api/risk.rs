//! Spend limits and risk rules (docs/api.md §7): limits counted in the reservation script,
//! exact across gateways; holds that refuse orders until released and survive a Redis
//! rebuild; rules that flag; and no rule a third party can use to lock a reseller out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::orders::{buyer, hold_the_head_twice, shop_with, GOLD, SKU};

/// A signed order sent from `from` (an address of the loopback range).
async fn order_from(app: &TestApp, k: &ResellerKey, from: IpAddr, mon: &str) -> (u16, Value) {
    let client = reqwest::Client::builder().local_address(from).build().unwrap();
    let body = order_body(SKU, 1, mon).to_string();
    let resp = app
        .signed_request_via(
            &client,
            k,
            Method::POST,
            "/v1/orders",
            Some(&body),
            now_secs(),
            &nonce(),
            &[],
        )
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn risk_events(app: &TestApp, t: &str, reseller_id: &str) -> Vec<Value> {
    let path = format!("/admin/v1/risk/events?reseller_id={reseller_id}");
    let r = app.admin_ok(t, Method::GET, &path, None, 200).await;
    r["events"].as_array().unwrap().clone()
}

async fn callbacks_of(app: &TestApp, kind: &str) -> i64 {
    app.db()
        .await
        .query_one("SELECT count(*) FROM events WHERE type = $1", &[&kind])
        .await
        .unwrap()
        .get(0)
}

fn manual(env: &mut HashMap<String, String>) {
    env.insert(MANUAL_BACKGROUND.into(), "1".into());
}

/// At midnight a gateway whose clock is a moment behind another's still counts into the
/// day the other began: it never moves the counter back to its own day and so forgets
/// what was spent after midnight.
#[tokio::test]
async fn a_gateway_a_moment_behind_at_midnight_counts_into_the_later_day() {
    let (app, t, _) = shop_with(5, manual).await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;
    app.patch_reseller(&t, &k.reseller_id, json!({"daily_spend_limit": 2 * GOLD + 99}))
        .await;
    // As another gateway, already past midnight, left it: two gold codes spent tomorrow.
    let tomorrow = cardgate::reserve::utc_day(now_secs() + 86_400);
    let risk = app.keys().risk(app.reseller_pk(&k.reseller_id).await);
    let mut r = app.redis().await;
    let _: () = redis::cmd("HSET")
        .arg(&risk)
        .arg("day")
        .arg(&tomorrow)
        .arg("spent")
        .arg(2 * GOLD)
        .query_async(&mut r)
        .await
        .unwrap();
    let (status, body, _) = app.order(&k, order_body(SKU, 1, "MIDNIGHT-1")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (402, Some("spend_limit_exceeded")),
        "{body}"
    );
    let day: String = redis::cmd("HGET")
        .arg(&risk)
        .arg("day")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(day, tomorrow, "the day was not moved back");

    // Room for two more codes; a reservation undone (the last guard: both copies of a
    // code doubled in Redis) gives its spend back to the later day it was counted in.
    app.patch_reseller(&t, &k.reseller_id, json!({"daily_spend_limit": 10 * GOLD}))
        .await;
    hold_the_head_twice(&mut r, &app.import_pool(app.product_pk(SKU).await)).await;
    let (status, body, _) = app.order(&k, order_body(SKU, 2, "MIDNIGHT-2")).await;
    assert_eq!(status, 201, "{body}");
    let spent: i64 = redis::cmd("HGET")
        .arg(&risk)
        .arg("spent")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(
        spent,
        4 * GOLD,
        "two codes of tomorrow before, two now, the undone two given back"
    );
}

#[tokio::test]
async fn a_daily_spend_limit_is_never_passed_by_concurrent_orders_on_two_gateways_nor_forgotten_by_a_rebuild() {
    let (a, t, _) = shop_with(40, manual).await;
    let b = start(a.env.clone()).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let k = Arc::new(buyer(&a, &t, "gold", 1_000_000).await);
    // Five gold codes fit, and 99 minor units more: not a sixth.
    let path = format!("/admin/v1/resellers/{}", k.reseller_id);
    let r = a
        .admin_ok(
            &t,
            Method::PATCH,
            &path,
            Some(json!({"daily_spend_limit": 5 * GOLD + 99})),
            200,
        )
        .await;
    assert_eq!(r["daily_spend_limit"], 5 * GOLD + 99);
    let seen = eventually(Duration::from_secs(2), || async {
        b.state
            .as_ref()
            .unwrap()
            .key_cache
            .get(&k.key_id)
            .is_some_and(|e| e.reseller.daily_spend_limit.is_some())
    })
    .await;
    assert!(seen, "the second gateway sees the limit");

    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let (gw, k) = (if i % 2 == 0 { a.clone() } else { b.clone() }, k.clone());
            tokio::spawn(async move { gw.order(&k, order_body(SKU, 1, &format!("SL-{i}"))).await })
        })
        .collect();
    let mut sold = 0;
    for task in tasks {
        let (s, body, _) = task.await.unwrap();
        match s {
            201 => sold += 1,
            _ => assert_eq!(
                (s, body["error"]["code"].as_str()),
                (402, Some("spend_limit_exceeded")),
                "{body}"
            ),
        }
    }
    assert_eq!(sold, 5);
    let spent: i64 = a
        .db()
        .await
        .query_one(
            "SELECT sum(o.amount)::int8 FROM orders o JOIN resellers r ON r.id = o.reseller_id WHERE r.reseller_id = $1",
            &[&k.reseller_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(spent, 5 * GOLD);
    assert_eq!(
        a.balance_of(&k).await,
        1_000_000 - 5 * GOLD,
        "nothing taken by the refusals"
    );

    // A rebuild counts today's spend again from Postgres: still full.
    cardgate::rebuild::rebuild(a.state.as_ref().unwrap(), true)
        .await
        .unwrap();
    let (s, body, _) = b.order(&k, order_body(SKU, 1, "SL-after-rebuild")).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (402, Some("spend_limit_exceeded")),
        "{body}"
    );
    // Raised by one code's worth: exactly one more.
    a.admin_ok(
        &t,
        Method::PATCH,
        &path,
        Some(json!({"daily_spend_limit": 6 * GOLD})),
        200,
    )
    .await;
    let raised = eventually(Duration::from_secs(2), || async {
        b.state
            .as_ref()
            .unwrap()
            .key_cache
            .get(&k.key_id)
            .and_then(|e| e.reseller.daily_spend_limit)
            == Some(6 * GOLD)
    })
    .await;
    assert!(raised);
    assert_eq!(b.order(&k, order_body(SKU, 1, "SL-raised")).await.0, 201);
    assert_eq!(a.order(&k, order_body(SKU, 1, "SL-over")).await.0, 402);
    // Removed: no limit.
    a.admin_ok(&t, Method::PATCH, &path, Some(json!({"daily_spend_limit": null})), 200)
        .await;
    assert_eq!(a.order(&k, order_body(SKU, 1, "SL-unlimited")).await.0, 201);
    a.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_hold_from_a_second_address_refuses_orders_until_released_and_survives_a_rebuild() {
    let (app, t, _) = shop_with(10, |env| {
        manual(env);
        env.insert("CARDGATE_RISK__NEW_ADDRESS".into(), "hold".into());
    })
    .await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;
    let state = app.state.clone().unwrap();
    let home: IpAddr = "127.0.0.1".parse().unwrap();
    let away: IpAddr = "127.0.0.2".parse().unwrap();
    assert_eq!(order_from(&app, &k, home, "H-1").await.0, 201);
    assert_eq!(order_from(&app, &k, home, "H-2").await.0, 201);
    cardgate::risk::step(&state).await.unwrap();
    assert!(
        risk_events(&app, &t, &k.reseller_id).await.is_empty(),
        "the first address is not new"
    );

    // The order from the new address is the one the rule suspects: it is refused and takes
    // nothing, and the hold refuses the next at once, before the background has recorded
    // it.
    let before = app.balance_of(&k).await;
    let (s, body) = order_from(&app, &k, away, "H-3").await;
    assert_eq!((s, body["error"]["code"].as_str()), (403, Some("risk_hold")), "{body}");
    assert_eq!(app.balance_of(&k).await, before, "the held order took nothing");
    let (s, body) = order_from(&app, &k, home, "H-next").await;
    assert_eq!((s, body["error"]["code"].as_str()), (403, Some("risk_hold")), "{body}");
    assert_eq!(cardgate::risk::step(&state).await.unwrap(), 1);
    let events = risk_events(&app, &t, &k.reseller_id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0]["rule"].as_str(), events[0]["action"].as_str()),
        (Some("new_address"), Some("hold"))
    );
    assert_eq!(events[0]["details"]["address"], "127.0.0.2");
    assert_eq!(callbacks_of(&app, "account.held").await, 0, "no callback URL, no event");
    for from in [home, away] {
        let (s, body) = order_from(&app, &k, from, &format!("H-held-{from}")).await;
        assert_eq!((s, body["error"]["code"].as_str()), (403, Some("risk_hold")), "{body}");
    }
    let r = app
        .admin_ok(
            &t,
            Method::GET,
            &format!("/admin/v1/resellers/{}", k.reseller_id),
            None,
            200,
        )
        .await;
    assert_eq!(r["risk_hold"]["rule"], "new_address");

    // Redis loses everything: the hold comes back from Postgres.
    cardgate::rebuild::rebuild(&state, true).await.unwrap();
    assert_eq!(order_from(&app, &k, home, "H-4").await.0, 403);

    let path = format!("/admin/v1/resellers/{}/risk/release", k.reseller_id);
    let r = app.admin_ok(&t, Method::POST, &path, None, 200).await;
    assert_eq!(
        (r["released"].as_bool(), r["rule"].as_str()),
        (Some(true), Some("new_address"))
    );
    let again = app.admin_ok(&t, Method::POST, &path, None, 200).await;
    assert_eq!(again["released"], false, "a second release has nothing to end");
    // Released, the address the operator saw is no longer new: its order goes through,
    // the very number the hold refused included.
    assert_eq!(order_from(&app, &k, away, "H-3").await.0, 201);
    assert_eq!(order_from(&app, &k, away, "H-5").await.0, 201);
    let audit = app
        .admin_ok(
            &t,
            Method::GET,
            "/admin/v1/audit?action=reseller.risk_release",
            None,
            200,
        )
        .await;
    assert_eq!(audit["entries"].as_array().map(Vec::len), Some(1), "{audit}");
    app.assert_reconciled(&t).await;
}

/// A hold is placed by the reservation that fires it, in the same script: the orders of a
/// batch, reserved concurrently, are refused from that one on, not served until the
/// background has recorded the hold in Postgres.
#[tokio::test]
async fn a_velocity_hold_refuses_the_order_that_fired_it_and_every_one_after() {
    let (app, t, _) = shop_with(12, |env| {
        manual(env);
        env.insert("CARDGATE_RISK__VELOCITY".into(), "hold".into());
        env.insert("CARDGATE_RISK__VELOCITY_MIN_PER_MINUTE".into(), "2".into());
    })
    .await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;
    let orders: Vec<Value> = (0..6).map(|i| order_body(SKU, 1, &format!("VH-{i}"))).collect();
    let minute = || cardgate::clock::Clock::System.now_unix_secs() / 60;
    let first_minute = minute();
    let resp = app
        .signed(
            &k,
            Method::POST,
            "/v1/orders/batch",
            Some(&json!({ "orders": orders }).to_string()),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let one_minute = minute() == first_minute;
    let mut statuses: Vec<i64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_i64().unwrap())
        .collect();
    statuses.sort();
    // Two served, and the third, which fires the rule, refused with the rest. A batch
    // that straddles a minute fires in the minute that has three of its orders, so two
    // more at most are served before it.
    let served = statuses.iter().filter(|s| **s == 201).count();
    if one_minute {
        assert_eq!(served, 2, "{body}");
    } else {
        assert!((2..=4).contains(&served), "{body}");
    }
    for r in body["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] != 201)
    {
        assert_eq!(
            (r["status"].as_i64(), r["error"]["code"].as_str()),
            (Some(403), Some("risk_hold")),
            "{r}"
        );
    }
    cardgate::risk::step(&app.state.clone().unwrap()).await.unwrap();
    let r = app
        .admin_ok(
            &t,
            Method::GET,
            &format!("/admin/v1/resellers/{}", k.reseller_id),
            None,
            200,
        )
        .await;
    assert_eq!(r["risk_hold"]["rule"], "velocity", "{r}");
    let (s, body, _) = app.order(&k, order_body(SKU, 1, "VH-after")).await;
    assert_eq!((s, body["error"]["code"].as_str()), (403, Some("risk_hold")), "{body}");
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_velocity_burst_is_flagged_once_and_refuses_nothing() {
    let (app, t, _) = shop_with(12, |env| {
        manual(env);
        env.insert("CARDGATE_RISK__VELOCITY_MIN_PER_MINUTE".into(), "5".into());
    })
    .await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;
    for i in 0..9 {
        let (s, body, _) = app.order(&k, order_body(SKU, 1, &format!("V-{i}"))).await;
        assert_eq!(s, 201, "{body}");
    }
    cardgate::risk::step(&app.state.clone().unwrap()).await.unwrap();
    let events = risk_events(&app, &t, &k.reseller_id).await;
    let velocity: Vec<_> = events.iter().filter(|e| e["rule"] == "velocity").collect();
    // Unless the burst straddled a minute, once; never once per order.
    assert!((1..=2).contains(&velocity.len()), "{events:?}");
    assert_eq!(velocity[0]["action"], "flag");
    let listed = app
        .admin_ok(&t, Method::GET, "/admin/v1/risk/events?rule=velocity", None, 200)
        .await;
    assert_eq!(listed["events"].as_array().map(Vec::len), Some(velocity.len()));
    assert!(metric(&app, "cardgate_risk_events_total").await >= 1.0);
}

#[tokio::test]
async fn failed_signatures_only_flag_and_the_real_reseller_keeps_ordering() {
    let (app, t, _) = shop_with(3, |env| {
        manual(env);
        env.insert("CARDGATE_RISK__FAILED_SIGNATURES_PER_MINUTE".into(), "3".into());
    })
    .await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;
    // Someone who knows only the key_id.
    let forger = ResellerKey {
        secret: "not-the-secret".into(),
        ..k.clone()
    };
    for i in 0..10 {
        let resp = app.post_order(&forger, order_body(SKU, 1, &format!("F-{i}"))).await;
        assert_eq!(error_of(resp).await.1, "invalid_signature");
    }
    cardgate::risk::step(&app.state.clone().unwrap()).await.unwrap();
    let events = risk_events(&app, &t, &k.reseller_id).await;
    assert_eq!(events.len(), 1, "once a minute: {events:?}");
    assert_eq!(
        (events[0]["rule"].as_str(), events[0]["action"].as_str()),
        (Some("failed_signatures"), Some("flag"))
    );
    assert_eq!(app.order(&k, order_body(SKU, 1, "F-real")).await.0, 201);

    // The rule cannot be set to hold at all.
    let mut env = app.env.clone();
    env.insert("CARDGATE_RISK__FAILED_SIGNATURES".into(), "hold".into());
    let err = cardgate::config::Config::load(&env).and_then(|c| c.validate().map(|_| ()));
    assert!(err.is_err_and(|e| e.to_string().contains("failed_signatures")));
}

#[tokio::test]
async fn a_refund_rate_over_its_limit_holds_the_reseller() {
    let (app, t, _) = shop_with(6, |env| {
        manual(env);
        env.insert("CARDGATE_RISK__REFUND_RATE".into(), "hold".into());
        env.insert("CARDGATE_RISK__REFUND_RATE_MAX".into(), "0.3".into());
    })
    .await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let (s, body, _) = app.order(&k, order_body(SKU, 1, &format!("RR-{i}"))).await;
        assert_eq!(s, 201);
        ids.push(body["order_id"].as_str().unwrap().to_string());
    }
    let refund = |id: &str| format!("/admin/v1/orders/{id}/refund");
    // One in four (25%) is within 30%; two in four is not.
    app.admin_ok(&t, Method::POST, &refund(&ids[0]), Some(json!({})), 200)
        .await;
    assert!(risk_events(&app, &t, &k.reseller_id).await.is_empty());
    assert_eq!(app.order(&k, order_body(SKU, 1, "RR-ok")).await.0, 201);
    app.admin_ok(&t, Method::POST, &refund(&ids[1]), Some(json!({})), 200)
        .await;
    let events = risk_events(&app, &t, &k.reseller_id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0]["rule"].as_str(), events[0]["action"].as_str()),
        (Some("refund_rate"), Some("hold"))
    );
    let (s, body, _) = app.order(&k, order_body(SKU, 1, "RR-held")).await;
    assert_eq!((s, body["error"]["code"].as_str()), (403, Some("risk_hold")));
    app.assert_reconciled(&t).await;
}

#[tokio::test]
async fn a_keys_own_daily_limit_binds_that_key_only_and_survives_a_rebuild() {
    let (app, t, _) = shop_with(10, manual).await;
    let k = buyer(&app, &t, "gold", 1_000_000).await;
    let path = format!("/admin/v1/resellers/{}/keys", k.reseller_id);
    let made = app
        .admin_ok(
            &t,
            Method::POST,
            &path,
            Some(json!({"daily_spend_limit": 2 * GOLD, "label": "script"})),
            201,
        )
        .await;
    assert_eq!(made["daily_spend_limit"], 2 * GOLD);
    let limited = ResellerKey {
        key_id: made["key_id"].as_str().unwrap().into(),
        secret: made["secret"].as_str().unwrap().into(),
        ..k.clone()
    };
    let bad = app
        .admin(&t, Method::POST, &path, Some(json!({"daily_spend_limit": -1})))
        .await;
    assert_eq!(error_of(bad).await.0, 400);
    assert_eq!(app.order(&limited, order_body(SKU, 1, "K-1")).await.0, 201);
    assert_eq!(app.order(&limited, order_body(SKU, 1, "K-2")).await.0, 201);
    let (s, body, _) = app.order(&limited, order_body(SKU, 1, "K-3")).await;
    assert_eq!((s, body["error"]["code"].as_str()), (402, Some("spend_limit_exceeded")));
    // The reseller's other key is not bound by it.
    assert_eq!(app.order(&k, order_body(SKU, 1, "K-other")).await.0, 201);
    // A rebuild counts the key's day again from the orders, which record their key.
    cardgate::rebuild::rebuild(app.state.as_ref().unwrap(), true)
        .await
        .unwrap();
    assert_eq!(app.order(&limited, order_body(SKU, 1, "K-4")).await.0, 402);
    let keys = app.admin_ok(&t, Method::GET, &path, None, 200).await;
    let listed = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["key_id"] == made["key_id"])
        .cloned();
    assert_eq!(listed.map(|x| x["daily_spend_limit"].clone()), Some(json!(2 * GOLD)));
    app.assert_reconciled(&t).await;
}
