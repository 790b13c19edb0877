use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

async fn stock_len(app: &TestApp, sku: &str) -> i64 {
    app.stock_len(sku).await
}

#[tokio::test]
async fn import_counts_every_edge_case_and_stocks_redis() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    app.create_product(&t, "g1").await;
    let long = "L".repeat(513);
    let exact = "E".repeat(512);
    let mut body = b"\xEF\xBB\xBFAAAA-0001\r\n  AAAA-0002  \r\n\r\n   \nAAAA-0001\n".to_vec();
    body.extend_from_slice(format!("{long}\n{exact}\n").as_bytes());
    body.extend_from_slice(b"\xC3\x28bad\nAAAA-0003");
    let resp = app.import_codes(&t, "g1", body).await;
    assert_eq!(resp.status(), 200);
    let report: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(report, json!({"imported": 4, "duplicates": 1, "rejected": 2}));
    assert_eq!(stock_len(&app, "g1").await, 4);

    // Codes already known for the SKU are duplicates; the same code under another SKU is not.
    let again = app
        .import_codes(&t, "g1", "AAAA-0001\nAAAA-0004\n")
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(again, json!({"imported": 1, "duplicates": 1, "rejected": 0}));
    app.create_product(&t, "g2").await;
    let other = app
        .import_codes(&t, "g2", "AAAA-0001\n")
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(other["imported"], 1);
    assert_eq!(stock_len(&app, "g1").await, 5);

    let p = app.admin_ok(&t, Method::GET, "/admin/v1/products/g1", None, 200).await;
    assert_eq!(p["stock"]["available"], 5);

    let resp = app
        .client
        .post(app.url("/admin/v1/products/g1/codes"))
        .bearer_auth(&t)
        .json(&json!(["x"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    assert_eq!(app.import_codes(&t, "nope", "x\n").await.status(), 404);
}

#[tokio::test]
async fn neither_postgres_nor_redis_holds_a_plaintext_code_or_secret() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    app.create_product(&t, "secret-sku").await;
    let codes: Vec<String> = (0..50).map(|i| format!("PLAINTEXT-CODE-{i:04}-XYZ")).collect();
    app.import_codes(&t, "secret-sku", codes.join("\n")).await;
    let r = app.create_reseller(&t, "gold").await;
    let webhook_secret = r["webhook_secret"].as_str().unwrap().to_string();
    let k = app
        .admin_ok(
            &t,
            Method::POST,
            &format!("/admin/v1/resellers/{}/keys", r["reseller_id"].as_str().unwrap()),
            None,
            201,
        )
        .await;
    let api_secret = k["secret"].as_str().unwrap().to_string();
    // Orders leave idempotency records, risk state, ledger rows and the audit of what was
    // revealed: none of it in plaintext either. (Their outbox entries carry the pool's
    // sealed elements and are deleted once committed.)
    let buyer = app.reseller_with_key(&t, "gold", json!({})).await;
    app.fund(&t, &buyer.reseller_id, 1_000_000).await;
    let mut delivered = Vec::new();
    for i in 0..3 {
        let (status, order, _) = app.order(&buyer, order_body("secret-sku", 2, &format!("S-{i}"))).await;
        assert_eq!(status, 201, "{order}");
        delivered.extend(
            order["codes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string()),
        );
        let id = order["order_id"].as_str().unwrap();
        let again = app.signed(&buyer, Method::GET, &format!("/v1/orders/{id}"), None).await;
        assert_eq!(again.status(), 200);
    }
    assert_eq!(delivered.len(), 6);
    assert!(delivered.iter().all(|c| codes.contains(c)), "{delivered:?}");

    // Every column of every table, as text (bytea as hex and as escaped bytes).
    let db = app.db().await;
    let tables: Vec<String> = db
        .query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut dump = String::new();
    for table in tables {
        for row in db.query(&format!("SELECT t::text FROM {table} t"), &[]).await.unwrap() {
            dump.push_str(row.get::<_, &str>(0));
        }
        for row in db
            .query(
                &format!("SELECT encode(convert_to(t::text, 'UTF8'), 'escape') FROM {table} t"),
                &[],
            )
            .await
            .unwrap()
        {
            dump.push_str(row.get::<_, &str>(0));
        }
    }
    assert!(dump.len() > 1000);
    let needles =
        codes
            .iter()
            .map(String::as_str)
            .chain([api_secret.as_str(), webhook_secret.as_str(), "PLAINTEXT-CODE"]);
    for needle in needles.clone() {
        assert!(!dump.contains(needle), "{needle} found in Postgres");
        let hex_needle = hex::encode(needle);
        assert!(!dump.contains(&hex_needle), "{needle} found hex-encoded in Postgres");
    }

    let mut redis = app.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", app.redis_prefix()))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    // Every value of every type, field names and stream entries included.
    fn bytes_of(v: redis::Value, out: &mut Vec<u8>) {
        match v {
            redis::Value::BulkString(b) => out.extend(b),
            redis::Value::SimpleString(s) => out.extend(s.into_bytes()),
            redis::Value::Array(vs) | redis::Value::Set(vs) => vs.into_iter().for_each(|v| bytes_of(v, out)),
            redis::Value::Map(kvs) => kvs.into_iter().for_each(|(k, v)| {
                bytes_of(k, out);
                bytes_of(v, out);
            }),
            _ => {}
        }
    }
    let mut raw = Vec::new();
    let mut kinds = std::collections::BTreeSet::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut redis).await.unwrap();
        let mut read = match kind.as_str() {
            "list" => redis::cmd("LRANGE"),
            "string" => redis::cmd("GET"),
            "hash" => redis::cmd("HGETALL"),
            "set" => redis::cmd("SMEMBERS"),
            "zset" => redis::cmd("ZRANGE"),
            "stream" => redis::cmd("XRANGE"),
            other => panic!("{key} is a {other}, which this test does not read"),
        };
        read.arg(&key);
        match kind.as_str() {
            "list" | "zset" => read.arg(0).arg(-1),
            "stream" => read.arg("-").arg("+"),
            _ => &mut read,
        };
        bytes_of(read.query_async(&mut redis).await.unwrap(), &mut raw);
        kinds.insert(kind);
    }
    for kind in ["list", "string", "hash"] {
        assert!(kinds.contains(kind), "no {kind} in Redis to read: {kinds:?}");
    }
    assert!(raw.len() > 50 * 28, "stock is in Redis");
    for needle in needles {
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} found in Redis"
        );
    }
}

