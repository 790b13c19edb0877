//! The real binary against a fake gateway that misbehaves on purpose: a 429 with
//! `Retry-After`, a tier that caps batches, an item answered 503, and a connection
//! dropped after the server fulfilled the batch (the case where a careless client buys
//! twice). The fake checks every signature itself, from docs/api.md §1, and counts fulfilments.

#![allow(
    clippy::unwrap_used,
    reason = "a helper fails its test by panicking, as the tests do"
)]

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY_ID: &str = "ak_e2e_1";
const SECRET: &str = "sk_e2e_very_secret_value_42";
const SECRET_ENV: &str = "CARDGATE_E2E_SECRET";
/// The fake tier's `max_batch`.
const MAX_BATCH: usize = 4;

/// What the fake gateway does wrong, once each.
#[derive(Default, Clone)]
struct Script {
    throttle_first: bool,
    drop_connection_on_batch: Option<usize>,
    item_503_for: Option<String>,
    rate_limit_empty_on_batch: Option<usize>,
    refuse_auth: bool,
}

#[derive(Default)]
struct State {
    requests: u32,
    /// Batches the fake processed (answered or dropped), counting from 1.
    processed_batches: usize,
    nonces: HashSet<String>,
    problems: Vec<String>,
    /// merchant_order_no -> the order as first created.
    orders: HashMap<String, Value>,
    fulfilments: HashMap<String, u32>,
    replays: u32,
    seen: HashSet<String>,
    batch_sizes: Vec<usize>,
}

struct Gateway {
    script: Mutex<Script>,
    state: Mutex<State>,
}

enum Reply {
    Answer(u16, Vec<(&'static str, String)>, Value),
    Drop,
}

#[allow(
    clippy::disallowed_methods,
    reason = "the test signs as a reseller does, on the real clock the gateway judges"
)]
fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// docs/api.md §1, checked independently of the client's own signing module.
fn check_authorization(header: &str, method: &str, path: &str, query: &str, body: &[u8]) -> Result<String, String> {
    let params = header
        .strip_prefix("CG1-HMAC-SHA256 ")
        .ok_or_else(|| format!("scheme: {header}"))?;
    let mut found = HashMap::new();
    for p in params.split(',') {
        let (k, v) = p.trim().split_once('=').ok_or("param without =")?;
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .ok_or_else(|| format!("{k} not quoted"))?;
        if found.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("{k} twice"));
        }
    }
    let get = |k: &str| found.get(k).cloned().ok_or_else(|| format!("{k} missing"));
    let (key_id, ts, nonce, sig) = (get("key_id")?, get("timestamp")?, get("nonce")?, get("signature")?);
    if found.len() != 4 {
        return Err("extra parameters".into());
    }
    if key_id != KEY_ID {
        return Err(format!("key_id {key_id}"));
    }
    let ts: i64 = ts.parse().map_err(|_| "timestamp not a number")?;
    if (now_secs() - ts).abs() > 300 {
        return Err("timestamp out of window".into());
    }
    if !(16..=64).contains(&nonce.len())
        || !nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!("nonce {nonce}"));
    }
    if sig.len() != 64 || !sig.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(format!("signature not lower-case hex: {sig}"));
    }
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_unstable();
    let sts = format!(
        "CG1-HMAC-SHA256\n{ts}\n{nonce}\n{method}\n{path}\n{}\n{}",
        pairs.join("&"),
        hex::encode(Sha256::digest(body))
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(sts.as_bytes());
    if hex::encode(mac.finalize().into_bytes()) != sig {
        return Err("signature mismatch".into());
    }
    Ok(nonce)
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply::Answer(
        status,
        vec![],
        json!({"error": {"code": code, "message": message, "request_id": "req_fake"}}),
    )
}

impl Gateway {
    fn new(script: Script) -> Arc<Gateway> {
        Arc::new(Gateway {
            script: Mutex::new(script),
            state: Mutex::new(State::default()),
        })
    }

    /// Marks an order as fulfilled by an earlier run (its answer never reached the disk).
    fn preload(&self, mon: &str, sku: &str, quantity: u64) {
        let mut st = self.state.lock().unwrap();
        let order = new_order(mon, sku, quantity);
        st.orders.insert(mon.into(), order);
        st.fulfilments.insert(mon.into(), 1);
    }

