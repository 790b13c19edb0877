-- Requests' nonces spent and their tokens taken, each request in its turn, in one step:
-- the reads of one coalesced pipeline together (one script call instead of one each), and
-- the one round trip of a request that has no other (a refusal, a batch before its orders
-- run). The order path does the same inside reserve.lua.
--
-- KEYS: the N requests' nonces, then the buckets they draw on, each once
-- ARGV: 1 the nonces' TTL in seconds, 2 N, then four for each request: its bucket's
--       place among the buckets (0: none), tokens to take, one token's interval
--       (microseconds), the burst
--
-- Answer: two for each request, flat: its status ('ok', 'nonce_reused' or
-- 'rate_limited') and its bucket as gcra_step() reports it ('' without one). Requests on
-- one bucket see it as the ones before them left it, as if each had run alone.
--
-- The bucket is charged first, a replay too: every request counts as one. The nonce is
-- spent whether the bucket admitted it or not, so a refused request cannot be sent again.
local n = tonumber(ARGV[2])
local now = gcra_now()
local tats, taken = {}, {}
local answer = {}
for i = 1, n do
  local a = 2 + (i - 1) * 4
  local b = tonumber(ARGV[a + 1])
  local bucket, limited = '', false
  if b > 0 then
    local tat = tats[b] or gcra_load(KEYS[n + b], now)
    tat, bucket, limited = gcra_step(tat, now, tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]))
    tats[b] = tat
    taken[b] = taken[b] or not limited
  end
  local status = 'ok'
  if not redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    status = 'nonce_reused'
  elseif limited then
    status = 'rate_limited'
  end
  answer[2 * i - 1] = status
  answer[2 * i] = bucket
end
for b, t in pairs(taken) do
  if t then
    gcra_store(KEYS[n + b], tats[b], now)
  end
end
return answer
