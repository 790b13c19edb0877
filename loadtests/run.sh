#!/usr/bin/env bash
# The whole load report in one run against local services: every scenario of the
# gateway and every baseline docs/design.md compares it with, measured in this invocation on
# this machine, then loadtests/report/latest.{md,json} and latency.svg.
#
#   loadtests/run.sh [seconds per scenario, default 10]
#
# Scenarios (cardgate-load; open loop = requests due at a fixed rate, latency counted
# from when each was due):
#   healthz          unauthenticated GET /healthz, closed loop: the server's ceiling
#   signed-reads     signed GET /v1/products, closed loop
#   orders-steady-N  signed single-code orders, closed loop over N connections, with
#                    the Postgres commit
#   orders-search    the highest open-loop order rate sustained (>= 97% succeed, p99 <= 100 ms)
#   orders-half-max  open loop at half that rate
#   flash-sale       10,000 buyers on one SKU holding 5,000 codes at half the maximum
#                    rate, stock running out half way; then `cardgate reconcile` and
#                    delivered codes vs stock
#   tier-mix         four tiers in equal shares at twice the sustained rate
#   signed-reads-catalogue  signed reads again, once a hundred more products (without
#                    stock) are on sale: each product's live count is one LLEN per cell
# Baselines:
#   baseline-redis-script  redis-benchmark calling the reservation script (EVALSHA),
#                          random order numbers, at the same connection counts
#   baseline-pgbench-N     a Postgres-only reservation on cardgate's own schema (the order
#                          row debits the balance, as in ledger_commit): one
#                          transaction per order, SELECT ... FOR UPDATE SKIP LOCKED,
#                          N clients (16 and 64)
#   baseline-pgbench-lean-N  the same on a lean schema (one unique index on orders, one
#                          partial index on codes): what a user would otherwise run
# Every gateway scenario also records CPU per request of the gateway, Redis, Postgres and
# the generator (which signs every request before its clock starts).
# latest.md ends with what each throughput goal allows a request to cost at this run's
# /healthz cost, and, when loadtests/report/before.json holds an earlier run's
# latest.json, that run's checks and CPU per request beside this one's.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=loadtests/reservation.sh
. "$(dirname "${BASH_SOURCE[0]}")/reservation.sh"
secs=${1:-10}
conns="64 256 512"  # closed-loop connection counts; each figure and baseline is taken at its best
open_conns=512  # open loop: enough that the generator never holds a due request back
flash_stock=5000
out=loadtests/report
work=$(mktemp -d)
results="$work/results.jsonl"
trap 'cleanup; rm -rf "$work"' EXIT

# Every tier's rate limits far above what is offered: the limiters are not what is
# measured, and the tier mix shows overload handling, not rate limiting.
limits=()
for t in STANDARD SILVER GOLD DIAMOND; do
  limits+=("CARDGATE_TIERS__${t}__ORDERS_PER_SECOND=10000000" "CARDGATE_TIERS__${t}__ORDERS_BURST=10000000"
           "CARDGATE_TIERS__${t}__READS_PER_SECOND=10000000" "CARDGATE_TIERS__${t}__READS_BURST=10000000")
done
start_gateway "${limits[@]}"
load=./target/release/cardgate-load
note() { echo "load: $*" >&2; }

note "setting up stock and resellers"
stock load-orders 800000
stock flash-sale $flash_stock
keys diamond 16 "$work/diamond"
for t in diamond gold silver standard; do keys "$t" 4 "$work/mix"; done

# Background work the set-up caused is done before the clock starts: an AOF rewrite
# (Redis forks and writes the whole dataset; with appendfsync everysec its fsyncs then
# block the server for up to a second) and a checkpoint of the imported codes.
redis-cli -u "$CARDGATE_REDIS_URL" BGREWRITEAOF >/dev/null 2>&1 || true
for _ in $(seq 1 600); do
  redis-cli -u "$CARDGATE_REDIS_URL" INFO persistence | grep -q '^aof_rewrite_in_progress:1' || break
  sleep 0.2
done
psql "$gw_db" -qc CHECKPOINT