    fn handle(&self, method: &str, target: &str, headers: &HashMap<String, String>, body: &[u8]) -> Reply {
        let mut st = self.state.lock().unwrap();
        let mut script = self.script.lock().unwrap();
        st.requests += 1;
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if method != "POST" || path != "/v1/orders/batch" {
            st.problems.push(format!("unexpected {method} {target}"));
            return error(404, "not_found", "no such route");
        }
        if headers.get("content-type").map(String::as_str) != Some("application/json") {
            st.problems.push("content-type".into());
        }
        let auth = headers.get("authorization").cloned().unwrap_or_default();
        match check_authorization(&auth, method, path, query, body) {
            Ok(nonce) => {
                if !st.nonces.insert(nonce.clone()) {
                    st.problems.push(format!("nonce reused: {nonce}"));
                    return error(401, "nonce_reused", "nonce reused");
                }
            }
            Err(e) => {
                st.problems.push(format!("authorization: {e}"));
                return error(401, "invalid_signature", "bad signature");
            }
        }
        if script.refuse_auth {
            return error(401, "invalid_signature", "unknown key");
        }
        if std::mem::take(&mut script.throttle_first) {
            return Reply::Answer(
                429,
                vec![
                    ("retry-after", "1".into()),
                    ("ratelimit-limit", "1000".into()),
                    ("ratelimit-remaining", "0".into()),
                    ("ratelimit-reset", "1".into()),
                ],
                json!({"error": {"code": "rate_limited", "message": "slow down", "request_id": "req_fake"}}),
            );
        }
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return error(400, "invalid_json", "body is not JSON");
        };
        let Some(items) = v.get("orders").and_then(Value::as_array).cloned() else {
            return error(400, "invalid_request", "orders: required");
        };
        if !(1..=MAX_BATCH).contains(&items.len()) {
            return error(
                400,
                "invalid_request",
                &format!("orders: an array of 1 to {MAX_BATCH} orders"),
            );
        }
        st.processed_batches += 1;
        st.batch_sizes.push(items.len());
        let batch_no = st.processed_batches;
        let mut results = Vec::new();
        for item in &items {
            let mon = item["merchant_order_no"].as_str().unwrap_or_default().to_string();
            let sku = item["sku"].as_str().unwrap_or_default().to_string();
            let quantity = item["quantity"].as_u64().unwrap_or(0);
            st.seen.insert(mon.clone());
            if script.item_503_for.as_deref() == Some(mon.as_str()) {
                script.item_503_for = None;
                results.push(json!({"merchant_order_no": mon, "status": 503,
                    "error": {"code": "unavailable", "message": "try again"}}));
                continue;
            }
            if let Some(existing) = st.orders.get(&mon).cloned() {
                if existing["sku"] != sku.as_str() || existing["quantity"] != quantity {
                    results.push(json!({"merchant_order_no": mon, "status": 409,
                        "error": {"code": "idempotency_conflict", "message": "different order"}}));
                } else {
                    st.replays += 1;
                    results.push(json!({"merchant_order_no": mon, "status": 200, "order": existing}));
                }
                continue;
            }
            if sku == "sold-out" {
                results.push(json!({"merchant_order_no": mon, "status": 409,
                    "error": {"code": "out_of_stock", "message": "fewer codes than asked"}}));
                continue;
            }
            let order = new_order(&mon, &sku, quantity);
            st.orders.insert(mon.clone(), order.clone());
            *st.fulfilments.entry(mon.clone()).or_insert(0) += 1;
            results.push(json!({"merchant_order_no": mon, "status": 201, "order": order}));
        }
        if script.drop_connection_on_batch == Some(batch_no) {
            // Processed and committed, but the answer never leaves: the client must find
            // out by resending, and must get replays, not new orders.
            return Reply::Drop;
        }
        let remaining = if script.rate_limit_empty_on_batch == Some(batch_no) {
            0
        } else {
            500
        };
        Reply::Answer(
            200,
            vec![
                ("ratelimit-limit", "1000".into()),
                ("ratelimit-remaining", remaining.to_string()),
                ("ratelimit-reset", "1".into()),
            ],
            json!({ "results": results }),
        )
    }
}

