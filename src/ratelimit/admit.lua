-- A request's nonce spent and its tokens taken, in one step: the reads' command in their
-- shared pipeline, and the one round trip of a request that has no other (a refusal, a
-- batch before its orders run). The order path does the same inside reserve.lua.
--
-- KEYS: 1 the request's nonce, 2 (optional) the reseller's bucket of the request's class
-- ARGV: 1 the nonce's TTL in seconds, 2 tokens to take, 3 one token's interval
--       (microseconds), 4 the burst
--
-- Answer: {status, bucket}: status 'ok', 'nonce_reused' or 'rate_limited'; bucket as
-- take() reports it ('' without KEYS[2]).
--
-- The bucket is charged first, a replay too: every request counts as one. The nonce is
-- spent whether the bucket admitted it or not, so a refused request cannot be sent again.
local bucket, limited = '', false
if KEYS[2] then
  bucket, limited = take(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return {'nonce_reused', bucket}
end
if limited then
  return {'rate_limited', bucket}
end
return {'ok', bucket}
