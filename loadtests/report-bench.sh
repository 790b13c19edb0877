#!/usr/bin/env bash
# Operator reports on generated data: N fulfilled orders (default 10,000,000) from 1,000
# resellers over 200 SKUs and 180 days, written straight into Postgres (the triggers keep
# the daily rollups as for the ledger's commits). Times both reports over 30 and 180
# days, and, as the baseline in the same run, the same per-reseller sums computed from
# the orders table alone.
#
#   loadtests/report-bench.sh [N]
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
n=${1:-10000000}
start_gateway
sql() { psql "$gw_db" -qAtX -v ON_ERROR_STOP=1 "$@"; }

echo "generating $n orders..." >&2
gen_start=$(date +%s)
sql <<'SQL'
INSERT INTO resellers (reseller_id, name, tier, base_tier, webhook_secret_enc)
SELECT 'rs_gen' || i, 'Reseller ' || i, t, t, '\x00'
  FROM generate_series(1, 1000) i, LATERAL (SELECT (ARRAY['standard','silver','gold','diamond'])[1 + i % 4] AS t) x;
INSERT INTO balances (reseller_id) SELECT id FROM resellers;
INSERT INTO products (sku, name, face_value, base_price, max_quantity)
SELECT 'gen-' || i, 'Product ' || i, 10000, 9800, 100 FROM generate_series(1, 200) i;
SQL
chunk=500000
for ((done = 0; done < n; done += chunk)); do
  size=$(( n - done < chunk ? n - done : chunk ))
  # Orders arrive in time order over the 180 days, as they are committed; resellers and
  # SKUs are spread over them.
  sql -v off="$done" -v size="$size" -v n="$n" <<'SQL'
INSERT INTO orders (order_id, reseller_id, merchant_order_no, product_id, sku, quantity, unit_price, amount, currency, created_at)
SELECT 'ord_gen' || g, r.id, 'm' || g, p.id, p.sku, q, 9800, 9800 * q, 'CNY',
       now() - interval '180 days' + (g::float8 / :n) * interval '180 days'
  FROM generate_series(:off::bigint + 1, :off::bigint + :size) g
  CROSS JOIN LATERAL (SELECT 1 + (g * 7919) % 1000 AS r, 1 + (g * 104729) % 200 AS p, 1 + g % 3 AS q) k
  JOIN resellers r ON r.reseller_id = 'rs_gen' || k.r
  JOIN products p ON p.sku = 'gen-' || k.p;
SQL
  # As the gateways' folds would have, as the orders came.
  sql -c "SELECT sales_fold()" >/dev/null
  echo "  $(( done + size ))" >&2
done
sql -c "VACUUM ANALYZE orders" -c "VACUUM ANALYZE reseller_daily" -c "VACUUM ANALYZE product_daily"
gen_secs=$(( $(date +%s) - gen_start ))

# ms for one report over the last N days, best of three.
timed() {
  local best=""
  for _ in 1 2 3; do
    local ms
    ms=$(curl -fso /dev/null -w '%{time_total}' -H "$auth" \
      "$base/admin/v1/reports/$1?from=$(date -u -d "-$2 days" +%Y-%m-%dT%H:%M:%SZ)" | awk '{printf "%d", $1 * 1000}')
    [[ -z $best || $ms -lt $best ]] && best=$ms
  done
  echo "$best"
}
# The same per-reseller sums from orders alone (no rollup), best of three.
baseline() {
  local best=""
  for _ in 1 2 3; do
    local s e
    s=$(date +%s%N)
    sql -c "SELECT reseller_id, count(*), sum(quantity), sum(amount), count(DISTINCT (created_at AT TIME ZONE 'UTC')::date)
              FROM orders WHERE status = 'fulfilled' AND created_at >= now() - interval '$1 days' GROUP BY reseller_id" >/dev/null
    e=$(date +%s%N)
    local ms=$(( (e - s) / 1000000 ))
    [[ -z $best || $ms -lt $best ]] && best=$ms
  done
  echo "$best"
}
r30=$(timed resellers 30); r180=$(timed resellers 180); p30=$(timed products 30); p180=$(timed products 180)
b30=$(baseline 30); b180=$(baseline 180)
rows=$(sql -c "SELECT (SELECT count(*) FROM reseller_daily) || ' + ' || (SELECT count(*) FROM product_daily)")
cat <<OUT
orders: $n generated in ${gen_secs} s; rollup rows: $rows
report (best of 3, ms)     30 days   180 days
resellers                  $r30       $r180
products                   $p30       $p180
orders-only baseline       $b30       $b180
OUT
python3 - "$r30" "$r180" "$b30" "$b180" <<'PY'
import sys
r30, r180, b30, b180 = map(int, sys.argv[1:])
print(f"resellers report vs orders-only sums: {b30 / max(r30, 1):.0f}x faster over 30 days, {b180 / max(r180, 1):.0f}x over 180 days")
PY
