//! The load engine: keep-alive HTTP/1.1 connections sending signed requests, either
//! closed-loop (each connection sends again as soon as it has its answer: the maximum
//! rate) or open-loop (requests are due at a fixed arrival rate whether or not the
//! server keeps up).
//!
//! Open-loop latency is measured from the moment a request was *due*, not from when a
//! connection got round to sending it, so time spent queued behind a slow answer is
//! counted (coordinated omission corrected, as wrk2 does). A pacer thread releases the
//! requests as they fall due, checking every 100 µs (tokio's timer would send up to 2 ms
//! late); what lateness remains is counted too, so the figures err on the slow side.
//! Every connection is open before the clock starts.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::Deserialize;
use tokio::sync::{Barrier, Semaphore};

#[derive(Clone, Debug)]
pub struct Key {
    pub id: String,
    pub signer: cardgate::auth::signing::Signer,
    pub tier: String,
}

#[derive(Clone, Debug)]
pub enum Target {
    Healthz,
    Products,
    Orders { sku: String },
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    pub target: Target,
    pub keys: Arc<[Key]>,
    pub connections: usize,
    pub duration: Duration,
    /// Requests per second for open loop; `None` runs closed loop.
    pub rate: Option<f64>,
    /// Stop after this many requests even if time is left.
    pub max_requests: Option<u64>,
}

/// What one group of requests (one tier, or all of them) saw.
pub struct Tally {
    /// Microseconds, from due time (open loop) or send time (closed loop) to the last byte.
    pub latency: Histogram<u64>,
    /// Answers by status and, for refusals, error code (docs/api.md §2): "201", "409 out_of_stock".
    pub outcomes: BTreeMap<String, u64>,
    /// Connection failures and unreadable answers.
    pub io_errors: u64,
}

impl Tally {
    fn new() -> Self {
        Tally {
            latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
            outcomes: BTreeMap::new(),
            io_errors: 0,
        }
    }

    pub fn answered(&self) -> u64 {
        self.outcomes.values().sum()
    }

    pub fn succeeded(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(k, _)| k.starts_with('2'))
            .map(|(_, v)| v)
            .sum()
    }
}

pub struct Run {
    pub elapsed: Duration,
    /// Requests that were due (open loop) or sent (closed loop).
    pub issued: u64,
    pub all: Tally,
    pub by_tier: BTreeMap<String, Tally>,
    /// Distinct codes delivered in successful order answers, and how many came again.
    pub codes_delivered: u64,
    pub codes_repeated: u64,
    /// CPU this generator used while the clock ran (signing beforehand excluded).
    pub cpu_seconds: f64,
}

/// User and system CPU of this process so far, from /proc (Linux reports it in USER_HZ,
/// 100 per second on every architecture it runs on).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// What one connection saw, kept small while the clock runs: a histogram per worker
/// and tier would cost far more memory than the samples themselves.
#[derive(Default)]
struct Seen {
    /// (key index, microseconds)
    samples: Vec<(u32, u32)>,
    outcomes: Vec<(u32, String)>,
    io_errors: Vec<u32>,
    codes: Vec<String>,
}

#[derive(Deserialize)]
struct OrderAnswer {
    #[serde(default)]
    codes: Vec<String>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
}

fn authorization(key: &Key, method: &str, path: &str, body: &[u8]) -> String {
    let nonce = format!("{:032x}", rand::thread_rng().gen::<u128>());
    let timestamp = cardgate::clock::Clock::System.now_unix_secs();
    let message = cardgate::auth::signing::Message {
        timestamp,
        nonce: &nonce,
        method,
        path,
        query: None,
        body,
    };
    key.signer.authorization(&key.id, &message)
}

/// Signed requests a run prepares per second of its duration: more than the gateway can
/// answer on this machine, so a closed-loop run ends by time, not by running out.
/// `/healthz` is not signed: none.
fn presigned_per_sec(target: &Target) -> u64 {
    match target {
        Target::Healthz => 0,
        Target::Products => 200_000,
        Target::Orders { .. } => 60_000,
    }
}

/// One request signed before the run starts: a generator that signs while the clock runs
/// measures its own signing (HMAC and formatting per request) as much as the gateway.
/// Sending one costs clones of two reference-counted buffers.
struct Prepared {
    key: u32,
    authorization: hyper::header::HeaderValue,
    body: Bytes,
}

