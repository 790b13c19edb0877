//! Turns the result lines of one `loadtests/run.sh` into `latest.json` (every line, plus
//! the checks), `latest.md` (figures, ratios against the targets, see docs/performance.md) and
//! `latency.svg` (latency by percentile for each scenario).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::{json, Value};

struct Check {
    what: &'static str,
    figure: String,
    target: &'static str,
    met: Option<bool>,
}

impl Check {
    /// A check on one figure: shown by `show`, met when `ok` holds, "missing" if the
    /// run did not produce it.
    fn on(
        what: &'static str,
        target: &'static str,
        value: Option<f64>,
        show: impl Fn(f64) -> String,
        ok: impl Fn(f64) -> bool,
    ) -> Check {
        Check {
            what,
            figure: value.map_or("missing".into(), show),
            target,
            met: value.map(ok),
        }
    }
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

pub fn write(results: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(results).with_context(|| format!("reading {}", results.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a result line is not JSON")?;
    let find = |name: &str| lines.iter().find(|l| l["scenario"] == name);
    let rate = |name: &str, field: &str| find(name).and_then(|l| num(l, &[field]));
    // Closed-loop figures are run at more than one connection count; each side of a
    // ratio is taken at its best.
    let best = |prefix: &str, field: &str| {
        lines
            .iter()
            .filter(|l| l["scenario"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .filter_map(|l| num(l, &[field]))
            .reduce(f64::max)
    };
    let p99 = |name: &str| find(name).and_then(|l| num(l, &["latency_ms", "p99"]));

    let mut checks = Vec::new();
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b);
    let orders = best("orders-steady", "success_rate");
    let healthz = rate("healthz", "success_rate");
    checks.push(Check::on(
        "signed single-code orders/s (closed loop, with the Postgres commit, best connection count) / unauthenticated /healthz",
        ">= 0.20",
        ratio(orders, healthz),
        |r| format!("{r:.3}"),
        |r| r >= 0.20,
    ));
    checks.push(Check::on(
        "the same orders/s / pgbench Postgres-only reservation on a lean schema (one unique index on orders, one partial index on codes)",
        ">= 4x",
        ratio(orders, best("baseline-pgbench-lean", "rate")),
        |r| format!("{r:.2}x"),
        |r| r >= 4.0,
    ));
    checks.push(Check::on(
        "the same orders/s / redis-benchmark on the reservation script (each at its best connection count)",
        ">= 0.25",
        ratio(orders, best("baseline-redis-script", "rate")),
        |r| format!("{r:.3}"),
        |r| r >= 0.25,
    ));
    let half = find("orders-half-max").and_then(|l| {
        let p50 = num(l, &["latency_ms", "p50"])?;
        let p99 = num(l, &["latency_ms", "p99"])?;
        Some((p50, p99))
    });
    checks.push(Check {
        what: "open loop at half the maximum sustained order rate: p99 / p50",
        figure: half.map_or("missing".into(), |(p50, p99)| {
            format!("{:.1}x (p50 {p50:.1} ms, p99 {p99:.1} ms)", p99 / p50.max(0.001))
        }),
        target: "<= 3x",
        met: half.map(|(p50, p99)| p99 <= 3.0 * p50),
    });
    let flash = find("flash-sale");
    let flash_check = find("flash-sale-check");
    let oversell = flash_check.and_then(|c| num(c, &["oversell"]));
    let repeated = flash.and_then(|f| num(f, &["codes_repeated"]));
    let reconciled = flash_check.and_then(|c| c["reconciliation_clean"].as_bool());
    checks.push(Check {
        what: "flash sale: codes delivered beyond stock, codes delivered twice, reconciliation",
        figure: match (oversell, repeated, reconciled) {
            (Some(o), Some(r), Some(c)) => {
                format!("{o} oversold, {r} twice, {}", if c { "clean" } else { "NOT clean" })
            }
            _ => "missing".into(),
        },
        target: "0, 0, clean",
        met: oversell
            .zip(repeated)
            .zip(reconciled)
            .map(|((o, r), c)| o == 0.0 && r == 0.0 && c),
    });
    let flash_p99 = p99("flash-sale");
    checks.push(Check::on(
        "flash sale p99 (every answer, sold or out of stock)",
        "< 25 ms",
        flash_p99,
        |v| format!("{v:.1} ms"),
        |v| v < 25.0,
    ));
    let reads = ratio(rate("signed-reads", "success_rate"), rate("healthz", "success_rate"));
    checks.push(Check::on(
        "signed GET /v1/products / unauthenticated /healthz",
        ">= 0.60",
        reads,
        |r| format!("{r:.2}"),
        |r| r >= 0.60,
    ));
    let top = find("tier-mix").and_then(top_tier);
    checks.push(Check {
        what: "tier mix at twice the sustained rate: top tier's success share and p99",
        figure: top.as_ref().map_or("missing".into(), |(tier, share, p99)| {
            format!("{tier}: {:.1}%, {p99:.1} ms", share * 100.0)
        }),
        target: ">= 99%, < 25 ms",
        met: top.map(|(_, share, p99)| share >= 0.99 && p99 < 25.0),
    });

    std::fs::create_dir_all(out)?;
    let checks_json: Vec<Value> = checks
        .iter()
        .map(|c| json!({"what": c.what, "figure": c.figure, "target": c.target, "met": c.met}))
        .collect();
    std::fs::write(
        out.join("latest.json"),
        serde_json::to_string_pretty(&json!({"checks": checks_json, "results": lines}))?,
    )?;
    // A report kept from an earlier build, to read this one against.
    let before: Option<Value> = std::fs::read_to_string(out.join("before.json"))
        .ok()
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .context("before.json is not a report")?;
    let mut md = markdown(&lines, &checks);
    md.push_str(&budgets(&lines));
    if let Some(before) = &before {
        md.push_str(&compared(before, &lines, &checks));
    }
    md.push_str("\n![latency by percentile](latency.svg)\n");
    std::fs::write(out.join("latest.md"), md)?;
    plot(&lines, &out.join("latency.svg"))?;
    print!("{}", table(&checks));
    Ok(())
}

/// The tier with the highest priority is named first in the tier-mix line's `tier_order`.
fn top_tier(run: &Value) -> Option<(String, f64, f64)> {
    let tier = run["tier_order"].as_array()?.first()?.as_str()?.to_owned();
    let t = &run["tiers"][&tier];
    let answered = num(t, &["answered"])?;
    let share = num(t, &["succeeded"])? / answered.max(1.0);
    Some((tier, share, num(t, &["latency_ms", "p99"])?))
}

fn table(checks: &[Check]) -> String {
    let mut s = String::from("| check | figure | target | met |\n|---|---|---|---|\n");
    for c in checks {
        let met = match c.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        s.push_str(&format!("| {} | {} | {} | {} |\n", c.what, c.figure, c.target, met));
    }
    s
}

fn markdown(lines: &[Value], checks: &[Check]) -> String {
    let mut s = String::from("# cardgate load report\n\n");
    if let Some(meta) = lines.iter().find(|l| l["scenario"] == "meta") {
        s.push_str(&format!(
            "{} on {} cores, commit {}. Produced by `loadtests/run.sh`; every figure below comes from this one run.\n\n",
            meta["date"].as_str().unwrap_or("?"),
            meta["cores"],
            meta["commit"].as_str().unwrap_or("?")
        ));
    }
    s.push_str("## Targets (docs/performance.md)\n\n");
    s.push_str(&table(checks));
    s.push_str("\n## Scenarios\n\nLatency in ms; open-loop latency counts from when each request was due.\n\n");
    s.push_str("| scenario | target | mode | connections | offered/s | answered/s | succeeded/s | p50 | p99 | p99.9 | max | outcomes |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for l in lines.iter().filter(|l| l.get("latency_ms").is_some()) {
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        let ms = |k: &str| num(l, &["latency_ms", k]).map_or("-".into(), |v| format!("{v:.1}"));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            l["scenario"].as_str().unwrap_or("?"),
            l["target"].as_str().unwrap_or("?"),
            l["mode"].as_str().unwrap_or("?"),
            l["connections"],
            f(num(l, &["offered_rate"])),
            f(num(l, &["rate"])),
            f(num(l, &["success_rate"])),
            ms("p50"),
            ms("p99"),
            ms("p999"),
            ms("max"),
            outcomes(&l["outcomes"], l["io_errors"].as_u64().unwrap_or(0)),
        ));
    }
    s.push_str("\n## CPU per request by process\n\nMicroseconds of CPU (user and system) each process spent per answered request while the scenario ran, and the cores it kept busy. The generator signs every request before its clock starts, so its figure is sending and reading only.\n\n");
    s.push_str("| scenario | gateway µs | Redis µs | Postgres µs | generator µs | total µs | cores busy (gw / redis / pg / gen) |\n|---|---|---|---|---|---|---|\n");
    for l in lines.iter().filter(|l| l.get("cpu_us_per_request").is_some()) {
        let us = |k: &str| num(l, &["cpu_us_per_request", k]).unwrap_or(0.0);
        let busy = |k: &str| num(l, &["cpu_cores_busy", k]).unwrap_or(0.0);
        let total: f64 = ["gateway", "redis", "postgres", "generator"]
            .iter()
            .map(|k| us(k))
            .sum();
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {total:.1} | {:.2} / {:.2} / {:.2} / {:.2} |\n",
            l["scenario"].as_str().unwrap_or("?"),
            us("gateway"),
            us("redis"),
            us("postgres"),
            us("generator"),
            busy("gateway"),
            busy("redis"),
            busy("postgres"),
            busy("generator"),
        ));
    }
    if let Some(search) = lines.iter().find(|l| l["mode"] == "search") {
        s.push_str(&format!(
            "\n## Maximum sustained order rate\n\n{:.0} orders/s: the highest open-loop rate at which at least 97% of due orders succeeded with p99 at most 100 ms (closed-loop estimate {:.0}/s). Probes:\n\n",
            num(search, &["max_rate"]).unwrap_or(0.0),
            num(search, &["closed_loop_rate"]).unwrap_or(0.0)
        ));
        for p in search["probes"].as_array().into_iter().flatten() {
            s.push_str(&format!("- {p}\n"));
        }
    }
    if let Some(mix) = lines.iter().find(|l| l["scenario"] == "tier-mix") {
        s.push_str("\n## Tier mix at twice the sustained rate\n\n| tier | answered | succeeded | p99 ms | outcomes |\n|---|---|---|---|---|\n");
        for tier in mix["tier_order"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let t = &mix["tiers"][tier];
            s.push_str(&format!(
                "| {tier} | {} | {} | {:.1} | {} |\n",
                t["answered"],
                t["succeeded"],
                num(t, &["latency_ms", "p99"]).unwrap_or(f64::NAN),
                outcomes(&t["outcomes"], t["io_errors"].as_u64().unwrap_or(0))
            ));
        }
    }
    s.push_str("\n## Baselines and checks\n\n");
    for l in lines.iter().filter(|l| {
        l["scenario"]
            .as_str()
            .is_some_and(|n| n.starts_with("baseline-") || n.ends_with("-check"))
    }) {
        s.push_str(&format!("- {l}\n"));
    }
    s
}

