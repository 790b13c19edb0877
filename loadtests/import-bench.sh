#!/usr/bin/env bash
# Code-import throughput: N codes (default 1,000,000) through POST /admin/v1/products/{sku}/codes
# of a release build, into local Postgres and Redis. Prints codes per second.
#
#   loadtests/import-bench.sh [N]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
n=${1:-1000000}
eval "$("$root/scripts/dev" services | sed 's/^/export /')"
cd "$root"
cargo build --release --bin cardgate >/dev/null

work=$(mktemp -d)
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
db="cgbench_$$"
psql "$CARDGATE_DATABASE_URL" -qc "CREATE DATABASE $db"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
CARDGATE_DATABASE_URL="${CARDGATE_DATABASE_URL%/*}/$db" CARDGATE_LISTEN="127.0.0.1:$port" \
  CARDGATE_REDIS_PREFIX="bench$$" CARDGATE_MASTER_KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n') \
  CARDGATE_JWT_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n') CARDGATE_BOOTSTRAP_ADMIN=bench:bench-password \
  CARDGATE_LOG=warn ./target/release/cardgate &
pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 100); do curl -fs "$base/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
token=$(curl -fs "$base/admin/v1/login" -H 'content-type: application/json' \
  -d '{"username":"bench","password":"bench-password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
curl -fs "$base/admin/v1/products" -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"sku":"bench","name":"bench","face_value":1,"base_price":1,"max_quantity":1}' >/dev/null
seq -f "BENCH-%012g-XXXX-YYYY" 1 "$n" >"$work/codes.txt"
start=$(date +%s.%N)
report=$(curl -fs "$base/admin/v1/products/bench/codes" -H "authorization: Bearer $token" \
  -H 'content-type: text/plain' --data-binary "@$work/codes.txt")
end=$(date +%s.%N)
python3 - "$report" "$start" "$end" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); secs = float(sys.argv[3]) - float(sys.argv[2])
print(f"imported {r['imported']} codes in {secs:.2f} s: {r['imported'] / secs:,.0f} codes/s (goal 50,000)")
PY
kill -TERM "$pid"; wait "$pid" || true
psql "$CARDGATE_DATABASE_URL" -qc "DROP DATABASE $db WITH (FORCE)"
redis-cli -u "$CARDGATE_REDIS_URL" --scan --pattern "bench$$:*" | xargs -r redis-cli -u "$CARDGATE_REDIS_URL" DEL >/dev/null
