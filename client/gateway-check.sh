#!/usr/bin/env bash
# cardgate-client against a real gateway (the debug build, on local Redis and Postgres):
# 200 orders plus one refused, the client killed half way, then resumed and re-run. Every
# order must end in the output exactly once, codes all distinct, the balance charged for
# exactly 200 codes, and reconciliation clean. Run by scripts/dev test after the build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=scripts/lib/gateway.sh
. scripts/lib/gateway.sh
gw_services
work=$(mktemp -d)
trap 'gw_stop; rm -rf "$work"' EXIT
gw_tag=clientcheck
gw_log="$work/gateway.log"
gw_start ./target/debug/cardgate
gw_create_product '{"sku":"client-1","name":"Client check","face_value":100,"base_price":90,"max_quantity":10}'
seq -f "CHECK-%06g" 1 250 | gw_import_codes client-1 >/dev/null
gw_reseller silver 1000000 Script
export CARDGATE_SECRET=$gw_secret
{ echo merchant_order_no,sku,quantity; seq -f 'm-%g,client-1,1' 1 200; echo 'too-many,client-1,100'; } >"$work/orders.csv"
client=(./target/debug/cardgate-client orders --input "$work/orders.csv" --output "$work/codes.jsonl"
  --base-url "$gw_base" --key-id "$gw_key_id" --quiet)

"${client[@]}" --rate 40 --batch-size 10 &
pid=$!
sleep 2
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
echo "client killed with $(wc -l <"$work/codes.jsonl") orders recorded" >&2
"${client[@]}" --rate 200
"${client[@]}" --rate 200   # nothing left: sends nothing, changes nothing
balance=$(gw_admin "/admin/v1/resellers/$gw_reseller_id" | gw_json balance)
reconciled=$(gw_admin /admin/v1/reconcile | gw_json ok)
python3 - "$work/codes.jsonl" "$balance" "$reconciled" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
nos = [l["merchant_order_no"] for l in lines]
codes = [c for l in lines for c in l.get("codes") or []]
failed = {l["merchant_order_no"]: l["error"]["code"] for l in lines if l["status"] != "fulfilled"}
checks = {
    "every order once": sorted(nos) == sorted([f"m-{i}" for i in range(1, 201)] + ["too-many"]),
    "200 distinct codes": len(codes) == 200 == len(set(codes)),
    "the refusal recorded": failed == {"too-many": "quantity_out_of_range"},
    "charged for 200 codes": int(sys.argv[2]) == 1_000_000 - 200 * 90,
    "reconciliation clean": sys.argv[3] == "True",
}
for name, ok in checks.items():
    print(f"client check: {name}: {'ok' if ok else 'FAILED'}")
sys.exit(0 if all(checks.values()) else 1)
PY