redis_pid=$(redis-cli -u "$CARDGATE_REDIS_URL" INFO server | sed -n 's/^process_id:\([0-9]*\).*/\1/p')
# cpu: CPU seconds used so far by the gateway, Redis and every Postgres process (JSON).
cpu() {
  python3 - "$gw_pid" "$redis_pid" <<'PY'
import json, sys
sys.path.insert(0, "loadtests")
from procstat import postgres_secs, secs
print(json.dumps({"gateway": secs(sys.argv[1]), "redis": secs(sys.argv[2]), "postgres": postgres_secs()}))
PY
}
scenario() { # scenario NAME ARGS...: one cardgate-load run, its line kept with CPU per request by process
  note "$1"
  local before after line
  before=$(cpu)
  line=$("$load" run "$@" --addr "$addr")
  after=$(cpu)
  python3 - "$line" "$before" "$after" <<'PY' | tee -a "$results" | cut -c1-240 >&2
import json, sys
run, before, after = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
n = max(run["answered"], 1)
cpu = {k: (after[k] - before[k]) for k in before}
cpu["generator"] = run.get("generator_cpu_seconds", 0.0)
run["cpu_us_per_request"] = {k: round(v * 1e6 / n, 1) for k, v in cpu.items()}
run["cpu_cores_busy"] = {k: round(v / run["seconds"], 2) for k, v in cpu.items()}
print(json.dumps(run))
PY
}
scenario healthz --target healthz --connections 64 --seconds "$secs"
scenario signed-reads --target products --keys "$work/diamond" --connections 64 --seconds "$secs"
for c in $conns; do
  scenario "orders-steady-$c" --target orders --sku load-orders --keys "$work/diamond" --connections "$c" --seconds "$secs"
done
note "orders-search"
"$load" search orders-search --addr "$addr" --target orders --sku load-orders --keys "$work/diamond" \
  --connections $open_conns --seconds 4 | tee -a "$results" >&2
max=$(python3 -c 'import json,sys; print(max(json.loads(sys.argv[1])["max_rate"], 100))' "$(tail -1 "$results")")
sleep 1
scenario orders-half-max --target orders --sku load-orders --keys "$work/diamond" \
  --connections $open_conns --seconds "$secs" --rate "$(python3 -c "print($max / 2)")"
sleep 1
# Twice as many buyers as codes, at the rate of the latency target (half the maximum):
# the stock runs out half way.
scenario flash-sale --target orders --sku flash-sale --keys "$work/mix" \
  --connections $open_conns --seconds 60 --rate "$(python3 -c "print($max / 2)")" --max-requests $((flash_stock * 2))
