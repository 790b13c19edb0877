# Sourced (from the repository root) by checks that need a live gateway: the debug build
# on the local Redis and Postgres, with a database and Redis prefix of its own.
# start_live_gateway starts it and logs in as an admin; on exit it is stopped and its
# database and Redis keys dropped. Then: $base, $token, $work (a scratch directory), admin PATH ARGS...
# (curl with the admin token) and field NAME (a field of the JSON on stdin).
eval "$(scripts/dev services | sed 's/^/export /')"
work=$(mktemp -d)
# No "_" or "%": the name is its own LIKE pattern for scripts/dev forget.
live_db="cglive$$"
live_pid=

field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
admin() { curl -fs "$base$1" -H "authorization: Bearer $token" "${@:2}"; }

stop_live_gateway() {
  [ -n "$live_pid" ] && { kill "$live_pid" 2>/dev/null; wait "$live_pid" 2>/dev/null || true; }
  scripts/dev forget "$live_db" "live$$:*" || true
  rm -rf "$work"
}

start_live_gateway() {
  psql "$CARDGATE_DATABASE_URL" -qc "CREATE DATABASE $live_db"
  trap stop_live_gateway EXIT
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  base="http://127.0.0.1:$port"
  CARDGATE_DATABASE_URL="${CARDGATE_DATABASE_URL%/*}/$live_db" CARDGATE_LISTEN="127.0.0.1:$port" \
    CARDGATE_REDIS_PREFIX="live$$" CARDGATE_MASTER_KEY="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" \
    CARDGATE_JWT_SECRET="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" CARDGATE_BOOTSTRAP_ADMIN=live:live-password \
    CARDGATE_LOG=warn ./target/debug/cardgate 2>"$work/gateway.log" &
  live_pid=$!
  for _ in $(seq 1 150); do curl -fs "$base/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
  token=$(curl -fs "$base/admin/v1/login" -H 'content-type: application/json' \
    -d '{"username":"live","password":"live-password"}' | field token)
}
