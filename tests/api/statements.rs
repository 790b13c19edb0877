//! Statements (docs/api.md §6, docs/invariants.md invariant 11): every movement of a
//! balance once, newest first, summing to the balance Postgres holds, through paging that
//! neither repeats nor skips while new movements commit.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::orders::{buyer, shop, GOLD, SKU};

/// What an entry says, without its id and time: (type, amount, order_id, reference).
type Movement = (String, i64, Option<String>, Option<String>);

fn movement(e: &Value) -> Movement {
    let text = |f: &str| e[f].as_str().map(str::to_owned);
    (
        text("type").unwrap(),
        e["amount"].as_i64().unwrap(),
        text("order_id"),
        text("reference"),
    )
}

/// `done` (oldest first, each step answered before the next began) in the order a
/// statement lists it: newest first, whatever their kinds, steps of one second included.
/// Each must be in `statement`.
fn in_statement_order(done: &[Movement], statement: &[Value]) -> Vec<Movement> {
    for m in done {
        assert!(statement.iter().any(|e| movement(e) == *m), "{m:?} is in the statement");
    }
    done.iter().rev().cloned().collect()
}

fn ids(entries: &[Value]) -> Vec<String> {
    entries.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect()
}

fn entries(page: &Value) -> Vec<Value> {
    page["entries"].as_array().unwrap().clone()
}

/// `GET /v1/ledger?<query>` as the reseller, expected `200`.
async fn own(app: &TestApp, k: &ResellerKey, query: impl Into<String>) -> Value {
    let query = query.into();
    let resp = app.signed(k, Method::GET, &format!("/v1/ledger?{query}"), None).await;
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{query}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// Every page of `limit` entries, read by `page` (a query to its answer), in order;
/// every page but the last is full and has a cursor.
async fn every_page<F, Fut>(limit: usize, mut page: F) -> Vec<Value>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let mut all = Vec::new();
    let mut query = format!("limit={limit}");
    loop {
        let p = page(query).await;
        let got = entries(&p);
        all.extend(got.iter().cloned());
        match p["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(got.len(), limit, "a page with a cursor after it is full");
                query = format!("limit={limit}&cursor={c}");
            }
            None => return all,
        }
    }
}

async fn adjust(app: &TestApp, t: &str, reseller_id: &str, amount: i64, reference: &str) {
    app.admin_ok(
        t,
        Method::POST,
        &format!("/admin/v1/resellers/{reseller_id}/balance"),
        Some(json!({"amount": amount, "reference": reference})),
        200,
    )
    .await;
}

/// Places an order of `quantity` and answers its id and amount.
async fn buy(app: &TestApp, k: &ResellerKey, quantity: i64, mon: &str) -> (String, i64) {
    let (status, o, _) = app.order(k, order_body(SKU, quantity, mon)).await;
    assert_eq!(status, 201, "{o}");
    (
        o["order_id"].as_str().unwrap().to_owned(),
        o["amount"].as_i64().unwrap(),
    )
}

async fn refund(app: &TestApp, t: &str, order_id: &str) {
    app.admin_ok(
        t,
        Method::POST,
        &format!("/admin/v1/orders/{order_id}/refund"),
        Some(json!({})),
        200,
    )
    .await;
}

fn order(id: &str, amount: i64) -> Movement {
    ("order".into(), -amount, Some(id.into()), None)
}

fn refunded(id: &str, amount: i64) -> Movement {
    ("refund".into(), amount, Some(id.into()), None)
}

fn adjusted(amount: i64, reference: &str) -> Movement {
    let kind = if amount > 0 { "credit" } else { "debit" };
    (kind.into(), amount, None, Some(reference.into()))
}

