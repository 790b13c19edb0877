# Shared set-up for the load scripts: a release gateway on a free loopback port with a
# database and Redis prefix of its own (scripts/lib/gateway.sh), torn down on exit.
# Source it, then call start_gateway; a script with a trap of its own calls cleanup in it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/gateway.sh
. "$root/scripts/lib/gateway.sh"
gw_services
cd "$root"
cargo build --release --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins

gw_tag=load
cleanup() { gw_stop; }
trap cleanup EXIT

# start_gateway [VAR=value ...]: extra settings for the gateway's environment. Then
# $addr, $base, $gw_db (its database URL) and $gw_prefix (its Redis prefix).
start_gateway() {
  gw_start ./target/release/cardgate "$@"
  addr=$gw_addr
  base=$gw_base
  auth="authorization: Bearer $gw_token"
}

# cardgate_cli ARGS...: the cardgate command (reconcile, rebuild) on the gateway's stores.
cardgate_cli() { env "${gw_env[@]}" ./target/release/cardgate "$@"; }

# product SKU: creates a product with that SKU.
product() {
  gw_create_product "{\"sku\":\"$1\",\"name\":\"$1\",\"face_value\":10000,\"base_price\":9800,\"max_quantity\":10}"
}

# code_file N PREFIX: writes N distinct codes to a new file, named in $codes.
code_file() {
  codes=$(mktemp)
  seq -f "$2-%012g-XXXX-YYYY" 1 "$1" >"$codes"
}

# import_codes SKU: imports $codes into SKU, removes the file and prints the report.
import_codes() {
  gw_import_codes "$1" "$codes"
  rm -f "$codes"
}

# stock SKU COUNT: a product with COUNT codes.
stock() {
  product "$1"
  code_file "$2" "$1-$$"
  import_codes "$1" >/dev/null
}

# keys TIER COUNT FILE: COUNT funded resellers of TIER, one key each, appended to FILE
# as `key_id secret tier` lines (cardgate-load's --keys).
keys() {
  for _ in $(seq 1 "$2"); do
    gw_reseller "$1" 1000000000000 Load
    printf '%s %s %s\n' "$gw_key_id" "$gw_secret" "$1" >>"$3"
  done
}
