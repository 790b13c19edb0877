//! cardgate-load: a bounded load generator that signs requests like real resellers.
//!
//!   cardgate-load run <name> --addr A --target healthz|products|orders [--keys FILE] [--sku S]
//!                 --connections N --seconds S [--rate R] [--max-requests N]
//!   cardgate-load search <name> --addr A --target orders --keys FILE --sku S
//!                 --connections N --seconds S
//!   cardgate-load report <results.jsonl> <out-dir>
//!
//! `run` is closed loop without `--rate` and open loop with it. `search` finds the
//! highest open-loop rate the gateway sustains. Each prints one JSON line; `report` turns
//! the lines of a whole run (loadtests/run.sh) into latest.md, latest.json and a plot.
//! `--keys` is a file of `key_id secret tier` lines; requests go round the keys.
//! Loopback only; every run stops by itself.

mod load;
mod report;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use load::{Key, Plan, Run, Target};

fn usage() -> ! {
    eprintln!(
        "usage: cardgate-load run|search <name> --addr A --target T [options] | report <results.jsonl> <out-dir>"
    );
    std::process::exit(2)
}

fn flags(args: &[String]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(name) = flag.strip_prefix("--") else { usage() };
        let Some(value) = it.next() else { usage() };
        out.insert(name.to_owned(), value.clone());
    }
    out
}

fn plan(f: &HashMap<String, String>) -> Plan {
    let get = |k: &str| f.get(k).map(String::as_str);
    let num = |k: &str| get(k).map(|v| v.parse::<f64>().unwrap_or_else(|_| usage()));
    let keys: Vec<Key> = match get("keys") {
        Some(path) => std::fs::read_to_string(path)
            .expect("keys file")
            .lines()
            .filter_map(|l| {
                let mut p = l.split_whitespace();
                Some(Key {
                    id: p.next()?.to_owned(),
                    signer: cardgate::auth::signing::Signer::new(p.next()?.as_bytes()),
                    tier: p.next().unwrap_or("none").to_owned(),
                })
            })
            .collect(),
        None => Vec::new(),
    };
    let target = match get("target") {
        Some("healthz") => Target::Healthz,
        Some("products") => Target::Products,
        Some("orders") => Target::Orders {
            sku: get("sku").unwrap_or_else(|| usage()).to_owned(),
        },
        _ => usage(),
    };
    if !matches!(target, Target::Healthz) && keys.is_empty() {
        usage()
    }
    let addr: SocketAddr = get("addr").and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
    Plan {
        addr,
        target,
        keys: keys.into(),
        connections: num("connections").unwrap_or(64.0) as usize,
        duration: Duration::from_secs_f64(num("seconds").unwrap_or(10.0)),
        rate: num("rate"),
        max_requests: num("max-requests").map(|n| n as u64),
    }
}

fn target_name(t: &Target) -> &'static str {
    match t {
        Target::Healthz => "healthz",
        Target::Products => "products",
        Target::Orders { .. } => "orders",
    }
}

/// Percentile points for the plot: 0 to 5 "nines" (50%, 90%, 99% ... 99.999%).
fn curve(h: &hdrhistogram::Histogram<u64>) -> Vec<[f64; 2]> {
    (0..=50)
        .map(|i| {
            let nines = i as f64 / 10.0;
            let q = 1.0 - 10f64.powf(-nines);
            [nines, h.value_at_quantile(q) as f64 / 1000.0]
        })
        .collect()
}

fn latency(h: &hdrhistogram::Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0,
           "count": h.len()})
}