/// CPU per request of every process in one scenario line, in the report's order.
const PROCESSES: [&str; 4] = ["gateway", "redis", "postgres", "generator"];

fn cpu(line: &Value) -> Option<[f64; 4]> {
    let us = &line["cpu_us_per_request"];
    us.as_object()?;
    Some(PROCESSES.map(|k| num(us, &[k]).unwrap_or(0.0)))
}

/// What each throughput goal allows a request to cost. Both sides of a ratio run on the
/// same cores, so a scenario reaches `goal` times `/healthz`'s rate only if a request of it
/// costs at most `/healthz`'s CPU per request divided by `goal`, all processes together.
fn budgets(lines: &[Value]) -> String {
    let find = |name: &str| lines.iter().find(|l| l["scenario"] == name);
    let Some(health) = find("healthz").and_then(cpu) else {
        return String::new();
    };
    let health_total: f64 = health.iter().sum();
    // The orders' figures are those of the connection count that answered most.
    let orders = lines
        .iter()
        .filter(|l| l["scenario"].as_str().is_some_and(|n| n.starts_with("orders-steady")))
        .max_by(|a, b| {
            num(a, &["success_rate"])
                .partial_cmp(&num(b, &["success_rate"]))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    let mut s = format!(
        "\n## What each goal allows a request to cost\n\n`/healthz` cost {health_total:.1} µs of CPU a request, all processes together, in this run. A scenario reaches a share of its rate on the same cores only if each of its requests costs at most that figure divided by the share.\n\n| goal | allowed µs a request | cost µs (gateway / Redis / Postgres / generator) | over by |\n|---|---|---|---|\n"
    );
    for (goal, share, line) in [
        ("signed orders 0.20 of /healthz", 0.20, orders),
        ("signed reads 0.60 of /healthz", 0.60, find("signed-reads")),
    ] {
        let Some(c) = line.and_then(cpu) else { continue };
        let allowed = health_total / share;
        let total: f64 = c.iter().sum();
        s.push_str(&format!(
            "| {goal} ({}) | {allowed:.0} | {total:.0} ({:.0} / {:.0} / {:.0} / {:.0}) | {:.2}x |\n",
            line.and_then(|l| l["scenario"].as_str()).unwrap_or("?"),
            c[0],
            c[1],
            c[2],
            c[3],
            total / allowed
        ));
    }
    s.push_str(
        "\nWhat each process spends an order and a read on, and why neither goes down to its allowance on two shared cores: [docs/performance.md](../../docs/performance.md#where-the-goals-stand).\n",
    );
    s
}

/// This run against `before`, a report kept from an earlier build: each check's figure,
/// then CPU per request by process for every scenario both runs have.
fn compared(before: &Value, lines: &[Value], checks: &[Check]) -> String {
    let meta = before["results"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["scenario"] == "meta");
    let mut s = format!(
        "\n## Before and after\n\nBefore: the report of {}, commit {} (`before.json`). Each figure is a ratio or a cost within its own run; the machine's speed differs between runs.\n\n| check | before | now | target |\n|---|---|---|---|\n",
        meta.and_then(|m| m["date"].as_str()).unwrap_or("?"),
        meta.and_then(|m| m["commit"].as_str()).unwrap_or("?"),
    );
    let was = |what: &str| {
        before["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["what"] == what)
            .and_then(|c| c["figure"].as_str())
            .unwrap_or("-")
            .to_owned()
    };
    for c in checks {
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            c.what,
            was(c.what),
            c.figure,
            c.target
        ));
    }
    // A slower day raises every process's CPU per request alike; in units of that run's
    // own `/healthz` request the two runs compare.
    let health = |ls: &[Value]| {
        ls.iter()
            .find(|l| l["scenario"] == "healthz")
            .and_then(cpu)
            .map(|c| c.iter().sum::<f64>())
    };
    let then_lines = before["results"].as_array().map(Vec::as_slice).unwrap_or_default();
    let (h_then, h_now) = (health(then_lines), health(lines));
    s.push_str("\nCPU per request, µs, before -> now, and the total in `/healthz` requests of the same run:\n\n| scenario | gateway | Redis | Postgres | generator | total | in `/healthz` requests |\n|---|---|---|---|---|---|---|\n");
    for now in lines {
        let Some(name) = now["scenario"].as_str() else { continue };
        let then = then_lines.iter().find(|l| l["scenario"] == name);
        let (Some(a), Some(b)) = (then.and_then(cpu), cpu(now)) else {
            continue;
        };
        let cell = |x: f64, y: f64| format!("{x:.0} -> {y:.0}");
        let (ta, tb) = (a.iter().sum::<f64>(), b.iter().sum::<f64>());
        let units = match (h_then, h_now) {
            (Some(x), Some(y)) => format!("{:.1} -> {:.1}", ta / x, tb / y),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {units} |\n",
            cell(a[0], b[0]),
            cell(a[1], b[1]),
            cell(a[2], b[2]),
            cell(a[3], b[3]),
            cell(ta, tb),
        ));
    }
    s
}

fn outcomes(v: &Value, io_errors: u64) -> String {
    let mut parts: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    if io_errors > 0 {
        parts.push(format!("connection errors: {io_errors}"));
    }
    parts.join(", ")
}

fn plot(lines: &[Value], path: &Path) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = lines
        .iter()
        .filter_map(|l| {
            let pts: Vec<(f64, f64)> = l["curve"]
                .as_array()?
                .iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?.max(0.001))))
                .collect();
            let label = format!("{} ({})", l["scenario"].as_str()?, l["mode"].as_str()?);
            (!pts.is_empty()).then_some((label, pts))
        })
        .collect();
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("cardgate latency by percentile (ms, log scale)", ("sans-serif", 22))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..5f64, (0.01f64..top * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(6)
        .x_label_formatter(&|x| {
            let nines = x.round() as i32;
            match nines {
                0 => "0%".into(),
                n => format!("{}%", 100.0 - 100.0 * 10f64.powi(-n)),
            }
        })
        .draw()?;
    for (i, (label, pts)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
