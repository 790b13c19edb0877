#!/usr/bin/env bash
# One Redis against a Redis Cluster on the same machine (docs/api.md §9), then
# loadtests/report/cluster.{md,json}.
#
#   loadtests/cluster.sh [seconds per scenario, default 10]
#
# Two cores cannot show a cluster scaling, so this shows what the cluster layout costs:
# the same gateway, catalogue and signed order load against the local Redis and against
# a private six-node cluster (three primaries, three replicas, on loopback ports from
# CARDGATE_LOAD_CLUSTER_PORT, default 7420; stopped again at the end). For each layout:
#   healthz        the server's ceiling in that run, so the order figures compare as ratios
#   idle           CPU of the gateway and every Redis node over a few idle seconds
#   orders-N       signed single-code orders, closed loop over N connections, with the
#                  Postgres commit; CPU per order of the gateway, Redis (every node) and
#                  Postgres; per node: the reservation script's calls and microseconds
#                  per call (INFO commandstats) and its share of all commands and CPU
# On the cluster only:
#   dry-cell       one order from each of 16 resellers (one per cell) right after an
#                  import into one cell: fifteen find their cell dry and wait for codes
#                  brought at once (cardgate_stock_fill_seconds)
#   spread         an import into one cell until every cell's pool holds three quarters
#                  of its share: the mover's next pass (redis.mover_interval_ms) and its
#                  duration (cardgate_stock_mover_pass_seconds)
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
secs=${1:-10}
conns="64 256"
out=loadtests/report
work=$(mktemp -d)
results="$work/results.jsonl"
load=./target/release/cardgate-load
note() { echo "cluster-load: $*" >&2; }

cluster_base=${CARDGATE_LOAD_CLUSTER_PORT:-7420}
cluster_ports=$(seq "$cluster_base" $((cluster_base + 5)))
stop_cluster() {
  for p in $cluster_ports; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
}
trap 'cleanup; stop_cluster; rm -rf "$work"' EXIT
seeds=$(CARDGATE_DEV_CLUSTER_PORT=$cluster_base scripts/dev cluster | sed -n 's/^CARDGATE_TEST_REDIS_CLUSTER=//p')
[ -n "$seeds" ] || { note "the load cluster did not start"; exit 1; }
# What an earlier run left behind (its AOF reloads on start).
for p in $cluster_ports; do redis-cli -p "$p" FLUSHALL >/dev/null 2>&1 || true; done

limits=()
for t in STANDARD SILVER GOLD DIAMOND; do
  limits+=("CARDGATE_TIERS__${t}__ORDERS_PER_SECOND=10000000" "CARDGATE_TIERS__${t}__ORDERS_BURST=10000000"
           "CARDGATE_TIERS__${t}__READS_PER_SECOND=10000000" "CARDGATE_TIERS__${t}__READS_BURST=10000000")
done

