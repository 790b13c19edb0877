-- One order's reservation, atomically (docs/design.md, "The shape" step 4): idempotency check,
-- stock check, balance check, pop the codes, debit the hot balance, record the
-- reservation and append the fulfilment to the outbox stream.
--
-- KEYS: 1 idempotency record (hash), 2 stock (list), 3 hot balance, 4 outbox (stream),
--       5 epoch (the rebuild this state comes from; absent: Redis lost its state),
--       6 (optional) the request's nonce, spent here first: one round trip per order
-- ARGV: 1 order id, 2 fingerprint (what a replay must match), 3 quantity, 4 amount,
--       5 refusal the gateway already decided ('' for none), 6 record TTL in seconds,
--       7 the fulfilment's fields (JSON, for the ledger writer), 8 the nonce's TTL,
--       9 the reseller's credit limit (the balance may go down to minus it)
--
-- Answers:
--   {'dup', state, fingerprint, order id}  the merchant_order_no was seen before
--   {'refused', code}                      nothing taken ('rebuilding': no epoch)
--   {'ok', element...}                     reserved; elements are stock elements
--
-- A replayed request is refused before anything, even its own idempotency record.
if KEYS[6] and not redis.call('SET', KEYS[6], '1', 'NX', 'EX', ARGV[8]) then
  return {'refused', 'nonce_reused'}
end
-- Nothing is sold from a Redis that lost its state or is being rebuilt.
local epoch = redis.call('GET', KEYS[5])
if not epoch then
  return {'refused', 'rebuilding'}
end
-- The idempotency check comes next, so a replay is answered as the original even
-- when the product has gone off sale or the price has moved since.
local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'order')
if rec[1] then
  return {'dup', rec[1], rec[2] or '', rec[3] or ''}
end
if ARGV[5] ~= '' then
  return {'refused', ARGV[5]}
end
local qty = tonumber(ARGV[3])
if redis.call('LLEN', KEYS[2]) < qty then
  return {'refused', 'out_of_stock'}
end
local balance = redis.call('GET', KEYS[3])
if not balance then
  -- A reseller created while Redis was away: nothing is sold until the rebuild.
  return {'refused', 'no_hot_balance'}
end
local amount = tonumber(ARGV[4])
if tonumber(balance) + tonumber(ARGV[9]) < amount then
  return {'refused', 'insufficient_balance'}
end
local codes = redis.call('LPOP', KEYS[2], qty)
redis.call('DECRBY', KEYS[3], amount)
redis.call('HSET', KEYS[1], 'state', 'pending', 'fp', ARGV[2], 'order', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
-- Elements are binary and may be many: one field, each element behind a 2-byte length.
local packed = {}
for i = 1, #codes do
  local n = #codes[i]
  packed[i] = string.char(math.floor(n / 256), n % 256) .. codes[i]
end
-- The epoch goes with the fulfilment: Postgres refuses it if a rebuild came between.
redis.call('XADD', KEYS[4], '*', 'o', ARGV[7], 'c', table.concat(packed), 'e', epoch)
local out = {'ok'}
for i = 1, #codes do
  out[i + 1] = codes[i]
end
return out