#[tokio::test]
async fn voiding_named_codes_and_all_available() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    app.create_product(&t, "v1").await;
    app.import_codes(&t, "v1", "C1\nC2\nC3\nC4\n").await;
    let report = app
        .admin_ok(
            &t,
            Method::POST,
            "/admin/v1/products/v1/codes/void",
            Some(json!({"codes": ["C1", "C2", "NOPE"]})),
            200,
        )
        .await;
    assert_eq!(report, json!({"voided": 2, "not_found": 1, "not_available": 0}));
    let again = app
        .admin_ok(
            &t,
            Method::POST,
            "/admin/v1/products/v1/codes/void",
            Some(json!({"codes": ["C1"]})),
            200,
        )
        .await;
    assert_eq!(again["not_available"], 1);
    assert_eq!(stock_len(&app, "v1").await, 2);
    let all = app
        .admin_ok(
            &t,
            Method::POST,
            "/admin/v1/products/v1/codes/void",
            Some(json!({"all_available": true})),
            200,
        )
        .await;
    assert_eq!(all["voided"], 2);
    assert_eq!(stock_len(&app, "v1").await, 0);
    let p = app.admin_ok(&t, Method::GET, "/admin/v1/products/v1", None, 200).await;
    assert_eq!(p["stock"], json!({"available": 0, "delivered": 0, "voided": 4}));
    // A voided code re-imported stays a duplicate: it is never sold again.
    let re = app
        .import_codes(&t, "v1", "C1\n")
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(re["duplicates"], 1);
    let (s, _, _) = error_of(
        app.admin(&t, Method::POST, "/admin/v1/products/v1/codes/void", Some(json!({})))
            .await,
    )
    .await;
    assert_eq!(s, 400);

    // A supplier's bad batch named code by code: 6,000 codes is a body far over the usual
    // JSON limit, and within the void route's own.
    app.create_product(&t, "v2").await;
    let bad: Vec<String> = (0..6000).map(|i| format!("BAD-BATCH-{i:08}-XXXX-YYYY")).collect();
    let imported = app
        .import_codes(&t, "v2", bad.join("\n"))
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(imported["imported"], 6000);
    let body = json!({ "codes": bad });
    assert!(body.to_string().len() > 64 * 1024);
    let report = app
        .admin_ok(&t, Method::POST, "/admin/v1/products/v2/codes/void", Some(body), 200)
        .await;
    assert_eq!(report, json!({"voided": 6000, "not_found": 0, "not_available": 0}));
    assert_eq!(app.stock_len("v2").await, 0);
}

/// An import cut off part way keeps the batches it committed, says so in the audit log,
/// and can be re-run: what went in counts as duplicates the second time.
#[tokio::test]
async fn an_import_cut_short_is_audited_with_what_went_in_and_can_be_re_run() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_HTTP__IMPORT_BODY_MAX_BYTES".into(), "200000".into());
    })
    .await;
    let t = app.root_token().await;
    app.create_product(&t, "cut").await;
    // 8,000 codes of 25 bytes: 200,000 bytes, one past the limit with the last newline.
    let body: String = (0..8000).map(|i| format!("CUT-{i:08}-AAAA-BBBB-C\n")).collect();
    assert_eq!(body.len(), 200_000);
    let body = format!("{body}X");

    // Declared too large: refused before anything is read or stored.
    let resp = app
        .client
        .post(app.url("/admin/v1/products/cut/codes"))
        .bearer_auth(&t)
        .header("content-type", "text/plain")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.1, "payload_too_large");
    assert_eq!(stock_len(&app, "cut").await, 0);

    // Streamed without a length: the first batch of 5,000 is in before the limit is met.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.as_bytes().chunks(4096).map(|c| Ok(c.to_vec())).collect();
    let resp = app
        .client
        .post(app.url("/admin/v1/products/cut/codes"))
        .bearer_auth(&t)
        .header("content-type", "text/plain")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.1, "payload_too_large");
    let kept = stock_len(&app, "cut").await;
    assert!(
        (5000..8000).contains(&kept),
        "one batch (5,000 and the rest of its frame) in: {kept}"
    );
    let detail: serde_json::Value = app
        .db()
        .await
        .query_one(
            "SELECT detail FROM audit_log WHERE action = 'codes.import' AND target = 'cut'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        detail,
        json!({"imported": kept, "duplicates": 0, "rejected": 0, "interrupted_by": "payload_too_large"})
    );

    // Re-run within the limit: the rest goes in, what went in before is duplicates.
    let whole: String = body.lines().take(8000).map(|l| format!("{l}\n")).collect::<String>();
    let report = app
        .import_codes(&t, "cut", whole[..whole.len() - 1].to_string())
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(
        report,
        json!({"imported": 8000 - kept, "duplicates": kept, "rejected": 0})
    );
    assert_eq!(stock_len(&app, "cut").await, 8000);
}