# nodes LAYOUT: the Redis nodes of a layout, one `port` a line.
nodes() {
  if [ "$1" = single ]; then
    hostport=${CARDGATE_REDIS_URL#redis://}; hostport=${hostport%%/*}; echo "${hostport#*:}"
  else
    echo "$cluster_ports"
  fi
}

# snapshot LAYOUT: CPU seconds of the gateway and Postgres, and per Redis node its role,
# CPU seconds, commands and the reservation script's calls and microseconds (JSON).
snapshot() {
  python3 - "$gw_pid" $(nodes "$1") <<'PY'
import json, subprocess, sys
sys.path.insert(0, "loadtests")
from procstat import postgres_secs, secs
def info(port, section):
    out = subprocess.run(["redis-cli", "-p", port, "INFO", section], capture_output=True, text=True).stdout
    return dict(l.split(":", 1) for l in out.replace("\r", "").splitlines() if ":" in l and not l.startswith("#"))
nodes = {}
for port in sys.argv[2:]:
    cmds = info(port, "commandstats")
    calls = usec = total = 0
    for name, v in cmds.items():
        f = dict(kv.split("=") for kv in v.split(","))
        total += int(f["calls"])
        if name == "cmdstat_evalsha":
            calls, usec = int(f["calls"]), int(f["usec"])
    pid = info(port, "server").get("process_id", "0")
    nodes[port] = {"role": info(port, "replication").get("role", "?"), "cpu": secs(pid),
                   "commands": total, "script_calls": calls, "script_usec": usec}
print(json.dumps({"gateway": secs(sys.argv[1]), "postgres": postgres_secs(), "nodes": nodes}))
PY
}

# measure LAYOUT NAME ARGS...: one cardgate-load run with the snapshots around it.
measure() {
  local layout=$1 name=$2 before after line
  shift 2
  note "$layout $name"
  before=$(snapshot "$layout")
  line=$("$load" run "$name" "$@" --addr "$addr")
  after=$(snapshot "$layout")
  python3 - "$layout" "$line" "$before" "$after" <<'PY' | tee -a "$results" | cut -c1-200 >&2
import json, sys
layout, run, before, after = sys.argv[1], *(json.loads(a) for a in sys.argv[2:])
n = max(run["answered"], 1)
nodes = {}
for port, a in after["nodes"].items():
    b = before["nodes"][port]
    d = {k: a[k] - b[k] for k in ("cpu", "commands", "script_calls", "script_usec")}
    nodes[port] = {"role": a["role"], "cpu_us_per_request": round(d["cpu"] * 1e6 / n, 1),
                   "commands": d["commands"], "script_calls": d["script_calls"],
                   "script_us_per_call": round(d["script_usec"] / d["script_calls"], 2) if d["script_calls"] else None}
cpu = {"gateway": after["gateway"] - before["gateway"], "postgres": after["postgres"] - before["postgres"],
       "redis": sum(a["cpu"] - before["nodes"][p]["cpu"] for p, a in after["nodes"].items()),
       "generator": run.get("generator_cpu_seconds", 0.0)}
print(json.dumps({"layout": layout, "scenario": run["scenario"], "connections": run["connections"],
                  "seconds": run["seconds"], "rate": run["rate"], "success_rate": run["success_rate"],
                  "outcomes": run["outcomes"], "latency_ms": run["latency_ms"],
                  "cpu_us_per_request": {k: round(v * 1e6 / n, 1) for k, v in cpu.items()}, "nodes": nodes}))
PY
}

# metric NAME: the sum of a metric's samples on the gateway (every label).
metric() {
  curl -fs "$base/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}

run_layout() {
  local layout=$1
  if [ "$layout" = single ]; then
    start_gateway "${limits[@]}"
  else
    start_gateway "${limits[@]}" CARDGATE_REDIS_URL="$seeds"
  fi
  note "$layout: setting up stock and resellers"
  stock load-orders $((secs * 30000))
  : >"$work/keys-$layout"
  # Consecutive resellers: one home cell each.
  keys diamond 16 "$work/keys-$layout"
  for p in $(nodes "$layout"); do redis-cli -p "$p" BGREWRITEAOF >/dev/null 2>&1 || true; done
  for _ in $(seq 1 300); do
    busy=0
    for p in $(nodes "$layout"); do
      redis-cli -p "$p" INFO persistence | grep -q '^aof_rewrite_in_progress:1' && busy=1
    done
    [ "$busy" = 0 ] && break
    sleep 0.2
  done
  psql "$gw_db" -qc CHECKPOINT

  before=$(snapshot "$layout")
  sleep 5
  after=$(snapshot "$layout")
  python3 - "$layout" "$before" "$after" <<'PY' | tee -a "$results" >&2
import json, sys
layout, b, a = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps({"layout": layout, "scenario": "idle", "cpu_cores_busy": {
    "gateway": round((a["gateway"] - b["gateway"]) / 5, 3),
    "redis": round(sum(n["cpu"] - b["nodes"][p]["cpu"] for p, n in a["nodes"].items()) / 5, 3)}}))
PY
  measure "$layout" healthz --target healthz --connections 64 --seconds "$secs"
  for c in $conns; do
    measure "$layout" "orders-$c" --target orders --sku load-orders --keys "$work/keys-$layout" \
      --connections "$c" --seconds "$secs"
  done

  if [ "$layout" = cluster ]; then
    # Each reseller's first order of a fresh product: all but the import cell's are dry.
    product dry
    code_file 1600 dry
    fills=$(metric cardgate_stock_fill_seconds_count)
    fill_secs=$(metric cardgate_stock_fill_seconds_sum)
    import_codes dry >/dev/null
    line=$("$load" run dry-cell --addr "$addr" --target orders --sku dry --keys "$work/keys-$layout" \
      --connections 16 --max-requests 16 --seconds 10)
    python3 - "$line" "$fills" "$fill_secs" "$(metric cardgate_stock_fill_seconds_count)" \
      "$(metric cardgate_stock_fill_seconds_sum)" <<'PY' | tee -a "$results" >&2
import json, sys
run = json.loads(sys.argv[1])
n = float(sys.argv[4]) - float(sys.argv[2])
took = float(sys.argv[5]) - float(sys.argv[3])
print(json.dumps({"layout": "cluster", "scenario": "dry-cell", "outcomes": run["outcomes"],
                  "latency_ms": run["latency_ms"], "fills": int(n),
                  "fill_mean_ms": round(took * 1000 / n, 2) if n else None}))
PY
    # An import into one cell, until every cell holds three quarters of its share.
    product spread
    code_file 16000 spread
    passes=$(metric cardgate_stock_mover_pass_seconds_count)
    pass_secs=$(metric cardgate_stock_mover_pass_seconds_sum)
    import_codes spread >/dev/null
    started=$(date +%s.%N)
    pk=$(psql "$gw_db" -Atc "SELECT id FROM products WHERE sku = 'spread'")
    spread_ms=null
    for _ in $(seq 1 1000); do
      low=0
      for cell in $(seq 0 15); do
        n=$(redis-cli -c -p "$cluster_base" LLEN "$gw_prefix:{c$cell}:stock:$pk")
        [ "$n" -ge 750 ] || low=1
      done
      if [ "$low" = 0 ]; then
        spread_ms=$(python3 -c "import time; print(round((time.time() - $started) * 1000))")
        break
      fi
      sleep 0.01
    done
    python3 - "$spread_ms" "$passes" "$pass_secs" "$(metric cardgate_stock_mover_pass_seconds_count)" \
      "$(metric cardgate_stock_mover_pass_seconds_sum)" <<'PY' | tee -a "$results" >&2
import json, sys
n = float(sys.argv[4]) - float(sys.argv[2])
took = float(sys.argv[5]) - float(sys.argv[3])
print(json.dumps({"layout": "cluster", "scenario": "spread", "codes": 16000,
                  "spread_ms": None if sys.argv[1] == "null" else int(sys.argv[1]),
                  "mover_pass_mean_ms": round(took * 1000 / n, 2) if n else None}))
PY
  fi
  gw_stop
  # The cluster is this script's own; what the gateway left there goes with it.
  [ "$layout" = single ] || for p in $cluster_ports; do redis-cli -p "$p" FLUSHALL >/dev/null 2>&1 || true; done
}

run_layout single
run_layout cluster

printf '{"scenario": "meta", "date": "%s", "cores": %s, "commit": "%s", "seconds_per_scenario": %s}\n' \
  "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$secs" >>"$results"
python3 loadtests/cluster-report.py "$results" "$out"
echo "cluster-load: wrote $out/cluster.md and $out/cluster.json" >&2