fn new_order(mon: &str, sku: &str, quantity: u64) -> Value {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let codes: Vec<String> = (0..quantity).map(|i| format!("CODE-{id}-{i}")).collect();
    json!({"order_id": format!("ord_{id}"), "merchant_order_no": mon, "sku": sku,
           "quantity": quantity, "unit_price": 9650, "amount": 9650 * quantity, "currency": "CNY",
           "status": "fulfilled", "created_at": "2026-11-23T04:00:00Z", "codes": codes})
}

async fn serve(listener: TcpListener, gw: Arc<Gateway>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else { return };
        let gw = gw.clone();
        tokio::spawn(async move {
            let _ = connection(sock, gw).await;
        });
    }
}

/// One request per connection (answered with `Connection: close`), enough for a client
/// that sends one batch at a time, and it makes "drop this connection" exact.
async fn connection(mut sock: TcpStream, gw: Arc<Gateway>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if sock.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default().to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + len {
        if sock.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
    let body = buf[head_end..head_end + len].to_vec();
    match gw.handle(&method, &target, &headers, &body) {
        Reply::Drop => Ok(()),
        Reply::Answer(status, extra, json) => {
            let body = serde_json::to_vec(&json).unwrap();
            let mut out = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: req_fake\r\nconnection: close\r\n",
                body.len()
            );
            for (k, v) in extra {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            sock.write_all(out.as_bytes()).await?;
            sock.write_all(&body).await?;
            sock.shutdown().await
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn start(gw: Arc<Gateway>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, gw));
    format!("http://{addr}")
}

async fn run_client(base_url: String, input: PathBuf, output: PathBuf, batch_size: u32) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_cardgate-client"))
            .args(["orders", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(["--base-url", &base_url, "--key-id", KEY_ID, "--secret-env", SECRET_ENV])
            .args([
                "--batch-size",
                &batch_size.to_string(),
                "--rate",
                "1000",
                "--timeout-secs",
                "10",
            ])
            .env(SECRET_ENV, SECRET)
            .output()
            .unwrap()
    })
    .await
    .inspect(|out| {
        // Shown by the test harness only when a test fails (or with --nocapture).
        eprintln!("client stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    })
    .unwrap()
}

fn read_output(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l:?}: {e}")))
        .collect()
}

fn orders_csv(dir: &Path, rows: &[(&str, &str, u32)]) -> PathBuf {
    let path = dir.join("orders.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "merchant_order_no,sku,quantity,max_unit_price").unwrap();
    for (mon, sku, q) in rows {
        writeln!(f, "{mon},{sku},{q},9700").unwrap();
    }
    path
}

/// Every order exactly once in the output, with the very codes the server issued.
fn assert_output_matches_server(output: &[Value], rows: &[(&str, &str, u32)], gw: &Gateway) {
    let st = gw.state.lock().unwrap();
    assert!(st.problems.is_empty(), "the fake gateway saw: {:?}", st.problems);
    let mut by_mon: HashMap<&str, &Value> = HashMap::new();
    for line in output {
        let mon = line["merchant_order_no"].as_str().unwrap();
        assert!(by_mon.insert(mon, line).is_none(), "{mon} recorded twice");
    }
    assert_eq!(by_mon.len(), rows.len(), "{output:#?}");
    for (mon, sku, q) in rows {
        let line = by_mon[mon];
        if *sku == "sold-out" {
            assert_eq!(line["status"], "failed", "{line}");
            assert_eq!(line["error"]["code"], "out_of_stock");
            continue;
        }
        let order = &st.orders[*mon];
        assert_eq!(line["status"], "fulfilled", "{line}");
        assert_eq!(line["order_id"], order["order_id"]);
        assert_eq!(line["codes"], order["codes"]);
        assert_eq!(line["quantity"], *q);
        assert_eq!(line["sku"], *sku);
        assert_eq!(line["amount"], order["amount"]);
    }
    for (mon, n) in &st.fulfilments {
        assert_eq!(*n, 1, "{mon} was fulfilled {n} times");
    }
}

const ROWS: &[(&str, &str, u32)] = &[
    ("M-001", "steam-cn-100", 1),
    ("M-002", "steam-cn-100", 2),
    ("M-003", "steam-cn-100", 1),
    ("M-004", "itunes-us-10", 3),
    ("M-005", "steam-cn-100", 1),
    ("M-006", "sold-out", 1),
    ("M-007", "steam-cn-100", 1),
    ("M-008", "steam-cn-100", 1),
    ("M-009", "itunes-us-10", 1),
    ("M-010", "steam-cn-100", 2),
    ("M-011", "steam-cn-100", 1),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_throttling_a_small_tier_an_item_503_and_a_dropped_connection() {
    let gw = Gateway::new(Script {
        throttle_first: true,
        drop_connection_on_batch: Some(2),
        item_503_for: Some("M-007".into()),
        rate_limit_empty_on_batch: Some(3),
        refuse_auth: false,
    });
    let base = start(gw.clone()).await;
    let dir = temp_dir("main");
    let input = orders_csv(&dir, ROWS);
    let output = dir.join("codes.jsonl");

    let out = run_client(base, input, output.clone(), 10).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(!stderr.contains(SECRET), "the secret was printed");

    assert_output_matches_server(&read_output(&output), ROWS, &gw);
    let script = gw.script.lock().unwrap();
    assert!(
        !script.throttle_first && script.item_503_for.is_none(),
        "a misbehaviour never happened"
    );
    let st = gw.state.lock().unwrap();
    assert!(
        st.processed_batches > 3,
        "the dropped and the rate-limited batches never happened"
    );
    // The dropped batch was resent and answered with replays, not new orders.
    assert!(st.replays >= 1, "no replay: the dropped batch was not resent?");
    // 10 was halved until it fit the tier's cap of 4.
    assert!(st.batch_sizes.iter().all(|n| *n <= MAX_BATCH), "{:?}", st.batch_sizes);
    assert_eq!(st.seen.len(), ROWS.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_crash_without_buying_twice() {
    let gw = Gateway::new(Script::default());
    // The earlier run: M-001 recorded; M-002 fulfilled by the server, but the crash tore
    // its line; the rest never sent.
    gw.preload("M-002", "steam-cn-100", 2);
    let base = start(gw.clone()).await;
    let dir = temp_dir("resume");
    let input = orders_csv(&dir, ROWS);
    let output = dir.join("codes.jsonl");
    let first = json!({"merchant_order_no": "M-001", "status": "fulfilled", "order_id": "ord_earlier",
        "sku": "steam-cn-100", "quantity": 1, "amount": 9650, "currency": "CNY", "codes": ["EARLIER-1"]});
    std::fs::write(
        &output,
        format!("{first}\n{{\"merchant_order_no\":\"M-002\",\"status\":\"fulf"),
    )
    .unwrap();

    let out = run_client(base, input, output.clone(), 4).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);

    let lines = read_output(&output);
    assert_eq!(lines[0], first, "an earlier record was changed");
    let st = gw.state.lock().unwrap();
    assert!(!st.seen.contains("M-001"), "a recorded order was sent again");
    assert_eq!(st.replays, 1, "M-002 should come back as a replay");
    let m2 = lines.iter().find(|l| l["merchant_order_no"] == "M-002").unwrap();
    assert_eq!(
        m2["codes"], st.orders["M-002"]["codes"],
        "the codes of the torn line were lost"
    );
    drop(st);
    // M-001 is ours from the earlier run; the server never knew it, so check the rest.
    assert_output_matches_server(&lines[1..], &ROWS[1..], &gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_at_once_when_authentication_is_refused() {
    let gw = Gateway::new(Script {
        refuse_auth: true,
        ..Script::default()
    });
    let base = start(gw.clone()).await;
    let dir = temp_dir("auth");
    let input = orders_csv(&dir, ROWS);
    let output = dir.join("codes.jsonl");

    let out = run_client(base, input, output.clone(), 4).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid_signature"), "{stderr}");
    assert!(!stderr.contains(SECRET), "the secret was printed");
    assert_eq!(gw.state.lock().unwrap().requests, 1, "a 401 must not be retried");
    assert!(read_output(&output).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_sends_nothing() {
    let gw = Gateway::new(Script::default());
    let base = start(gw.clone()).await;
    let dir = temp_dir("bad");
    let input = orders_csv(
        &dir,
        &[("M-1", "steam-cn-100", 1), ("M-2", "steam-cn-100", 0), ("M-1", "x", 1)],
    );
    let output = dir.join("codes.jsonl");

    let out = run_client(base, input, output.clone(), 4).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 3: quantity"), "{stderr}");
    assert!(
        stderr.contains("line 4: merchant_order_no M-1 already appears on line 2"),
        "{stderr}"
    );
    assert_eq!(gw.state.lock().unwrap().requests, 0);
    assert!(!output.exists(), "the output was created for a refused file");
}
