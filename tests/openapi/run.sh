#!/usr/bin/env bash
# Schema-based fuzzing of the live gateway (the debug build) against openapi.yaml, with
# schemathesis in a virtualenv under .local/. Run by scripts/dev test after the build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
eval "$(scripts/dev services | sed 's/^/export /')"
venv="$root/.local/openapi-venv"
if ! "$venv/bin/python" -c 'import schemathesis' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/openapi/requirements.txt
fi
work=$(mktemp -d)
db="cgfuzz_$$"
psql "$CARDGATE_DATABASE_URL" -qc "CREATE DATABASE $db"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
CARDGATE_DATABASE_URL="${CARDGATE_DATABASE_URL%/*}/$db" CARDGATE_LISTEN="127.0.0.1:$port" \
  CARDGATE_REDIS_PREFIX="fuzz$$" CARDGATE_MASTER_KEY="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" \
  CARDGATE_JWT_SECRET="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" CARDGATE_BOOTSTRAP_ADMIN=fuzz:fuzz-password \
  CARDGATE_LOG=warn ./target/debug/cardgate 2>"$work/gateway.log" &
gw=$!
trap 'kill $gw 2>/dev/null; wait $gw 2>/dev/null; psql "$CARDGATE_DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; rm -rf "$work"' EXIT
for _ in $(seq 1 150); do curl -fs "$base/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
token=$(curl -fs "$base/admin/v1/login" -H 'content-type: application/json' \
  -d '{"username":"fuzz","password":"fuzz-password"}' | field token)
admin() { curl -fs "$base$1" -H "authorization: Bearer $token" "${@:2}"; }
admin /admin/v1/products -H 'content-type: application/json' \
  -d '{"sku":"fuzz-1","name":"Fuzz","face_value":100,"base_price":90,"max_quantity":10}' >/dev/null
seq -f "FUZZ-%06g" 1 500 | admin /admin/v1/products/fuzz-1/codes -H 'content-type: text/plain' --data-binary @- >/dev/null
rid=$(admin /admin/v1/resellers -H 'content-type: application/json' -d '{"name":"Fuzz","tier":"diamond"}' | field reseller_id)
key=$(admin "/admin/v1/resellers/$rid/keys" -X POST)
admin "/admin/v1/resellers/$rid/balance" -H 'content-type: application/json' -d '{"amount":100000000,"reference":"fund"}' >/dev/null
CARDGATE_FUZZ_BASE_URL="$base" CARDGATE_FUZZ_TOKEN="$token" CARDGATE_FUZZ_KEY_ID="$(echo "$key" | field key_id)" \
  CARDGATE_FUZZ_SECRET="$(echo "$key" | field secret)" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/openapi/test_fuzz.py "$@"