/// Requests `0..count` of the run, signed now, on every core.
fn prepare(plan: &Plan, run_id: &str, count: u64) -> Vec<Prepared> {
    let one = |n: u64| {
        let k = (n % plan.keys.len().max(1) as u64) as usize;
        let (method, path, body) = match &plan.target {
            Target::Orders { sku } => (
                "POST",
                "/v1/orders",
                Bytes::from(format!(
                    r#"{{"sku":"{sku}","quantity":1,"merchant_order_no":"{run_id}-{n}"}}"#
                )),
            ),
            _ => ("GET", "/v1/products", Bytes::new()),
        };
        let authorization = authorization(&plan.keys[k], method, path, &body)
            .parse()
            .expect("an authorization header is ASCII");
        Prepared {
            key: k as u32,
            authorization,
            body,
        }
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let per = count.div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = (0..threads)
            .map(|t| scope.spawn(move || (t * per..((t + 1) * per).min(count)).map(one).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("signer thread"))
            .collect()
    })
}

/// Request number `n` of the run, from its prepared signature where it has one.
fn request(plan: &Plan, host: &str, prepared: Option<&Prepared>) -> (u32, Request<Full<Bytes>>) {
    let builder = Request::builder().header("host", host);
    let (k, request) = match (&plan.target, prepared) {
        (Target::Healthz, _) | (_, None) => (0, builder.uri("/healthz").body(Full::default())),
        (Target::Products, Some(p)) => (
            p.key,
            builder
                .uri("/v1/products")
                .header("authorization", p.authorization.clone())
                .body(Full::default()),
        ),
        (Target::Orders { .. }, Some(p)) => (
            p.key,
            builder
                .method("POST")
                .uri("/v1/orders")
                .header("content-type", "application/json")
                .header("authorization", p.authorization.clone())
                .body(Full::new(p.body.clone())),
        ),
    };
    (k, request.expect("request parts are valid"))
}

struct Shared {
    plan: Plan,
    next: AtomicU64,
    /// Set once every connection is open, just before the workers are let go.
    start: OnceLock<Instant>,
    limit: u64,
    /// Open loop: one permit per request that has fallen due.
    due: Option<Arc<Semaphore>>,
    /// Signed before the run; empty for `/healthz`, which is not signed.
    prepared: Vec<Prepared>,
}

