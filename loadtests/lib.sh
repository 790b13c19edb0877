# Shared set-up for the load scripts: a release gateway on a free loopback port with a
# database and Redis prefix of its own, torn down on exit. Source it, then call start_gateway.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
eval "$("$root/scripts/dev" services | sed 's/^/export /')"
cd "$root"
cargo build --release --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins

json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# No "_" or "%": the name is its own LIKE pattern for scripts/dev forget.
db="cgload$$"
pid=
cleanup() {
  [ -n "$pid" ] && { kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
  "$root/scripts/dev" forget "$db" "load$$:*" || true
}
trap cleanup EXIT

# start_gateway [VAR=value ...]: extra settings for the gateway's environment.
start_gateway() {
  psql "$CARDGATE_DATABASE_URL" -qc "CREATE DATABASE $db"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  addr="127.0.0.1:$port"
  base="http://$addr"
  gw_db="${CARDGATE_DATABASE_URL%/*}/$db"
  gw_env=(CARDGATE_DATABASE_URL="$gw_db" CARDGATE_LISTEN="$addr"
    CARDGATE_REDIS_PREFIX="load$$" CARDGATE_MASTER_KEY="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
    CARDGATE_JWT_SECRET="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" CARDGATE_BOOTSTRAP_ADMIN=load:load-password
    CARDGATE_LOG=warn "$@")
  env "${gw_env[@]}" ./target/release/cardgate &
  pid=$!
  for _ in $(seq 1 100); do curl -fs "$base/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  token=$(curl -fs "$base/admin/v1/login" -H 'content-type: application/json' \
    -d '{"username":"load","password":"load-password"}' | json_field token)
  auth="authorization: Bearer $token"
}

# cardgate_cli ARGS...: the cardgate command (reconcile, rebuild) on the gateway's stores.
cardgate_cli() { env "${gw_env[@]}" ./target/release/cardgate "$@"; }

admin_post() { curl -fs "$base$1" -H "$auth" -H 'content-type: application/json' -d "$2"; }

# product SKU: creates a product with that SKU.
product() {
  admin_post /admin/v1/products "{\"sku\":\"$1\",\"name\":\"$1\",\"face_value\":10000,\"base_price\":9800,\"max_quantity\":10}" >/dev/null
}

# code_file N PREFIX: writes N distinct codes to a new file, named in $codes.
code_file() {
  codes=$(mktemp)
  seq -f "$2-%012g-XXXX-YYYY" 1 "$1" >"$codes"
}

# import_codes SKU: imports $codes into SKU, removes the file and prints the report.
import_codes() {
  curl -fs "$base/admin/v1/products/$1/codes" -H "$auth" -H 'content-type: text/plain' --data-binary "@$codes"
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
    rid=$(admin_post /admin/v1/resellers "{\"name\":\"Load\",\"tier\":\"$1\"}" | json_field reseller_id)
    admin_post "/admin/v1/resellers/$rid/balance" "{\"amount\":1000000000000,\"reference\":\"load-$rid\"}" >/dev/null
    k=$(curl -fs -X POST "$base/admin/v1/resellers/$rid/keys" -H "$auth")
    printf '%s %s %s\n' "$(printf '%s' "$k" | json_field key_id)" "$(printf '%s' "$k" | json_field secret)" "$1" >>"$3"
  done
}
