#!/usr/bin/env bash
# What one reservation costs Redis, apart from everything else: redis-benchmark calls the
# reservation script (with the bucket's code in front, as the gateway loads it) and, in
# the same run, a script that only answers, with the same 11 keys and 22 arguments. Each
# is pipelined (4 connections, 16 deep), so the figure is Redis's CPU per call, read from
# /proc, not a latency. The difference is what the script's own work costs.
#
#   loadtests/script-cost.sh [CALLS]   (default 200000 each, twice, alternating)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/gateway.sh
. "$root/scripts/lib/gateway.sh"
gw_services
cd "$root"
n=${1:-200000}
url=$CARDGATE_REDIS_URL
hostport=${url#redis://}; hostport=${hostport%%/*}
bench="cost$$:{s0}"
trap 'redis-cli -u "$url" --scan --pattern "cost$$:*" | xargs -r -n 1000 redis-cli -u "$url" UNLINK >/dev/null' EXIT
reserve=$(redis-cli -u "$url" SCRIPT LOAD "$(cat src/ratelimit/gcra.lua src/reserve/reserve.lua)")
answer=$(redis-cli -u "$url" SCRIPT LOAD "return {'ok', '', ''}")
redis-cli -u "$url" EVAL "for i = 1, tonumber(ARGV[1]) do redis.call('RPUSH', KEYS[1], string.rep('e', 60)) end" \
  1 "$bench:stock" $((n * 3)) >/dev/null
redis-cli -u "$url" MSET "$bench:bal" 1000000000000000 "$bench:epoch" 1 >/dev/null
# The rules on by default, as in run.sh's baseline: an address, the velocity rule, a write
# token from a bucket too large to refuse; no spend limit, local stock only.
fields='{"order_id":"ord_bench","reseller":1,"merchant_order_no":"M","product":1,"sku":"s","quantity":1,"unit_price":9800,"amount":9800,"created_at":0,"key_id":"ak_bench"}'
pid=$(redis-cli -u "$url" INFO server | sed -n 's/^process_id:\([0-9]*\).*/\1/p')
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
# An append-only-file rewrite in the middle would be counted against one of the scripts.
rewrite=$(redis-cli -u "$url" CONFIG GET auto-aof-rewrite-percentage | tail -1)
redis-cli -u "$url" CONFIG SET auto-aof-rewrite-percentage 0 >/dev/null
for which in answer reserve answer reserve; do
  before=$(cpu)
  redis-benchmark -h "${hostport%:*}" -p "${hostport#*:}" -c 4 -P 16 -n "$n" -r 1000000000 -q \
    EVALSHA "${!which}" 11 "$bench:idem:1:__rand_int__" "$bench:stock" "$bench:bal" "$bench:outbox" "$bench:epoch" \
    "$bench:risk:1" "$bench:kspend:ak_bench" "$bench:addrs:1" "$bench:rate:w:1" "$bench:sold" "$bench:nonce:__rand_int__" \
    ord___rand_int__ s1 1 9800 "" 600 "$fields" 600 0 "$(date -u +%F)" "" "" "$(date +%s)" 127.0.0.1 \
    "$(($(date +%s) / 60))" 10 60 "" 1 1 1000000000 cells >/dev/null 2>&1
  after=$(cpu)
  python3 -c "import sys; print(f'{sys.argv[1]}: {(int(sys.argv[3]) - int(sys.argv[2])) * 1e6 / int(sys.argv[4]) / int(sys.argv[5]):.1f} µs of Redis CPU per call')" \
    "$which" "$before" "$after" "$hz" "$n"
done
redis-cli -u "$url" CONFIG SET auto-aof-rewrite-percentage "$rewrite" >/dev/null
