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
for which in answer reserve answer reserve; do
  sha=$answer
  [ "$which" = reserve ] && sha=$reservation_sha
  before=$(cpu)
  reservation_benchmark "$sha" "$bench" -c 4 -P 16 -n "$n" -q >/dev/null 2>&1
  after=$(cpu)
  python3 -c "import sys; print(f'{sys.argv[1]}: {(float(sys.argv[3]) - float(sys.argv[2])) * 1e6 / int(sys.argv[4]):.1f} µs of Redis CPU per call')" \
    "$which" "$before" "$after" "$n"
done
redis-cli -u "$url" CONFIG SET auto-aof-rewrite-percentage "$rewrite" >/dev/null
