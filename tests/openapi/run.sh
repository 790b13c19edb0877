#!/usr/bin/env bash
# Schema-based fuzzing of the live gateway (the debug build) against openapi.yaml, with
# schemathesis in a virtualenv under .local/. Run by scripts/dev test after the build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
venv="$root/.local/openapi-venv"
if ! "$venv/bin/python" -c 'import schemathesis' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/openapi/requirements.txt
fi
. scripts/live-gateway.sh
start_live_gateway
admin /admin/v1/products -H 'content-type: application/json' \
  -d '{"sku":"fuzz-1","name":"Fuzz","face_value":100,"base_price":90,"max_quantity":10}' >/dev/null
seq -f "FUZZ-%06g" 1 500 | admin /admin/v1/products/fuzz-1/codes -H 'content-type: text/plain' --data-binary @- >/dev/null
rid=$(admin /admin/v1/resellers -H 'content-type: application/json' -d '{"name":"Fuzz","tier":"diamond"}' | field reseller_id)
key=$(admin "/admin/v1/resellers/$rid/keys" -X POST)
admin "/admin/v1/resellers/$rid/balance" -H 'content-type: application/json' -d '{"amount":100000000,"reference":"fund"}' >/dev/null
CARDGATE_FUZZ_BASE_URL="$base" CARDGATE_FUZZ_TOKEN="$token" CARDGATE_FUZZ_KEY_ID="$(echo "$key" | field key_id)" \
  CARDGATE_FUZZ_SECRET="$(echo "$key" | field secret)" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/openapi/test_fuzz.py "$@"
