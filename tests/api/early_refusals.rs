//! Early refusals every client can read: an answer sent before the request body was read
//! (413 by declared length, a streamed body over the limit, 401 before the body) reaches
//! a client that is still writing its body, because the gateway lingers on close
//! (`http::linger`). These clients do not send `Expect: 100-continue`, as Python's
//! `http.client` and most scripts do not: they write the whole body, then read.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

const BODY_BYTES: usize = 2 * 1024 * 1024;

/// Writes `head` and then `body` in full, in 8 KiB writes as Python's `http.client` does, then reads the answer
/// to the end: `None` when the connection was reset before the answer could be read.
async fn send_then_read(addr: SocketAddr, head: &str, body: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.ok()?;
    // The server may answer and close long before this is all sent; a reset here is the
    // failure this file is about.
    for piece in body.chunks(8192) {
        s.write_all(piece).await.ok()?;
    }
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await {
        Ok(Ok(_)) => {}
        // A reset after the answer arrived still leaves it read.
        Ok(Err(_)) if !answer.is_empty() => {}
        _ => return None,
    }
    Some(String::from_utf8_lossy(&answer).into_owned())
}

fn chunked(total: usize) -> Vec<u8> {
    let chunk = vec![b'x'; 16 * 1024];
    let mut out = Vec::with_capacity(total + total / 1000);
    let mut sent = 0;
    while sent < total {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(&chunk);
        out.extend_from_slice(b"\r\n");
        sent += chunk.len();
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn an_oversized_body_declared_or_chunked_reads_its_413_every_time() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let body = vec![b'{'; BODY_BYTES];
    let declared = format!(
        "POST /admin/v1/products HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ncontent-length: {BODY_BYTES}\r\n\r\n"
    );
    let streamed = chunked(BODY_BYTES);
    let chunked_head = format!(
        "POST /admin/v1/products HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    for (what, head, body) in [("declared", &declared, &body), ("chunked", &chunked_head, &streamed)] {
        for i in 0..50 {
            let answer = send_then_read(app.addr, head, body)
                .await
                .unwrap_or_else(|| panic!("{what} try {i}: reset before the answer was read"));
            assert!(answer.starts_with("HTTP/1.1 413"), "{what} try {i}: {answer:.200}");
            assert!(answer.contains("payload_too_large"), "{what} try {i}: {answer:.300}");
            assert!(
                answer.to_ascii_lowercase().contains("connection: close"),
                "{what}: {answer:.300}"
            );
            // read_to_end returned: the gateway closed the connection after the answer.
        }
    }
}

/// Python's `http.client`, which many resellers' scripts use, against `addr`: for each of
/// `tries`, a 2 MiB body declared (then chunked), written whole before the answer is read.
/// Prints how many tries read a 413 and how many failed with a network error.
const PYTHON_CLIENT: &str = r#"
import http.client, json, sys
host, port, token, tries = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
body = b"{" * (2 * 1024 * 1024)
def chunks():
    for i in range(0, len(body), 16384):
        yield body[i:i + 16384]
out = {}
for mode in ("declared", "chunked"):
    got = {"413": 0, "other": 0, "error": 0}
    for _ in range(tries):
        c = http.client.HTTPConnection(host, port, timeout=10)
        try:
            headers = {"authorization": "Bearer " + token, "content-type": "application/json"}
            if mode == "declared":
                c.request("POST", "/admin/v1/products", body=body, headers=headers)
            else:
                c.request("POST", "/admin/v1/products", body=chunks(), headers=headers, encode_chunked=True)
            r = c.getresponse()
            text = r.read().decode()
            got["413" if r.status == 413 and "payload_too_large" in text else "other"] += 1
        except OSError:
            got["error"] += 1
        finally:
            c.close()
    out[mode] = got
print(json.dumps(out))
"#;

#[tokio::test]
async fn pythons_http_client_reads_its_413_every_time() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let port = app.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", PYTHON_CLIENT, "127.0.0.1", &port, &t, "50"])
            .output()
            .expect("python3 on PATH (scripts/dev installs it)")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let got: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|_| panic!("python: {text} {}", String::from_utf8_lossy(&out.stderr)));
    for mode in ["declared", "chunked"] {
        assert_eq!(got[mode]["413"], 50, "{mode}: {got}");
    }
}

#[tokio::test]
async fn a_401_before_the_body_is_read_by_a_client_still_writing() {
    let app = spawn_app().await;
    let body = vec![b'x'; BODY_BYTES];
    for (path, scheme) in [
        ("/v1/orders", "CG1-HMAC-SHA256 key_id=\"nope\""),
        ("/admin/v1/products", "Bearer nope"),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: {scheme}\r\ncontent-type: application/json\r\ncontent-length: {BODY_BYTES}\r\n\r\n"
        );
        for i in 0..10 {
            let answer = send_then_read(app.addr, &head, &body)
                .await
                .unwrap_or_else(|| panic!("{path} try {i}: reset before the answer was read"));
            assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer:.200}");
        }
    }
}

#[tokio::test]
async fn expect_100_continue_gets_the_refusal_instead_of_continue() {
    let app = spawn_app().await;
    let t = app.root_token().await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /admin/v1/products HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ncontent-length: {BODY_BYTES}\r\nexpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("answered without the body being sent")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "no 100 Continue first: {answer:.200}"
    );
}

#[tokio::test]
async fn a_client_that_keeps_sending_is_cut_off_at_the_lingering_bounds() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_HTTP__LINGER_MS".into(), "500".into());
    })
    .await;
    let t = app.root_token().await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /admin/v1/products HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // A trickle that never ends: the gateway must not wait for it past its time bound.
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if wr.write_all(&[b'x'; 512]).await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        started.elapsed()
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut answer)).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 413"));
    let cut_after = writer.await.unwrap();
    assert!(
        cut_after < Duration::from_secs(5),
        "the lingering connection was closed within its bound, not held: {cut_after:?}"
    );
}