async fn worker(shared: Arc<Shared>, mut sender: Option<Sender>, ready: Arc<Barrier>) -> Seen {
    let plan = &shared.plan;
    let mut seen = Seen::default();
    let host = plan.addr.to_string();
    ready.wait().await;
    let start = *shared.start.get().expect("set before the barrier opens");
    let deadline = start + plan.duration;
    loop {
        if let Some(due) = &shared.due {
            match due.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
        }
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        if n >= shared.limit {
            break;
        }
        let due = match plan.rate {
            Some(rate) => start + Duration::from_secs_f64(n as f64 / rate),
            None => Instant::now(),
        };
        if plan.rate.is_none() && due >= deadline {
            break;
        }
        let (k, req) = request(plan, &host, shared.prepared.get(n as usize));
        if sender.is_none() {
            sender = connect(plan.addr).await;
        }
        let Some(s) = sender.as_mut() else {
            seen.io_errors.push(k);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let answer = async {
            let resp = s.send_request(req).await.ok()?;
            let status = resp.status();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        }
        .await;
        let Some((status, body)) = answer else {
            seen.io_errors.push(k);
            sender = None;
            continue;
        };
        let micros = due.elapsed().as_micros().clamp(1, u32::MAX as u128) as u32;
        seen.samples.push((k, micros));
        let outcome = if status.is_success() {
            if let (Target::Orders { .. }, Ok(order)) = (&plan.target, serde_json::from_slice::<OrderAnswer>(&body)) {
                seen.codes.extend(order.codes);
            }
            status.as_str().to_owned()
        } else {
            match serde_json::from_slice::<ErrorAnswer>(&body) {
                Ok(e) => format!("{} {}", status.as_str(), e.error.code),
                Err(_) => status.as_str().to_owned(),
            }
        };
        seen.outcomes.push((k, outcome));
    }
    seen
}

/// Releases request `n` at `start + n / rate`, then one more permit per worker so each
/// finds the run over.
fn pace(due: Arc<Semaphore>, start: Instant, rate: f64, limit: u64, workers: usize) {
    let mut released = 0u64;
    while released < limit {
        let should = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(limit);
        if should > released {
            due.add_permits((should - released) as usize);
            released = should;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    due.add_permits(workers);
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// A connection the server has accepted and answered on: the kernel completes a
/// handshake long before a busy server gets round to it, and that set-up is not what a
/// run measures.
async fn warm(addr: SocketAddr) -> Option<Sender> {
    let mut sender = connect(addr).await?;
    let req = Request::builder()
        .uri("/healthz")
        .header("host", addr.to_string())
        .body(Full::default())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    resp.into_body().collect().await.ok()?;
    Some(sender)
}

pub async fn run(plan: Plan) -> Run {
    assert!(plan.addr.ip().is_loopback(), "load is only ever sent to loopback");
    assert!(
        (1..=2000).contains(&plan.connections) && plan.duration <= Duration::from_secs(600),
        "bounded runs only"
    );
    let by_time = plan
        .rate
        .map_or(u64::MAX, |r| (r * plan.duration.as_secs_f64()).ceil() as u64);
    let limit = by_time.min(plan.max_requests.unwrap_or(u64::MAX));
    let run_id = format!("L{:016x}", rand::thread_rng().gen::<u64>());
    let presign = limit.min(presigned_per_sec(&plan.target) * plan.duration.as_secs().max(1));
    let prepared = prepare(&plan, &run_id, presign);
    // A signed run ends when its prepared requests do, if that comes first.
    let limit = if prepared.is_empty() {
        limit
    } else {
        prepared.len() as u64
    };
    let senders = futures_util::future::join_all((0..plan.connections).map(|_| warm(plan.addr))).await;
    let due = plan.rate.map(|_| Arc::new(Semaphore::new(0)));
    let shared = Arc::new(Shared {
        prepared,
        next: AtomicU64::new(0),
        start: OnceLock::new(),
        limit,
        due: due.clone(),
        plan: plan.clone(),
    });
    let ready = Arc::new(Barrier::new(plan.connections + 1));
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|sender| tokio::spawn(worker(shared.clone(), sender, ready.clone())))
        .collect();
    let cpu_before = own_cpu_seconds();
    let start = Instant::now();
    shared.start.set(start).expect("set once");
    ready.wait().await;
    let pacer = plan.rate.zip(due).map(|(rate, due)| {
        let workers = plan.connections;
        std::thread::spawn(move || pace(due, start, rate, limit, workers))
    });
    let mut seen = Vec::with_capacity(tasks.len());
    for task in tasks {
        seen.push(task.await.expect("worker"));
    }
    let elapsed = start.elapsed();
    let cpu_seconds = own_cpu_seconds() - cpu_before;
    if let Some(p) = pacer {
        p.join().expect("pacer");
    }

    let tier = |k: u32| plan.keys.get(k as usize).map_or("none", |key| key.tier.as_str());
    let mut all = Tally::new();
    let mut by_tier: BTreeMap<String, Tally> = BTreeMap::new();
    let mut codes = HashSet::new();
    let mut codes_repeated = 0;
    for s in seen {
        for (k, micros) in s.samples {
            let t = by_tier.entry(tier(k).to_owned()).or_insert_with(Tally::new);
            let _ = t.latency.record(micros as u64);
            let _ = all.latency.record(micros as u64);
        }
        for (k, outcome) in s.outcomes {
            let t = by_tier.entry(tier(k).to_owned()).or_insert_with(Tally::new);
            *t.outcomes.entry(outcome.clone()).or_default() += 1;
            *all.outcomes.entry(outcome).or_default() += 1;
        }
        for k in s.io_errors {
            by_tier.entry(tier(k).to_owned()).or_insert_with(Tally::new).io_errors += 1;
            all.io_errors += 1;
        }
        for c in s.codes {
            if !codes.insert(c) {
                codes_repeated += 1;
            }
        }
    }
    let issued = shared.next.load(Ordering::Relaxed).min(limit);
    Run {
        elapsed,
        issued,
        all,
        by_tier,
        codes_delivered: codes.len() as u64,
        codes_repeated,
        cpu_seconds,
    }
}
