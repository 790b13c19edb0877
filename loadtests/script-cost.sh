#!/usr/bin/env bash
# What one reservation costs Redis, apart from everything else: redis-benchmark calls the
# reservation script (with the bucket's code in front, as the gateway loads it) and, in
# the same run, a script that only answers, with the same 12 keys and 24 arguments. Each
# is pipelined (4 connections, 16 deep), so the figure is Redis's CPU per call, read from
# /proc, not a latency. The difference is what the script's own work costs. Then the
# reads' admission (admit.lua) as a coalesced pipeline sends it: one call spending eight
# nonces and taking a token from each of eight buckets, its figure given per read.
#
#   loadtests/script-cost.sh [CALLS]   (default 200000 each, twice, alternating)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/gateway.sh
. "$root/scripts/lib/gateway.sh"
# shellcheck source=loadtests/reservation.sh
. "$root/loadtests/reservation.sh"
gw_services
cd "$root"
n=${1:-200000}
url=$CARDGATE_REDIS_URL
bench="cost$$:{s0}"
trap 'redis-cli -u "$url" --scan --pattern "cost$$:*" | xargs -r -n 1000 redis-cli -u "$url" UNLINK >/dev/null' EXIT
reservation_fixture "$bench" $((n * 3))
answer=$(redis-cli -u "$url" SCRIPT LOAD "return {'ok', '', ''}")
pid=$(redis-cli -u "$url" INFO server | sed -n 's/^process_id:\([0-9]*\).*/\1/p')
cpu() { python3 loadtests/procstat.py "$pid"; }
# An append-only-file rewrite in the middle would be counted against one of the scripts.
rewrite=$(redis-cli -u "$url" CONFIG GET auto-aof-rewrite-percentage | tail -1)
redis-cli -u "$url" CONFIG SET auto-aof-rewrite-percentage 0 >/dev/null
admit_sha=$(redis-cli -u "$url" SCRIPT LOAD "$(cat src/ratelimit/gcra.lua src/ratelimit/admit.lua)")
admit=() admit_args=(600 8)
for i in 1 2 3 4 5 6 7 8; do admit+=("$bench:nonce:__rand_int__:$i"); done
for i in 1 2 3 4 5 6 7 8; do admit+=("$bench:rate:r:$i"); admit_args+=("$i" 1 1 1000000000); done
per() { # per LABEL BEFORE AFTER COUNT UNIT
  python3 -c "import sys; print(f'{sys.argv[1]}: {(float(sys.argv[3]) - float(sys.argv[2])) * 1e6 / int(sys.argv[4]):.1f} µs of Redis CPU per {sys.argv[5]}')" "$@"
}
for which in answer reserve admit answer reserve admit; do
  before=$(cpu)
  case $which in
    answer) reservation_benchmark "$answer" "$bench" -c 4 -P 16 -n "$n" -q >/dev/null 2>&1 ;;
    reserve) reservation_benchmark "$reservation_sha" "$bench" -c 4 -P 16 -n "$n" -q >/dev/null 2>&1 ;;
    admit) local_benchmark -c 4 -P 16 -n $((n / 8)) -q \
             EVALSHA "$admit_sha" 16 "${admit[@]}" "${admit_args[@]}" >/dev/null 2>&1 ;;
  esac
  after=$(cpu)
  if [ "$which" = admit ]; then
    per "admit, 8 reads a call" "$before" "$after" "$n" read
  else
    per "$which" "$before" "$after" "$n" call
  fi
done
redis-cli -u "$url" CONFIG SET auto-aof-rewrite-percentage "$rewrite" >/dev/null
