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
# shellcheck source=scripts/lib/gateway.sh
. scripts/lib/gateway.sh
gw_services
work=$(mktemp -d)
trap 'gw_stop; rm -rf "$work"' EXIT
gw_tag=fuzz
gw_log="$work/gateway.log"
gw_start ./target/debug/cardgate
gw_create_product '{"sku":"fuzz-1","name":"Fuzz","face_value":100,"base_price":90,"max_quantity":10}'
seq -f "FUZZ-%06g" 1 500 | gw_import_codes fuzz-1 >/dev/null
gw_reseller diamond 100000000 Fuzz
CARDGATE_FUZZ_BASE_URL="$gw_base" CARDGATE_FUZZ_TOKEN="$gw_token" CARDGATE_FUZZ_KEY_ID="$gw_key_id" \
  CARDGATE_FUZZ_SECRET="$gw_secret" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/openapi/test_fuzz.py "$@"
