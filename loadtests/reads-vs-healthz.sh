#!/usr/bin/env bash
# Signed GET /v1/products against unauthenticated GET /healthz, same server, same run.
# Target (DESIGN.md): signed reads at least 60% of /healthz's rate.
#
#   loadtests/reads-vs-healthz.sh [connections] [seconds]
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
conns=${1:-32}
secs=${2:-10}
# The load reseller's tier must not be the limit being measured.
start_gateway CARDGATE_TIERS__DIAMOND__READS_PER_SECOND=10000000 CARDGATE_TIERS__DIAMOND__READS_BURST=10000000
admin_post /admin/v1/products '{"sku":"load-100","name":"Load","face_value":10000,"base_price":9800,"max_quantity":100}' >/dev/null
printf 'L1\nL2\nL3\n' | curl -fs "$base/admin/v1/products/load-100/codes" -H "$auth" -H 'content-type: text/plain' --data-binary @- >/dev/null
reseller=$(admin_post /admin/v1/resellers '{"name":"Load","tier":"diamond"}' | json_field reseller_id)
key=$(curl -fs -X POST "$base/admin/v1/resellers/$reseller/keys" -H "$auth")
key_id=$(printf '%s' "$key" | json_field key_id)
secret=$(printf '%s' "$key" | json_field secret)

load=./target/release/cardgate-load
healthz=$($load "$addr" healthz "$conns" "$secs")
signed=$($load "$addr" signed-products "$conns" "$secs" "$key_id" "$secret")
echo "$healthz"
echo "$signed"
python3 - "$healthz" "$signed" <<'PY'
import json, sys
h, s = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ratio = s["rate_per_s"] / h["rate_per_s"]
print(f"healthz {h['rate_per_s']:,.0f}/s  signed reads {s['rate_per_s']:,.0f}/s  ratio {ratio:.2f} (target >= 0.60)  errors {h['errors']}/{s['errors']}")
PY
