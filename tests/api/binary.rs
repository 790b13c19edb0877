//! The real `cardgate` binary as a process: peak memory of a 1,000,000-line import, what
//! its logs contain, its health check, and its exit on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

const LINES: usize = 1_000_000;
/// Each line is 100 bytes, so the body is about 100 MB: an import that buffered the body
/// would add at least that to the process's peak memory. A streaming one adds its batch
/// and what the allocator keeps of the batches before it: 29 to 30 MB measured alone,
/// 44 MB once while the whole suite ran beside it, so the bound sits between the two
/// cases with room on each side. (The process's own baseline, largely Argon2id's 19 MiB
/// working memory per login, is measured and set aside.)
const IMPORT_PEAK_GROWTH_MAX_KB: u64 = 64 * 1024;

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn code(i: usize) -> String {
    format!("CODE{i:010}-{}", "Q".repeat(85))
}

#[tokio::test]
async fn a_million_line_import_keeps_memory_bounded_logs_no_secret_and_sigterm_exits_0() {
    let database_url = create_database().await;
    let mut env = test_env(&database_url);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.insert("CARDGATE_LISTEN".into(), format!("127.0.0.1:{port}"));
    let log_path = std::env::temp_dir().join(format!("cardgate-test-{}.log", random_suffix()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cardgate"))
        .env_clear()
        .envs(&env)
        .env("CARDGATE_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let up = eventually(Duration::from_secs(30), || async {
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(up, "the binary did not come up");
    // The container health check: the configured port answers; a closed one does not.
    let healthcheck = |listen: String| {
        Command::new(env!("CARGO_BIN_EXE_cardgate"))
            .arg("healthcheck")
            .env_clear()
            .env("CARDGATE_LISTEN", listen)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        healthcheck(format!("0.0.0.0:{port}")),
        "a wildcard listen address is probed on loopback"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(!healthcheck(closed.to_string()));

    let login: serde_json::Value = client
        .post(format!("{base}/admin/v1/login"))
        .json(&json!({"username": ROOT_USER, "password": ROOT_PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["token"].as_str().unwrap().to_string();
    let admin = |m: Method, path: &str, body: Option<serde_json::Value>| {
        let mut r = client.request(m, format!("{base}{path}")).bearer_auth(&token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
    };
    admin(
        Method::POST,
        "/admin/v1/products",
        Some(json!({"sku": "bulk", "name": "Bulk", "face_value": 100, "base_price": 90, "max_quantity": 10})),
    )
    .await
    .unwrap();
    let r: serde_json::Value = admin(
        Method::POST,
        "/admin/v1/resellers",
        Some(json!({"name": "S", "tier": "gold"})),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let k: serde_json::Value = admin(
        Method::POST,
        &format!("/admin/v1/resellers/{}/keys", r["reseller_id"].as_str().unwrap()),
        None,
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let api_secret = k["secret"].as_str().unwrap().to_string();

    let before = peak_rss_kb(child.id());
    // Generated lazily, 1,000 lines a chunk: the test itself holds little.
    let chunks = futures_util::stream::iter((0..LINES / 1000).map(|c| {
        let mut s = String::with_capacity(1000 * 101);
        for i in c * 1000..(c + 1) * 1000 {
            s.push_str(&code(i));
            s.push('\n');
        }
        Ok::<_, std::io::Error>(s.into_bytes())
    }));
    let resp = client
        .post(format!("{base}/admin/v1/products/bulk/codes"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body(reqwest::Body::wrap_stream(chunks))
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(report, json!({"imported": LINES, "duplicates": 0, "rejected": 0}));
    let peak = peak_rss_kb(child.id());
    eprintln!("gateway peak RSS: {before} kB before the import, {peak} kB after");
    assert!(
        peak - before < IMPORT_PEAK_GROWTH_MAX_KB,
        "the import added {} kB for a ~100 MB body",
        peak - before
    );

    let status = sigterm(&mut child, Duration::from_secs(10))
        .await
        .expect("exited within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0));

    let logs = std::fs::read_to_string(&log_path).unwrap();
    std::fs::remove_file(&log_path).ok();
    assert!(logs.contains("cardgate listening"), "logs were captured");
    for needle in [
        code(0).as_str(),
        code(LINES - 1).as_str(),
        "CODE00000",
        api_secret.as_str(),
        ROOT_PASSWORD,
        &env["CARDGATE_MASTER_KEY"],
        &env["CARDGATE_JWT_SECRET"],
    ] {
        assert!(!logs.contains(needle), "a secret or code is in the logs");
    }
}
