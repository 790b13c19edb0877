#!/usr/bin/env bash
# Redis rebuild time: N codes (default 1,000,000) imported, then every key of the gateway
# in Redis deleted (Redis "restarted empty"); the gateway notices, rebuilds stock, hot
# balances and idempotency records from Postgres, and reports how long it took.
#
#   loadtests/rebuild-bench.sh [N]
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
n=${1:-1000000}
start_gateway
product bench
code_file "$n" REBUILD
import_codes bench >/dev/null
redis-cli -u "$CARDGATE_REDIS_URL" --scan --pattern "$gw_prefix:*" | xargs -r -n 1000 redis-cli -u "$CARDGATE_REDIS_URL" DEL >/dev/null
start=$(date +%s.%N)
until curl -fs "$base/readyz" >/dev/null 2>&1; do sleep 0.05; done
end=$(date +%s.%N)
stock=$(redis-cli -u "$CARDGATE_REDIS_URL" --scan --pattern "$gw_prefix:*stock:*" | xargs redis-cli -u "$CARDGATE_REDIS_URL" LLEN)
took=$(curl -fs "$base/metrics" | awk '/^cardgate_redis_rebuild_seconds_sum/ {print $2}')
python3 - "$n" "$stock" "$took" "$start" "$end" <<'PY'
import sys
n, stock, took, start, end = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
print(f"rebuilt {stock:,} of {n:,} codes: rebuild {took:.2f} s (all rebuilds of this gateway), "
      f"Redis loss to ready {end - start:.2f} s")
PY
