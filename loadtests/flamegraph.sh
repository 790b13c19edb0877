#!/usr/bin/env bash
# A flame graph of the whole machine while a release gateway takes open-loop signed
# single-code orders: which process, and in the gateway which functions, the CPU goes to.
#
#   loadtests/flamegraph.sh [orders per second, default 3000] [seconds, default 5]
#
# Writes loadtests/report/flamegraph.svg (frames under 0.1% of the samples left out) and
# prints each process's share of the samples: the gateway's threads are
# `cardgate-worker`, the generator's `tokio-rt-worker`. Samples: cpu-clock at 499 Hz on every CPU.
# The gateway's stacks are unwound from DWARF (release builds keep line tables);
# Postgres and Redis are built without frame pointers, so they show their leaf
# functions under the process name. Needs perf (Debian's linux-perf) and inferno
# (cargo install inferno); both are installed when missing.
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
rate=${1:-3000}
secs=${2:-5}
out=loadtests/report
work=$(mktemp -d)
trap 'cleanup; rm -rf "$work"' EXIT

if ! perf version >/dev/null 2>&1; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null
fi
command -v inferno-flamegraph >/dev/null 2>&1 || cargo install inferno --locked --quiet

limits=()
for t in STANDARD SILVER GOLD DIAMOND; do
  limits+=("CARDGATE_TIERS__${t}__ORDERS_PER_SECOND=10000000" "CARDGATE_TIERS__${t}__ORDERS_BURST=10000000")
done
start_gateway "${limits[@]}"
stock flame $(( rate * (secs + 3) + 1000 ))
keys diamond 16 "$work/keys"
psql "$gw_db" -qc CHECKPOINT

load() { ./target/release/cardgate-load run "$1" --addr "$addr" --target orders --sku flame \
  --keys "$work/keys" --connections 256 --rate "$rate" --seconds "$2"; }
load warm 2 >/dev/null
perf record -q -F 499 -e cpu-clock --call-graph dwarf,16384 -a -o "$work/perf.data" -- sleep "$secs" &
perf_pid=$!
load flame $(( secs + 1 )) | python3 -c 'import json,sys; d=json.load(sys.stdin); print("load:", round(d["success_rate"]), "orders/s, latency ms", d["latency_ms"])' >&2
wait $perf_pid

perf report -i "$work/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null | grep '%' | head -8
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf >"$work/folded"
inferno-flamegraph --minwidth 1.2 --title "cardgate: whole machine at $rate signed orders/s ($(git rev-parse --short HEAD))" \
  <"$work/folded" >"$out/flamegraph.svg"
echo "flamegraph: wrote $out/flamegraph.svg" >&2
