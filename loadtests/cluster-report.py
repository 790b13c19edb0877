"""Turns loadtests/cluster.sh's results into cluster.md and cluster.json.

    python3 loadtests/cluster-report.py <results.jsonl> <out-dir>
"""
import json
import sys

lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = sys.argv[2]
meta = next((l for l in lines if l.get("scenario") == "meta"), {})


def one(layout, scenario):
    return next((l for l in lines if l.get("layout") == layout and l.get("scenario") == scenario), None)


def best_orders(layout):
    runs = [l for l in lines if l.get("layout") == layout and l.get("scenario", "").startswith("orders-")]
    return max(runs, key=lambda l: l["success_rate"], default=None)


summary = {"meta": meta, "layouts": {}}
md = [
    "# One Redis against a Redis Cluster",
    "",
    f"{meta.get('date', '?')}, {meta.get('cores', '?')} cores, commit {meta.get('commit', '?')}, "
    f"{meta.get('seconds_per_scenario', '?')} s per scenario (`loadtests/cluster.sh`). "
    "The cluster is six nodes (three primaries, three replicas) on the same machine as the gateway, "
    "Postgres and the generator, so it shows the cost of the layout, not its scaling.",
    "",
    "| layout | `/healthz`/s | orders/s (best) | of `/healthz` | p50 / p99 ms | CPU µs per order: gateway | Redis (all nodes) | Postgres | generator | idle cores: gateway, Redis |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for layout in ("single", "cluster"):
    h, o, idle = one(layout, "healthz"), best_orders(layout), one(layout, "idle")
    if not (h and o):
        continue
    ratio = o["success_rate"] / h["rate"] if h["rate"] else 0
    cpu = o["cpu_us_per_request"]
    busy = idle["cpu_cores_busy"] if idle else {}
    summary["layouts"][layout] = {"healthz": h["rate"], "orders": o["success_rate"], "of_healthz": ratio,
                                  "connections": o["connections"], "cpu_us_per_order": cpu,
                                  "p50_ms": o["latency_ms"]["p50"], "p99_ms": o["latency_ms"]["p99"],
                                  "idle_cores": busy, "nodes": o["nodes"]}
    md.append(
        f"| {layout} | {h['rate']:,.0f} | {o['success_rate']:,.0f} ({o['connections']} conns) | {ratio:.3f} | "
        f"{o['latency_ms']['p50']:.1f} / {o['latency_ms']['p99']:.1f} | {cpu['gateway']} | {cpu['redis']} | "
        f"{cpu['postgres']} | {cpu['generator']} | {busy.get('gateway', '?')}, {busy.get('redis', '?')} |"
    )
s, c = summary["layouts"].get("single"), summary["layouts"].get("cluster")
if s and c:
    summary["cluster_over_single"] = {"orders": c["orders"] / s["orders"], "of_healthz": c["of_healthz"] / s["of_healthz"]}
    md += ["", f"The cluster sells **{c['orders'] / s['orders']:.2f}x** the orders per second of one Redis "
           f"({c['of_healthz'] / s['of_healthz']:.2f}x as a share of each run's `/healthz`)."]
for layout in ("single", "cluster"):
    o = summary["layouts"].get(layout)
    if not o:
        continue
    md += ["", f"## Per node, {layout} (the best order run)", "",
           "| node | role | reservation scripts | µs per script (`INFO commandstats`) | share of scripts | commands | CPU µs per order |",
           "|---|---|---|---|---|---|---|"]
    nodes = o["nodes"]
    scripts = sum(n["script_calls"] for n in nodes.values()) or 1
    for port, n in sorted(nodes.items()):
        md.append(f"| {port} | {n['role']} | {n['script_calls']:,} | {n['script_us_per_call']} | "
                  f"{n['script_calls'] / scripts:.0%} | {n['commands']:,} | {n['cpu_us_per_request']} |")
    primaries = [n for n in nodes.values() if n["role"] == "master"]
    if len(primaries) > 1:
        mean_calls = sum(n["script_calls"] for n in primaries) / len(primaries)
        mean_cpu = sum(n["cpu_us_per_request"] for n in primaries) / len(primaries)
        imbalance = {"scripts_max_over_mean": max(n["script_calls"] for n in primaries) / mean_calls if mean_calls else None,
                     "cpu_max_over_mean": max(n["cpu_us_per_request"] for n in primaries) / mean_cpu if mean_cpu else None}
        o["imbalance"] = imbalance
        md += ["", f"Imbalance between primaries (busiest over mean): scripts {imbalance['scripts_max_over_mean']:.2f}x, "
               f"CPU {imbalance['cpu_max_over_mean']:.2f}x."]
dry, spread = one("cluster", "dry-cell"), one("cluster", "spread")
if dry or spread:
    md += ["", "## The mover", ""]
if dry:
    summary["dry_cell"] = dry
    md.append(f"- **A dry cell filled at once**: 16 resellers, one per cell, each ordered a product just imported "
              f"into one cell: {dry['fills']} orders found their cell dry and waited {dry['fill_mean_ms']} ms on average "
              f"for codes brought from the other cells; those orders took p50 {dry['latency_ms']['p50']:.1f} ms, "
              f"max {dry['latency_ms']['max']:.1f} ms; outcomes {dry['outcomes']}.")
if spread:
    summary["spread"] = spread
    md.append(f"- **Spread by the mover**: {spread['codes']:,} codes imported into one cell held three quarters of "
              f"every cell's share {spread['spread_ms']} ms after the import (the mover's next pass, every "
              f"`redis.mover_interval_ms`); a pass took {spread['mover_pass_mean_ms']} ms on average.")
open(f"{out}/cluster.md", "w").write("\n".join(md) + "\n")
open(f"{out}/cluster.json", "w").write(json.dumps(summary, indent=2) + "\n")
