#!/usr/bin/env bash
# Signed single-code orders end to end (reservation, group commit to Postgres, answer)
# against two baselines measured in the same run on the same machine (DESIGN.md):
#   - redis-benchmark calling the project's own reservation script (EVALSHA), and
#   - pgbench running a Postgres-only reservation on the project's schema: one
#     transaction per order, SELECT ... FOR UPDATE SKIP LOCKED.
# Targets: orders >= 40% of the script's rate and >= 7x pgbench's.
#
#   loadtests/orders-vs-baselines.sh [connections] [seconds] [resellers]
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
conns=${1:-32}
secs=${2:-10}
resellers=${3:-8}
# Tier limits must not be what is measured.
start_gateway CARDGATE_TIERS__DIAMOND__ORDERS_PER_SECOND=10000000 CARDGATE_TIERS__DIAMOND__ORDERS_BURST=10000000

codes() { python3 -c 'import sys, secrets; n = int(sys.argv[1]); sys.stdout.write("".join(f"{sys.argv[2]}-{i}-{secrets.token_hex(8)}\n" for i in range(n)))' "$1" "$2"; }
stock() {
  admin_post /admin/v1/products "{\"sku\":\"$1\",\"name\":\"$1\",\"face_value\":10000,\"base_price\":9800,\"max_quantity\":100}" >/dev/null
  codes "$2" "$1" | curl -fs "$base/admin/v1/products/$1/codes" -H "$auth" -H 'content-type: text/plain' --data-binary @- >/dev/null
}
stock load-orders 200000
stock pgbench-orders 200000
keys=
for i in $(seq 1 "$resellers"); do
  rid=$(admin_post /admin/v1/resellers '{"name":"Load","tier":"diamond"}' | json_field reseller_id)
  admin_post "/admin/v1/resellers/$rid/balance" "{\"amount\":100000000000,\"reference\":\"load-$i\"}" >/dev/null
  key=$(curl -fs -X POST "$base/admin/v1/resellers/$rid/keys" -H "$auth")
  keys="$keys${keys:+,}$(printf '%s' "$key" | json_field key_id):$(printf '%s' "$key" | json_field secret)"
done

# 1. The gateway, end to end.
gateway=$(./target/release/cardgate-load "$addr" signed-orders "$conns" "$secs" "$keys" load-orders)
echo "gateway: $gateway"
# Checked now, before the baselines write to the same stores behind the gateway's back.
report=$(curl -fs "$base/admin/v1/reconcile" -H "$auth")
curl -fs "$base/metrics" | python3 loadtests/gateway-metrics.py

# 2. redis-benchmark on the same script, with its own keys and stock.
rb_n=$((secs * 40000))
bench="bench$$:{s0}"
sha=$(redis-cli -u "$CARDGATE_REDIS_URL" SCRIPT LOAD "$(cat src/reserve/reserve.lua)")
redis-cli -u "$CARDGATE_REDIS_URL" EVAL "for i = 1, tonumber(ARGV[1]) do redis.call('RPUSH', KEYS[1], string.rep('e', 60)) end" 1 "$bench:stock" "$rb_n" >/dev/null
redis-cli -u "$CARDGATE_REDIS_URL" SET "$bench:bal" 1000000000000000 >/dev/null
fields='{"order_id":"ord_bench","reseller":1,"merchant_order_no":"M","product":1,"sku":"s","quantity":1,"unit_price":9800,"amount":9800,"created_at":0}'
redis_url=${CARDGATE_REDIS_URL#redis://}; redis_url=${redis_url%%/*}
rb=$(redis-benchmark -h "${redis_url%:*}" -p "${redis_url#*:}" -c "$conns" -n "$rb_n" -r 1000000000 --csv \
  EVALSHA "$sha" 4 "$bench:idem:1:__rand_int__" "$bench:stock" "$bench:bal" "$bench:outbox" \
  ord___rand_int__ s1 1 9800 "" 600 "$fields" | tail -1)
echo "redis-benchmark: ${rb##*\}\",}"
redis-cli -u "$CARDGATE_REDIS_URL" --scan --pattern "bench$$:*" | xargs -r -n 1000 redis-cli -u "$CARDGATE_REDIS_URL" UNLINK >/dev/null

# 3. pgbench: the Postgres-only reservation on the same schema and database.
dburl="${CARDGATE_DATABASE_URL%/*}/$db"
pid_pg=$(psql "$dburl" -Atc "SELECT id FROM products WHERE sku = 'pgbench-orders'")
range=$(psql "$dburl" -Atc "SELECT min(id) || ' ' || max(id) FROM resellers")
script=$(mktemp)
cat >"$script" <<'SQL'
\set rid random(:rmin, :rmax)
\set n random(1, 1000000000)
BEGIN;
SELECT id AS code_id FROM codes WHERE product_id = :pid AND status = 'available' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED \gset
UPDATE codes SET status = 'delivered' WHERE id = :code_id;
INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
  VALUES ('pgb_' || :client_id || '_' || :n, :rid, 'pgb-' || :client_id || '-' || :n, :pid, 'pgbench-orders', 1, 9800, 9800, 'CNY', now())
  RETURNING id AS oid \gset
INSERT INTO order_codes (order_id, code_id, position) VALUES (:oid, :code_id, 1);
INSERT INTO balance_ledger (reseller_id, amount, kind, reference) VALUES (:rid, -9800, 'order', 'pgb_' || :client_id || '_' || :n);
COMMIT;
SQL
pg=$(pgbench -n -c "$conns" -j 2 -T "$secs" -f "$script" -D pid="$pid_pg" -D rmin="${range% *}" -D rmax="${range#* }" "$dburl" 2>&1 \
  | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
rm -f "$script"
echo "pgbench: $pg tps"

python3 - "$gateway" "$rb" "$pg" "$report" <<'PY'
import json, sys
g = json.loads(sys.argv[1])
# The command (first column) holds quotes of its own: count columns from the end
# (rps, avg, min, p50, p95, p99, max).
rb, pg = float(sys.argv[2].rstrip('"').rsplit('","')[-7]), float(sys.argv[3])
rep = json.loads(sys.argv[4])
rate = g["rate_per_s"]
print(f"orders {rate:,.0f}/s (p50 {g['p50_ms']} ms, p99 {g['p99_ms']} ms, errors {g['errors']})")
print(f"redis-benchmark on the script {rb:,.0f}/s   pgbench Postgres-only {pg:,.0f}/s")
print(f"orders / script = {rate / rb:.2f} (target >= 0.40)   orders / pgbench = {rate / pg:.1f}x (target >= 7)")
print(f"reconciliation after the gateway run: {'clean' if rep['ok'] else rep['problems']}")
PY