fn summary(name: &str, plan: &Plan, run: &Run) -> Value {
    let secs = run.elapsed.as_secs_f64();
    let tiers: serde_json::Map<String, Value> = run
        .by_tier
        .iter()
        .map(|(tier, t)| {
            (
                tier.clone(),
                json!({"answered": t.answered(), "succeeded": t.succeeded(), "outcomes": t.outcomes,
                       "io_errors": t.io_errors, "latency_ms": latency(&t.latency)}),
            )
        })
        .collect();
    json!({
        "scenario": name,
        "target": target_name(&plan.target),
        "mode": if plan.rate.is_some() { "open" } else { "closed" },
        "connections": plan.connections,
        "offered_rate": plan.rate,
        "seconds": secs,
        "issued": run.issued,
        "answered": run.all.answered(),
        "succeeded": run.all.succeeded(),
        "rate": run.all.answered() as f64 / secs,
        "success_rate": run.all.succeeded() as f64 / secs,
        "io_errors": run.all.io_errors,
        "outcomes": run.all.outcomes,
        "latency_ms": latency(&run.all.latency),
        "curve": curve(&run.all.latency),
        "codes_delivered": run.codes_delivered,
        "codes_repeated": run.codes_repeated,
        "generator_cpu_seconds": run.cpu_seconds,
        "tiers": tiers,
    })
}

/// An open-loop rate is sustained when nearly every request that fell due was answered
/// successfully and the tail has not turned into a queue.
fn sustained(run: &Run) -> bool {
    let p99_ms = run.all.latency.value_at_quantile(0.99) as f64 / 1000.0;
    run.all.succeeded() as f64 >= 0.97 * run.issued as f64 && run.all.io_errors == 0 && p99_ms <= 100.0
}

async fn search(name: &str, plan: Plan) -> Value {
    // A closed-loop run finds the neighbourhood, open-loop probes then find the edge.
    let probe = Duration::from_secs_f64(plan.duration.as_secs_f64().clamp(2.0, 10.0));
    let closed = load::run(Plan {
        rate: None,
        duration: probe,
        ..plan.clone()
    })
    .await;
    let estimate = closed.all.succeeded() as f64 / closed.elapsed.as_secs_f64();
    let mut probes = vec![json!({"mode": "closed", "rate": estimate})];
    let (mut best, mut rate) = (0.0f64, estimate.max(50.0));
    let mut worst_failed = f64::INFINITY;
    for _ in 0..6 {
        let run = load::run(Plan {
            rate: Some(rate),
            duration: probe,
            ..plan.clone()
        })
        .await;
        let ok = sustained(&run);
        probes.push(json!({"mode": "open", "rate": rate, "sustained": ok,
            "success_rate": run.all.succeeded() as f64 / run.elapsed.as_secs_f64(),
            "p99_ms": run.all.latency.value_at_quantile(0.99) as f64 / 1000.0}));
        eprintln!(
            "{name}: {rate:.0}/s offered: {}",
            if ok { "sustained" } else { "not sustained" }
        );
        if ok {
            best = best.max(rate);
        } else {
            worst_failed = worst_failed.min(rate);
        }
        rate = if worst_failed.is_finite() {
            if ok {
                (rate + worst_failed) / 2.0
            } else if best > 0.0 {
                (best + rate) / 2.0
            } else {
                rate * 0.75
            }
        } else {
            rate * 1.25
        };
        if best > 0.0 && worst_failed.is_finite() && worst_failed / best < 1.06 {
            break;
        }
        // Let the ledger drain what the last probe left before the next one starts.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    json!({"scenario": name, "target": target_name(&plan.target), "mode": "search",
           "connections": plan.connections, "max_rate": best, "closed_loop_rate": estimate, "probes": probes})
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") if args.len() >= 2 => {
            let plan = plan(&flags(&args[2..]));
            let run = load::run(plan.clone()).await;
            println!("{}", summary(&args[1], &plan, &run));
        }
        Some("search") if args.len() >= 2 => {
            let plan = plan(&flags(&args[2..]));
            println!("{}", search(&args[1], plan).await);
        }
        Some("report") if args.len() == 3 => {
            if let Err(e) = report::write(std::path::Path::new(&args[1]), std::path::Path::new(&args[2])) {
                eprintln!("report: {e:#}");
                std::process::exit(1);
            }
        }
        _ => usage(),
    }
}