/// Orders, refunds, credits and debits, several of each: read page by page, each
/// appears once, newest first, as mapped, and together they are the balance; the
/// operators' route (auditors included) shows the same statement, and no reseller sees
/// another's.
#[tokio::test]
async fn a_statement_is_every_movement_once_newest_first_and_sums_to_the_balance() {
    let (app, t, _) = shop(20).await;
    let k = buyer(&app, &t, "gold", 0).await;
    let rid = k.reseller_id.clone();
    // Oldest first, as done; each step answered before the next starts, so their times
    // follow one another.
    let mut want = Vec::new();
    adjust(&app, &t, &rid, 300_000, "opening").await;
    want.push(adjusted(300_000, "opening"));
    let (o1, a1) = buy(&app, &k, 1, "S-1").await;
    want.push(order(&o1, a1));
    let (o2, a2) = buy(&app, &k, 2, "S-2").await;
    want.push(order(&o2, a2));
    adjust(&app, &t, &rid, -1_500, "fee-1").await;
    want.push(adjusted(-1_500, "fee-1"));
    refund(&app, &t, &o1).await;
    want.push(refunded(&o1, a1));
    adjust(&app, &t, &rid, 20_000, "topup-2").await;
    want.push(adjusted(20_000, "topup-2"));
    let (o3, a3) = buy(&app, &k, 3, "S-3").await;
    want.push(order(&o3, a3));
    let (o4, a4) = buy(&app, &k, 1, "S-4").await;
    want.push(order(&o4, a4));
    adjust(&app, &t, &rid, -700, "fee-2").await;
    want.push(adjusted(-700, "fee-2"));
    refund(&app, &t, &o3).await;
    want.push(refunded(&o3, a3));
    let (o5, a5) = buy(&app, &k, 2, "S-5").await;
    want.push(order(&o5, a5));
    adjust(&app, &t, &rid, 1, "cent").await;
    want.push(adjusted(1, "cent"));
    assert_eq!(a1, GOLD);

    let statement = every_page(5, |q| own(&app, &k, q)).await;
    assert_eq!(
        statement.iter().map(movement).collect::<Vec<_>>(),
        in_statement_order(&want, &statement)
    );
    let seen = ids(&statement);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), want.len(), "each entry once");
    for e in &statement {
        let id = e["id"].as_str().unwrap();
        assert!(
            id.len() == 36 && id.starts_with("led_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit()),
            "{e}"
        );
        assert_eq!(e["currency"], "CNY");
        assert!(e["created_at"].as_str().unwrap().ends_with('Z'), "{e}");
    }
    let times: Vec<&str> = statement.iter().map(|e| e["created_at"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
    let sum: i64 = statement.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(
        sum,
        app.recorded_balance(&rid).await,
        "the statement sums to the balance"
    );
    assert_eq!(
        sum,
        app.balance_of(&k).await,
        "nothing in flight: the spendable one too"
    );
    // Ids are stable: another page size reads the same entries under the same ids.
    assert_eq!(ids(&every_page(12, |q| own(&app, &k, q)).await), seen);
    assert_eq!(ids(&every_page(1, |q| own(&app, &k, q)).await), seen);

    // A read like any other: rate-limited as one, and nothing to audit.
    let resp = app.signed(&k, Method::GET, "/v1/ledger", None).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("ratelimit-remaining"));
    let audited: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM audit_log WHERE actor_kind = 'reseller'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 0);

    // The operators' route: the same statement, for every role.
    app.admin_ok(
        &t,
        Method::POST,
        "/admin/v1/admins",
        Some(json!({"username": "aud", "password": "aud-password-1", "role": "auditor"})),
        201,
    )
    .await;
    let aud = app.login("aud", "aud-password-1").await;
    for token in [&t, &aud] {
        let path = format!("/admin/v1/resellers/{rid}/ledger");
        let read = every_page(5, |q| {
            let (app, path) = (&app, format!("{path}?{q}"));
            async move { app.admin_ok(token, Method::GET, &path, None, 200).await }
        })
        .await;
        assert_eq!(read, statement);
    }
    let resp = app
        .admin(&t, Method::GET, "/admin/v1/resellers/rs_nobody/ledger", None)
        .await;
    assert_eq!(error_of(resp).await.0, 404);

    // Another reseller reads its own statement only, and no cursor of this one.
    let other = buyer(&app, &t, "gold", 50_000).await;
    let theirs = entries(&own(&app, &other, "").await);
    assert_eq!(theirs.len(), 1);
    assert!(!seen.contains(&theirs[0]["id"].as_str().unwrap().to_owned()));
    let cursor = own(&app, &k, "limit=2").await["next_cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = app
        .signed(&other, Method::GET, &format!("/v1/ledger?cursor={cursor}"), None)
        .await;
    let (status, code, body) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    assert!(body["error"]["message"].as_str().unwrap().contains("cursor"), "{body}");
    let resp = app
        .admin(
            &t,
            Method::GET,
            &format!("/admin/v1/resellers/{}/ledger?cursor={cursor}", other.reseller_id),
            None,
        )
        .await;
    assert_eq!(error_of(resp).await.1, "invalid_request");
    app.assert_reconciled(&t).await;
}

/// Paging read each entry of `before` (the statement when paging began) once and in
/// its order, and nothing twice; what else it read committed meanwhile.
fn assert_read_once_in_order(read: &[Value], before: &[String]) {
    let read = ids(read);
    assert_eq!(read.iter().collect::<HashSet<_>>().len(), read.len(), "no entry twice");
    let older: Vec<&String> = read.iter().filter(|id| before.contains(id)).collect();
    assert_eq!(older, before.iter().collect::<Vec<_>>(), "every older entry, in order");
}

/// New movements commit between pages, and while pages are read: the entries that were
/// there when paging began are each read once, in order, none skipped; a movement
/// committed late under an older time is read too, further down.
#[tokio::test]
async fn paging_neither_repeats_nor_skips_while_orders_commit() {
    let (app, t, _) = shop(60).await;
    let k = buyer(&app, &t, "gold", 10_000_000).await;
    for i in 0..7 {
        buy(&app, &k, 1, &format!("P-{i}")).await;
    }
    let before = ids(&entries(&own(&app, &k, "limit=1000").await));
    assert_eq!(before.len(), 8);

    // Between pages: two orders after each, and after the first a movement whose time
    // is older than all (as an order reserved before a Postgres outage commits late).
    let db = app.db().await;
    let mut pages = 0;
    let read = every_page(3, |q| {
        pages += 1;
        let (app, k, db, page_no) = (&app, &k, &db, pages);
        async move {
            let page = own(app, k, q).await;
            buy(app, k, 1, &format!("B-{page_no}-a")).await;
            buy(app, k, 1, &format!("B-{page_no}-b")).await;
            if page_no == 1 {
                db.execute(
                    "INSERT INTO balance_ledger (reseller_id, amount, kind, reference, created_at)
                     SELECT id, 5, 'adjustment', 'late', '2020-01-01T00:00:00Z' FROM resellers WHERE reseller_id = $1",
                    &[&k.reseller_id],
                )
                .await
                .unwrap();
            }
            page
        }
    })
    .await;
    assert_read_once_in_order(&read, &before);
    assert_eq!(read.last().map(movement), Some(adjusted(5, "late")));

    // While pages are read.
    let before = ids(&entries(&own(&app, &k, "limit=1000").await));
    let buying = async {
        for i in 0..20 {
            buy(&app, &k, 1, &format!("C-{i}")).await;
        }
    };
    let paging = every_page(2, |q| own(&app, &k, q));
    let ((), read) = tokio::join!(buying, paging);
    assert_read_once_in_order(&read, &before);

    let statement = every_page(1000, |q| own(&app, &k, q)).await;
    assert_eq!(statement.len(), 1 + 7 + 2 * pages + 1 + 20);
    let sum: i64 = statement.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(sum, app.recorded_balance(&k.reseller_id).await);
}

/// `GET /v1/ledger` with `Accept: text/csv`.
async fn own_csv(app: &TestApp, k: &ResellerKey, query: &str) -> (String, Option<String>) {
    let resp = app
        .signed_at(
            k,
            Method::GET,
            &format!("/v1/ledger?{query}"),
            None,
            now_secs(),
            &nonce(),
            &[("accept", "text/csv")],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let next = resp
        .headers()
        .get("next-cursor")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.text().await.unwrap(), next)
}

/// The CSV statement is the JSON one: the same columns and rows page by page, nulls as
/// empty cells, amounts as integers, and a reference that would run as a formula
/// defused; the next page's cursor comes in `Next-Cursor`.
#[tokio::test]
async fn the_csv_statement_is_the_json_one() {
    let (app, t, _) = shop(5).await;
    let k = buyer(&app, &t, "gold", 0).await;
    let (header, nothing) = own_csv(&app, &k, "").await;
    assert_eq!(header, "id,type,amount,currency,order_id,reference,created_at\n");
    assert_eq!(nothing, None);

    adjust(&app, &t, &k.reseller_id, 100_000, "=1+2").await;
    let (o1, _) = buy(&app, &k, 2, "C-1").await;
    buy(&app, &k, 1, "C-2").await;
    refund(&app, &t, &o1).await;
    adjust(&app, &t, &k.reseller_id, -300, "fee, \"quoted\"").await;

    let json = every_page(2, |q| own(&app, &k, q)).await;
    assert_eq!(json.len(), 5);
    let mut csv_rows = Vec::new();
    let mut query = "limit=2".to_owned();
    loop {
        let (text, next) = own_csv(&app, &k, &query).await;
        let mut r = csv::Reader::from_reader(text.as_bytes());
        assert_eq!(
            r.headers().unwrap(),
            vec![
                "id",
                "type",
                "amount",
                "currency",
                "order_id",
                "reference",
                "created_at"
            ]
        );
        let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), if next.is_some() { 2 } else { 1 }, "{text}");
        csv_rows.extend(rows);
        match next {
            Some(c) => query = format!("limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(csv_rows.len(), json.len());
    for (row, e) in csv_rows.iter().zip(&json) {
        let text = |f: &str| e[f].as_str().unwrap_or("").to_owned();
        let reference = match text("reference") {
            r if r.starts_with('=') => format!("'{r}"),
            r => r,
        };
        assert_eq!(
            row.iter().collect::<Vec<_>>(),
            vec![
                text("id"),
                text("type"),
                e["amount"].as_i64().unwrap().to_string(),
                text("currency"),
                text("order_id"),
                reference,
                text("created_at"),
            ],
            "{e}"
        );
    }
    let reference = |kind: &str| csv_rows.iter().find(|r| &r[1] == kind).unwrap()[5].to_owned();
    assert_eq!(reference("debit"), "fee, \"quoted\"");
    assert_eq!(reference("credit"), "'=1+2");

    // The operators' route answers CSV the same way.
    let resp = app
        .client
        .get(app.url(&format!("/admin/v1/resellers/{}/ledger?limit=1", k.reseller_id)))
        .bearer_auth(&t)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("next-cursor"));
    let text = resp.text().await.unwrap();
    assert_eq!(text.lines().nth(1).unwrap().split(',').next(), Some(&csv_rows[0][0]));
}

/// `from` and `to` bound the statement to `[from, to)`, and with paging too; a query the
/// statement cannot take is `400 invalid_request` naming what is wrong, on both routes.
#[tokio::test]
async fn from_and_to_bound_the_statement_and_bad_queries_are_refused() {
    let (app, t, _) = shop(5).await;
    let k = buyer(&app, &t, "gold", 0).await;
    for (i, amount) in [1_000, 2_000, 3_000, 4_000, 5_000].into_iter().enumerate() {
        adjust(&app, &t, &k.reseller_id, amount, &format!("step-{i}")).await;
    }
    // The movements' own times, to the microsecond, oldest first.
    let times: Vec<String> = app
        .db()
        .await
        .query(
            "SELECT l.created_at FROM balance_ledger l JOIN resellers r ON r.id = l.reseller_id
              WHERE r.reseller_id = $1 ORDER BY l.created_at",
            &[&k.reseller_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            r.get::<_, time::OffsetDateTime>(0)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        })
        .collect();
    assert_eq!(times.len(), 5);
    let amounts = |page: Vec<Value>| page.iter().map(|e| e["amount"].as_i64().unwrap()).collect::<Vec<_>>();
    for (query, want) in [
        (format!("from={}", times[2]), vec![5_000, 4_000, 3_000]),
        (format!("to={}", times[2]), vec![2_000, 1_000]),
        (format!("from={}&to={}", times[1], times[3]), vec![3_000, 2_000]),
        (format!("from={}&to={}", times[1], times[4]), vec![4_000, 3_000, 2_000]),
    ] {
        let read = every_page(1, |q| own(&app, &k, format!("{query}&{q}"))).await;
        assert_eq!(amounts(read), want, "{query}");
        let page = app
            .admin_ok(
                &t,
                Method::GET,
                &format!("/admin/v1/resellers/{}/ledger?{query}", k.reseller_id),
                None,
                200,
            )
            .await;
        assert_eq!(amounts(entries(&page)), want, "{query}");
    }

    let cursor = own(&app, &k, "limit=1").await["next_cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    let (kept, last) = cursor.split_at(cursor.len() - 1);
    let edited = format!("{kept}{}", if last == "0" { "1" } else { "0" });
    let time_values = [
        "yesterday",
        "9999-12-31T23:59:59Z",
        "1969-12-31T23:59:59Z",
        "%2B10000-01-01T00:00:00Z",
    ];
    let mut bad: Vec<(String, &str)> = vec![
        ("cursor=zz".into(), "cursor"),
        ("cursor=00".into(), "cursor"),
        (format!("cursor={}", &cursor[..cursor.len() - 2]), "cursor"),
        (format!("cursor={edited}"), "cursor"),
        (format!("cursor={cursor}&cursor={cursor}"), "cursor"),
        ("limit=0".into(), "limit"),
        ("limit=1001".into(), "limit"),
        ("limit=ten".into(), "limit"),
        (format!("from={}&to={}", times[2], times[2]), "from"),
        (format!("from={}&to={}", times[3], times[2]), "from"),
    ];
    for param in ["from", "to"] {
        for v in time_values {
            bad.push((format!("{param}={v}"), param));
        }
    }
    for (query, names) in &bad {
        let resp = app.signed(&k, Method::GET, &format!("/v1/ledger?{query}"), None).await;
        let (status, code, body) = error_of(resp).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{query}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{query}: {message}");
        let path = format!("/admin/v1/resellers/{}/ledger?{query}", k.reseller_id);
        let resp = app.admin(&t, Method::GET, &path, None).await;
        let (status, code, _) = error_of(resp).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "admin: {query}");
    }
}

/// Every kind `balance_ledger` may hold has a statement type, so a migration adding a
/// kind without one fails here; rebates, and upstream failures once §8 adds their kind,
/// show as mapped.
#[tokio::test]
async fn every_ledger_kind_shows_as_its_type() {
    let (app, t, _) = shop(2).await;
    let k = buyer(&app, &t, "gold", 100_000).await;
    let db = app.db().await;
    let check: String = db
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'balance_ledger_kind_check'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let kinds: Vec<&str> = check.split('\'').skip(1).step_by(2).collect();
    assert!(kinds.contains(&"rebate"), "{check}");
    for kind in &kinds {
        for amount in [1, -1] {
            assert!(
                cardgate::statements::EntryType::of_ledger(kind, amount).is_some(),
                "balance_ledger kind {kind} ({amount}) has no statement type"
            );
        }
    }

    let (order_id, amount) = buy(&app, &k, 1, "K-1").await;
    let pk = app.reseller_pk(&k.reseller_id).await;
    db.execute(
        "INSERT INTO balance_ledger (reseller_id, amount, kind, reference) VALUES ($1, 1234, 'rebate', 'rebate:2026-10')",
        &[&pk],
    )
    .await
    .unwrap();
    // What §8 will add: a failed upstream order's amount coming back.
    db.batch_execute(
        "ALTER TABLE balance_ledger DROP CONSTRAINT balance_ledger_kind_check,
           ADD CONSTRAINT balance_ledger_kind_check CHECK (kind IN ('adjustment', 'refund', 'rebate', 'upstream_failed'))",
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO balance_ledger (reseller_id, amount, kind, reference) VALUES ($1, $2, 'upstream_failed', $3)",
        &[&pk, &amount, &order_id],
    )
    .await
    .unwrap();
    let statement = entries(&own(&app, &k, "").await);
    let funded = statement.iter().find(|e| e["type"] == "credit").unwrap();
    let done = [
        adjusted(100_000, funded["reference"].as_str().unwrap()),
        order(&order_id, amount),
        ("rebate".into(), 1234, None, Some("rebate:2026-10".into())),
        ("upstream_failed".into(), amount, Some(order_id.clone()), None),
    ];
    assert_eq!(
        statement.iter().map(movement).collect::<Vec<_>>(),
        in_statement_order(&done, &statement)
    );
    let sum: i64 = statement.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(sum, app.recorded_balance(&k.reseller_id).await);
}
