//! cardgate-load: a bounded closed-loop load generator over keep-alive HTTP/1.1.
//!
//!   cardgate-load <addr> healthz <connections> <seconds>
//!   cardgate-load <addr> signed-products <connections> <seconds> <key_id> <secret>
//!   cardgate-load <addr> signed-orders <connections> <seconds> <key_id:secret,...> <sku>
//!
//! `signed-orders` sends single-code orders, each with a fresh merchant_order_no, spread
//! over the given keys by connection.
//!
//! Prints one JSON line: requests, errors, rate and latency percentiles (HDR histogram).
//! Loopback only; stops by itself after <seconds>.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rand::Rng;

#[derive(Clone)]
struct Key {
    id: Arc<str>,
    secret: Arc<[u8]>,
}

#[derive(Clone)]
enum Mode {
    Healthz,
    SignedProducts(Key),
    SignedOrders { keys: Arc<[Key]>, sku: Arc<str> },
}

fn signed(key: &Key, method: &str, path: &str, body: &[u8]) -> String {
    let nonce: String = format!("{:032x}", rand::thread_rng().gen::<u128>());
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let m = cardgate::auth::signing::Message {
        timestamp: ts,
        nonce: &nonce,
        method,
        path,
        query: None,
        body,
    };
    cardgate::auth::signing::authorization(&key.id, &key.secret, &m)
}

fn request(mode: &Mode, host: &str, worker: usize) -> Request<Full<Bytes>> {
    let b = Request::builder().header("host", host);
    let req = match mode {
        Mode::Healthz => b.uri("/healthz").body(Full::default()),
        Mode::SignedProducts(key) => b
            .uri("/v1/products")
            .header("authorization", signed(key, "GET", "/v1/products", b""))
            .body(Full::default()),
        Mode::SignedOrders { keys, sku } => {
            let key = &keys[worker % keys.len()];
            let mon = format!("L{:030x}", rand::thread_rng().gen::<u128>() >> 8);
            let body = serde_json::json!({"sku": &**sku, "quantity": 1, "merchant_order_no": mon}).to_string();
            b.method("POST")
                .uri("/v1/orders")
                .header("content-type", "application/json")
                .header("authorization", signed(key, "POST", "/v1/orders", body.as_bytes()))
                .body(Full::new(Bytes::from(body)))
        }
    };
    req.expect("request parts are valid")
}

struct Tally {
    ok: u64,
    errors: u64,
    hist: Histogram<u64>,
}

async fn worker(addr: SocketAddr, mode: Mode, until: Instant, index: usize) -> Tally {
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
            let resp = match sender.send_request(request(&mode, &host, index)).await {
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
        eprintln!(
            "usage: cardgate-load <addr> <healthz|signed-products|signed-orders> <connections> <seconds> [keys...]"
        );
        std::process::exit(2);
    }
    let addr: SocketAddr = args[1].parse().expect("addr like 127.0.0.1:8080");
    assert!(addr.ip().is_loopback(), "load is only ever sent to loopback");
    let mode = match args[2].as_str() {
        "healthz" => Mode::Healthz,
        "signed-products" => Mode::SignedProducts(Key {
            id: args.get(5).expect("key_id").as_str().into(),
            secret: args.get(6).expect("secret").as_bytes().into(),
        }),
        "signed-orders" => Mode::SignedOrders {
            keys: args
                .get(5)
                .expect("key_id:secret,...")
                .split(',')
                .map(|pair| {
                    let (id, secret) = pair.split_once(':').expect("key_id:secret");
                    Key {
                        id: id.into(),
                        secret: secret.as_bytes().into(),
                    }
                })
                .collect(),
            sku: args.get(6).expect("sku").as_str().into(),
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
        .map(|i| tokio::spawn(worker(addr, mode.clone(), until, i)))
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