sleep 1
reconciled=true
cardgate_cli reconcile >"$work/reconcile.json" || reconciled=false
delivered=$(psql "$gw_db" -Atc "SELECT count(*) FROM order_codes oc JOIN codes c ON c.id = oc.code_id
  JOIN products p ON p.id = c.product_id WHERE p.sku = 'flash-sale'")
python3 - "$flash_stock" "$delivered" "$reconciled" "$(tail -1 "$results")" >>"$results" <<'PY'
import json, sys
stock, delivered, clean, run = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "true", json.loads(sys.argv[4])
print(json.dumps({"scenario": "flash-sale-check", "stock": stock, "delivered_in_postgres": delivered,
                  "delivered_to_buyers": run["codes_delivered"], "oversell": max(0, delivered - stock),
                  "answers_201": run["outcomes"].get("201", 0), "reconciliation_clean": clean}))
PY
tail -1 "$results" >&2
scenario tier-mix --target orders --sku load-orders --keys "$work/mix" \
  --connections $open_conns --seconds "$secs" --rate "$(python3 -c "print($max * 2)")"
# Highest priority first (config/default.toml), for the report.
python3 - "$results" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
for l in lines:
    if l.get("scenario") == "tier-mix":
        l["tier_order"] = ["diamond", "gold", "silver", "standard"]
open(sys.argv[1], "w").write("".join(json.dumps(l) + "\n" for l in lines))
PY
sleep 2
curl -fs "$base/metrics" | python3 loadtests/gateway-metrics.py >>"$results"
# Last, since the mover then has a hundred more products to look after.
for i in $(seq 1 100); do product "catalogue-$i" >/dev/null; done
scenario signed-reads-catalogue --target products --keys "$work/diamond" --connections 64 --seconds "$secs"

# Baselines, after the gateway's runs: they write to the same stores behind its back.
note "baseline-redis-script"
bench="bench$$:{s0}"
rb_n=$((secs * 40000))
reservation_fixture "$bench" $((rb_n * 2))
for c in $conns; do
  rb=$(reservation_benchmark "$reservation_sha" "$bench" -c "$c" -n "$rb_n" --csv | tail -1)
  # The command (first CSV column) holds quotes of its own: count columns from the end
  # (rps, avg, min, p50, p95, p99, max).
  python3 - "$rb" "$c" >>"$results" <<'PY'
import json, sys
cols = sys.argv[1].rstrip('"').rsplit('","')
print(json.dumps({"scenario": f"baseline-redis-script-{sys.argv[2]}", "connections": int(sys.argv[2]),
                  "rate": float(cols[-7]), "p50_ms": float(cols[-4]), "p99_ms": float(cols[-2])}))
PY
  tail -1 "$results" >&2
done
redis-cli -u "$CARDGATE_REDIS_URL" --scan --pattern "bench$$:*" | xargs -r -n 1000 redis-cli -u "$CARDGATE_REDIS_URL" UNLINK >/dev/null

note "baseline-pgbench"
stock pgbench-orders $((secs * 8000))
pid_pg=$(psql "$gw_db" -Atc "SELECT id FROM products WHERE sku = 'pgbench-orders'")
range=$(psql "$gw_db" -Atc "SELECT min(id) || ' ' || max(id) FROM resellers")
cat >"$work/pgbench.sql" <<'SQL'
\set rid random(:rmin, :rmax)
\set n random(1, 1000000000)
BEGIN;
SELECT id AS code_id FROM codes WHERE product_id = :pid AND status = 'available' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED \gset
UPDATE codes SET status = 'delivered' WHERE id = :code_id;
INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
  VALUES ('pgb_' || :client_id || '_' || :n, :rid, 'pgb-' || :client_id || '-' || :n, :pid, 'pgbench-orders', 1, 9800, 9800, 'CNY', now())
  RETURNING id AS oid \gset
INSERT INTO order_codes (order_id, code_id, position) VALUES (:oid, :code_id, 1);
COMMIT;
SQL
for c in 16 64; do
  pg=$(pgbench -n -c "$c" -j 2 -T "$secs" -f "$work/pgbench.sql" -D pid="$pid_pg" -D rmin="${range% *}" -D rmax="${range#* }" "$gw_db" 2>&1 |
    sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  printf '{"scenario": "baseline-pgbench-%s", "connections": %s, "rate": %s}\n' "$c" "$c" "${pg:-0}" >>"$results"
  tail -1 "$results" >&2
done

# The design a user would otherwise run: Postgres alone on a lean schema (one unique
# index on orders, one partial index on codes), one transaction per order.
note "baseline-pgbench-lean"
lean_n=$((secs * 16000))
psql "$gw_db" -q <<SQL
CREATE TABLE lean_codes (id bigserial, product_id bigint NOT NULL, code text NOT NULL,
                         available boolean NOT NULL DEFAULT true);
CREATE INDEX lean_codes_available ON lean_codes (product_id, id) WHERE available;
CREATE TABLE lean_balances (reseller_id bigint NOT NULL, balance bigint NOT NULL);
CREATE TABLE lean_orders (reseller_id bigint NOT NULL, merchant_order_no text NOT NULL,
                          product_id bigint NOT NULL, code_id bigint NOT NULL, amount bigint NOT NULL,
                          created_at timestamptz NOT NULL DEFAULT now(),
                          UNIQUE (reseller_id, merchant_order_no));
INSERT INTO lean_codes (product_id, code) SELECT 1, 'LEAN-' || g FROM generate_series(1, $lean_n) g;
INSERT INTO lean_balances SELECT g, 1000000000000 FROM generate_series(1, 64) g;
CREATE UNIQUE INDEX ON lean_balances (reseller_id);
VACUUM ANALYZE lean_codes; VACUUM ANALYZE lean_balances;
SQL
cat >"$work/pgbench-lean.sql" <<'SQL'
\set rid random(1, 64)
\set n random(1, 1000000000)
BEGIN;
-- One statement takes the code: the codes table's one index is the partial one, which
-- the update reaches through the same predicate.
UPDATE lean_codes SET available = false
 WHERE product_id = 1 AND available
   AND id = (SELECT id FROM lean_codes WHERE product_id = 1 AND available ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id AS code_id \gset
INSERT INTO lean_orders (reseller_id, merchant_order_no, product_id, code_id, amount)
  VALUES (:rid, 'pgb-' || :client_id || '-' || :n, 1, :code_id, 9800);
UPDATE lean_balances SET balance = balance - 9800 WHERE reseller_id = :rid;
COMMIT;
SQL
for c in 16 64; do
  pg=$(pgbench -n -c "$c" -j 2 -T "$secs" -f "$work/pgbench-lean.sql" "$gw_db" 2>&1 |
    sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  printf '{"scenario": "baseline-pgbench-lean-%s", "connections": %s, "rate": %s}\n' "$c" "$c" "${pg:-0}" >>"$results"
  tail -1 "$results" >&2
done

printf '{"scenario": "meta", "date": "%s", "cores": %s, "commit": "%s", "seconds_per_scenario": %s}\n' \
  "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$secs" >>"$results"
"$load" report "$results" "$out"
echo "load: wrote $out/latest.md, $out/latest.json and $out/latency.svg" >&2
