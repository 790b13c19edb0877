# shellcheck shell=bash
# Scratch gateways and catalogues through the admin API, for every script that needs a
# live gateway: scripts/dev (the demo catalogue), client/gateway-check.sh,
# tests/openapi/run.sh and the load scripts (loadtests/lib.sh).
#
# Source it (bash); it defines functions and gw_root, and starts nothing by itself.
#
#   gw_services                  the local Redis and Postgres (scripts/dev services), URLs exported
#   gw_start BIN [VAR=value...]  a scratch gateway: BIN on a free loopback port, with a fresh
#                                database, Redis prefix and secrets of its own; waits for
#                                /healthz and logs in. Sets gw_addr, gw_base, gw_db (its
#                                database URL), gw_prefix, gw_user, gw_password, gw_token,
#                                gw_pid and gw_env (its environment, to run `cardgate
#                                reconcile` and the like on the same stores). Extra
#                                VAR=value settings go into its environment; its log goes
#                                to the file named in gw_log when set. Name the scratch
#                                stores with gw_tag (letters only) before calling.
#   gw_stop                      stops it, then drops its database and Redis keys
#                                (scripts/dev forget); safe to call twice. Trap it on EXIT.
#   gw_wait_healthy              waits for $gw_base/healthz
#   gw_login USER PASSWORD       sets gw_token
#   gw_admin PATH [CURL ARGS...] an admin API call with the token; fails on a 4xx or 5xx
#   gw_create_product JSON       POST /admin/v1/products
#   gw_import_codes SKU [FILE]   imports the codes in FILE, or on stdin (one a line), and
#                                prints the import report
#   gw_reseller TIER BALANCE [NAME]
#                                a reseller with BALANCE (minor units) and one API key: sets
#                                gw_reseller_id, gw_key_id and gw_secret
#   gw_json FIELD                a field of the JSON on stdin
#
# gw_base, gw_user and gw_password may be set by hand to work on a gateway started
# elsewhere (scripts/dev run seeds its own this way).

gw_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
gw_tag=${gw_tag:-scratch}
gw_pid=
gw_db_name=
# How long a gateway may take from start to answering /healthz (a cold debug build
# migrating a fresh database is the slow case).
GW_HEALTHY_WITHIN_SECS=30

gw_json() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

gw_services() { eval "$("$gw_root/scripts/dev" services | sed 's/^/export /')"; }

gw_random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

gw_free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

gw_start() {
  local bin=$1 port
  shift
  # No "_" or "%": the name is its own LIKE pattern for scripts/dev forget, and it can
  # never match the test suite's `cgt\_%`.
  gw_db_name="cg$gw_tag$$"
  gw_prefix="$gw_tag$$"
  psql "$CARDGATE_DATABASE_URL" -qc "CREATE DATABASE $gw_db_name"
  port=$(gw_free_port)
  gw_addr="127.0.0.1:$port"
  gw_base="http://$gw_addr"
  gw_db="${CARDGATE_DATABASE_URL%/*}/$gw_db_name"
  gw_user=$gw_tag
  gw_password=$(gw_random_hex 12)
  gw_env=(CARDGATE_DATABASE_URL="$gw_db" CARDGATE_LISTEN="$gw_addr" CARDGATE_REDIS_PREFIX="$gw_prefix"
    CARDGATE_MASTER_KEY="$(gw_random_hex 32)" CARDGATE_JWT_SECRET="$(gw_random_hex 32)"
    CARDGATE_BOOTSTRAP_ADMIN="$gw_user:$gw_password" CARDGATE_LOG=warn "$@")
  if [ -n "${gw_log:-}" ]; then
    env "${gw_env[@]}" "$bin" 2>"$gw_log" &
  else
    env "${gw_env[@]}" "$bin" &
  fi
  gw_pid=$!
  gw_wait_healthy || return 1
  gw_login "$gw_user" "$gw_password"
}

gw_stop() {
  if [ -n "$gw_pid" ]; then
    kill -TERM "$gw_pid" 2>/dev/null || true
    wait "$gw_pid" 2>/dev/null || true
    gw_pid=
  fi
  if [ -n "$gw_db_name" ]; then
    "$gw_root/scripts/dev" forget "$gw_db_name" "$gw_prefix:*" || true
    gw_db_name=
  fi
}

gw_wait_healthy() {
  local deadline=$((SECONDS + GW_HEALTHY_WITHIN_SECS))
  until curl -fs "$gw_base/healthz" >/dev/null 2>&1; do
    if [ -n "$gw_pid" ] && ! kill -0 "$gw_pid" 2>/dev/null; then
      echo "gateway: exited before answering /healthz${gw_log:+ (log: $gw_log)}" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "gateway: $gw_base/healthz not answering after ${GW_HEALTHY_WITHIN_SECS} s" >&2
      return 1
    fi
    sleep 0.1
  done
}

gw_login() {
  local body
  body=$(python3 -c 'import json,sys; print(json.dumps({"username": sys.argv[1], "password": sys.argv[2]}))' "$1" "$2")
  gw_token=$(curl -fs "$gw_base/admin/v1/login" -H 'content-type: application/json' -d "$body" | gw_json token)
}

gw_admin() { curl -fs "$gw_base$1" -H "authorization: Bearer $gw_token" "${@:2}"; }

gw_create_product() { gw_admin /admin/v1/products -H 'content-type: application/json' -d "$1" >/dev/null; }

gw_import_codes() {
  gw_admin "/admin/v1/products/$1/codes" -H 'content-type: text/plain' --data-binary "@${2:--}"
}

gw_reseller() {
  local key
  gw_reseller_id=$(gw_admin /admin/v1/resellers -H 'content-type: application/json' \
    -d "{\"name\":\"${3:-Shop}\",\"tier\":\"$1\"}" | gw_json reseller_id)
  gw_admin "/admin/v1/resellers/$gw_reseller_id/balance" -H 'content-type: application/json' \
    -d "{\"amount\":$2,\"reference\":\"opening-balance\"}" >/dev/null
  key=$(gw_admin "/admin/v1/resellers/$gw_reseller_id/keys" -X POST)
  gw_key_id=$(printf '%s' "$key" | gw_json key_id)
  gw_secret=$(printf '%s' "$key" | gw_json secret)
}
