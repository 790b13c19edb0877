# The reservation script called straight from redis-benchmark, for run.sh's baseline and
# script-cost.sh. Source it; needs $CARDGATE_REDIS_URL.

# reservation_fixture PREFIX CODES: a stock of CODES elements and a funded balance and an
# epoch under PREFIX (a hash tag), and the script's SHA in $reservation_sha. The gateway
# loads the bucket's code in front of the script (src/reserve/mod.rs), and so does this.
reservation_fixture() {
  reservation_sha=$(redis-cli -u "$CARDGATE_REDIS_URL" SCRIPT LOAD "$(cat src/ratelimit/gcra.lua src/reserve/reserve.lua)")
  redis-cli -u "$CARDGATE_REDIS_URL" EVAL "for i = 1, tonumber(ARGV[1]) do redis.call('RPUSH', KEYS[1], string.rep('e', 60)) end" \
    1 "$1:stock" "$2" >/dev/null
  redis-cli -u "$CARDGATE_REDIS_URL" MSET "$1:bal" 1000000000000000 "$1:epoch" 1 >/dev/null
}

# local_benchmark ARGS...: redis-benchmark against $CARDGATE_REDIS_URL's Redis, with
# __rand_int__ drawn from a billion values.
local_benchmark() {
  local hostport=${CARDGATE_REDIS_URL#redis://}
  hostport=${hostport%%/*}
  redis-benchmark -h "${hostport%:*}" -p "${hostport#*:}" -r 1000000000 "$@"
}

# reservation_benchmark SHA PREFIX OPTION...: redis-benchmark with OPTIONs (connections,
# requests, output) calling SHA with the reservation's 12 keys under PREFIX and its 24
# arguments, random order numbers and nonces. The rules on by default run as the gateway
# runs them (an address, the velocity rule; a write token taken, from a bucket too large
# to refuse: one token a microsecond); no spend limit, local stock only.
reservation_benchmark() {
  local sha=$1 p=$2 fields
  shift 2
  fields='{"order_id":"ord_bench","reseller":1,"merchant_order_no":"M","product":1,"sku":"s","quantity":1,"unit_price":9800,"amount":9800,"created_at":0,"key_id":"ak_bench"}'
  local_benchmark "$@" \
    EVALSHA "$sha" 12 "$p:idem:1:__rand_int__" "$p:stock" "$p:bal" "$p:outbox" "$p:epoch" \
    "$p:risk:1" "$p:kspend:ak_bench" "$p:addrs:1" "$p:rate:w:1" "$p:sold" "$p:restocked" "$p:nonce:__rand_int__" \
    ord___rand_int__ s1 1 9800 "" 600 "$fields" 600 0 "$(date -u +%F)" "" "" "$(date +%s)" 127.0.0.1 \
    "$(($(date +%s) / 60))" 10 60 "" 1 1 1000000000 cells "" ""
}
