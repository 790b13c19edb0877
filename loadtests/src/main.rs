//! cardgate-load: a bounded closed-loop load generator over keep-alive HTTP/1.1.
//!
//!   cardgate-load <addr> <healthz|signed-products> <connections> <seconds> [key_id secret]
//!
//! Prints one JSON line: requests, errors, rate and latency percentiles (HDR histogram).
//! Loopback only; stops by itself after <seconds>.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rand::Rng;

#[derive(Clone)]
enum Mode {
    Healthz,
    SignedProducts { key_id: Arc<str>, secret: Arc<[u8]> },
}

fn request(mode: &Mode, host: &str) -> Request<Empty<Bytes>> {
    let (path, auth) = match mode {
        Mode::Healthz => ("/healthz", None),
        Mode::SignedProducts { key_id, secret } => {
            let nonce: String = format!("{:032x}", rand::thread_rng().gen::<u128>());
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let m = cardgate::auth::signing::Message {
                timestamp: ts,
                nonce: &nonce,
                method: "GET",
                path: "/v1/products",
                query: None,
                body: b"",
            };
            (
                "/v1/products",
                Some(cardgate::auth::signing::authorization(key_id, secret, &m)),
            )
        }
    };
    let mut b = Request::get(path).header("host", host);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.body(Empty::new()).expect("static request parts are valid")
}

struct Tally {
    ok: u64,
    errors: u64,
    hist: Histogram<u64>,
}

async fn worker(addr: SocketAddr, mode: Mode, until: Instant) -> Tally {
    let mut t = Tally {
        ok: 0,
        errors: 0,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    };
    let host = addr.to_string();
    'reconnect: while Instant::now() < until {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            t.errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
            t.errors += 1;
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < until {
            let started = Instant::now();
            let resp = match sender.send_request(request(&mode, &host)).await {
                Ok(r) => r,
                Err(_) => {
                    t.errors += 1;
                    continue 'reconnect;
                }
            };
            let status = resp.status();
            if resp.into_body().collect().await.is_err() {
                t.errors += 1;
                continue 'reconnect;
            }
            let _ = t.hist.record(started.elapsed().as_micros().max(1) as u64);
            if status.is_success() {
                t.ok += 1;
            } else {
                t.errors += 1;
            }
        }
    }
    t
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: cardgate-load <addr> <healthz|signed-products> <connections> <seconds> [key_id secret]");
        std::process::exit(2);
    }
    let addr: SocketAddr = args[1].parse().expect("addr like 127.0.0.1:8080");
    assert!(addr.ip().is_loopback(), "load is only ever sent to loopback");
    let mode = match args[2].as_str() {
        "healthz" => Mode::Healthz,
        "signed-products" => Mode::SignedProducts {
            key_id: args.get(5).expect("key_id").as_str().into(),
            secret: args.get(6).expect("secret").as_bytes().into(),
        },
        other => panic!("unknown mode {other}"),
    };
    let connections: usize = args[3].parse().expect("connections");
    let seconds: u64 = args[4].parse().expect("seconds");
    assert!(
        (1..=1000).contains(&connections) && (1..=600).contains(&seconds),
        "bounded runs only"
    );
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(worker(addr, mode.clone(), until)))
        .collect();
    let mut total = Tally {
        ok: 0,
        errors: 0,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    };
    for t in tasks {
        let r = t.await.expect("worker");
        total.ok += r.ok;
        total.errors += r.errors;
        total.hist.add(&r.hist).expect("same bounds");
    }
    let secs = started.elapsed().as_secs_f64();
    let q = |p: f64| total.hist.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({"mode": args[2], "ok": total.ok, "errors": total.errors, "seconds": secs,
            "rate_per_s": total.ok as f64 / secs, "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": q(1.0)})
    );
}
