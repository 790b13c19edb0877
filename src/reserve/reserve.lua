-- One order's reservation, atomically (docs/design.md, "The shape" step 4): idempotency check,
-- risk hold, stock check, spend limits, balance check, the risk rules (one that holds
-- refuses here), pop the codes, debit the hot balance, count the spend, record the
-- reservation and append the fulfilment to the outbox stream.
--
-- KEYS: 1 idempotency record (hash), 2 stock (list), 3 hot balance, 4 outbox (stream),
--       5 epoch (the rebuild this state comes from; absent: Redis lost its state),
--       6 the reseller's risk state (hash: hold, day, spent, m, n, avg),
--       7 the key's spend (hash: day, spent), 8 the reseller's addresses (hash),
--       9 the reseller's write bucket (src/ratelimit/gcra.lua),
--       10 the codes of this product sold from this cell lately (a counter, for the mover),
--       11 the product's restock counter in this cell (src/stock/sold_out.rs),
--       12 (optional) the request's nonce, spent here first: one round trip per order
--       Every key is in the reseller's home cell, the stock being that cell's pool.
-- ARGV: 1 order id, 2 fingerprint (what a replay must match), 3 quantity, 4 amount,
--       5 refusal the gateway already decided ('' for none), 6 record TTL in seconds,
--       7 the fulfilment's fields (JSON, for the ledger writer), 8 the nonce's TTL,
--       9 the reseller's credit limit (the balance may go down to minus it),
--       10 today (UTC), 11 the reseller's daily spend limit ('' for none),
--       12 the key's daily spend limit ('' for none), 13 now (unix seconds),
--       14 the client address ('' when the new_address rule is off),
--       15 this minute (unix minutes), 16 the velocity factor, 17 the velocity floor per
--       minute ('' when the velocity rule is off), 18 upstream sourcing: '' none,
--       'fallback' when stock is short, 'only' always (docs/api.md §8),
--       19 write tokens to take (0: none, as for the orders of a batch, which took
--       theirs with the batch, and a reservation retried), 20 one token's interval
--       (microseconds), 21 the burst, 22 'cells' when other cells may still hold
--       stock: a pool that cannot fill the order refuses 'cell_dry' (the gateway brings
--       stock from the other cells and asks again) rather than 'out_of_stock' or buying
--       upstream; '' once no cell can fill it,
--       23 the rules whose action is hold ('a', 'v', both or ''): one that fires holds the
--       reseller here, refusing this order and every one after it on every gateway,
--       24 'epoch:restock counter' when the gateway found every cell together short of this
--       order at that point ('' for none): while both are unchanged no cell can fill it,
--       and 'cells' is taken as ''
--
-- Answers, each with the write bucket second (as take() reports it, '' when nothing
-- was taken):
--   {'dup', bucket, state, fingerprint, order id, up}  the merchant_order_no was seen
--                                                  before; up '1' when that order went
--                                                  upstream
--   {'refused', bucket, code}                      nothing taken ('rebuilding': no epoch)
--   {'refused', bucket, 'risk_hold', signals}      nothing taken: this order fired a rule
--                                                  whose action is hold, placed here
--   {'ok', bucket, signals, element...}            reserved; signals name the risk rules
--                                                  that fired ('a' new address, 'v'
--                                                  velocity), elements are stock elements
--   {'upstream', bucket, signals}                  money held and the number recorded, to
--                                                  be bought upstream: nothing popped,
--                                                  nothing in the outbox (src/upstream)
--
-- The write bucket is charged before anything, a replay too (every request counts as
-- one), and a rate-limited order is refused before its idempotency record is read.
local bucket, limited = '', false
local tokens = tonumber(ARGV[19]) or 0
if tokens > 0 then
  bucket, limited = take(KEYS[9], tokens, tonumber(ARGV[20]), tonumber(ARGV[21]))
end
-- A replayed request is refused before anything else, even its own idempotency record;
-- a rate-limited one still spends its nonce, so it cannot be sent again. The nonce holds
-- the order id it was spent on: this very script sent again (its first answer lost on a
-- failing connection) is not a replay, and goes on to find its own reservation.
if KEYS[12] and not redis.call('SET', KEYS[12], ARGV[1], 'NX', 'EX', ARGV[8])
    and redis.call('GET', KEYS[12]) ~= ARGV[1] then
  return {'refused', bucket, 'nonce_reused'}
end
if limited then
  return {'refused', bucket, 'rate_limited'}
end
-- Nothing is sold from a Redis that lost its state or is being rebuilt.
local epoch = redis.call('GET', KEYS[5])
if not epoch then
  return {'refused', bucket, 'rebuilding'}
end
-- The idempotency check comes next, so a replay is answered as the original even
-- when the product has gone off sale or the price has moved since.
local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'order', 'up')
if rec[1] then
  return {'dup', bucket, rec[1], rec[2] or '', rec[3] or '', rec[4] or ''}
end
if ARGV[5] ~= '' then
  return {'refused', bucket, ARGV[5]}
end
local risk = redis.call('HMGET', KEYS[6], 'hold', 'day', 'spent', 'm', 'n', 'avg')
if risk[1] then
  return {'refused', bucket, 'risk_hold'}
end
local qty = tonumber(ARGV[3])
local upstream = ARGV[18] == 'only'
if not upstream and redis.call('LLEN', KEYS[2]) < qty then
  -- Another cell may hold what this one lacks: out_of_stock only when none does. Codes
  -- reach a cell's pool from outside only by import, give-back or rebuild, each of which
  -- moves the epoch or the restock counter; a sell-out found at both is still one.
  local dry = ARGV[24] or ''
  if ARGV[22] == 'cells' and (dry == '' or dry ~= epoch .. ':' .. (redis.call('GET', KEYS[11]) or '')) then
    return {'refused', bucket, 'cell_dry'}
  end
  if ARGV[18] ~= 'fallback' then
    return {'refused', bucket, 'out_of_stock'}
  end
  upstream = true
end
local amount = tonumber(ARGV[4])
-- Spend counts per UTC day: a counter of another day is yesterday's. Days only move
-- forward: a gateway whose clock is a moment behind another's at midnight counts into
-- the later day rather than resetting it, so its limit is never passed. (YYYY-MM-DD
-- compares as it reads. How far ahead a day can be is bounded by the signature window:
-- a gateway whose clock is minutes off refuses every request signed at the real time.)
local today = ARGV[10]
if risk[2] and risk[2] > today then
  today = risk[2]
end
local spent = 0
if risk[2] == today then
  spent = tonumber(risk[3]) or 0
end
if ARGV[11] ~= '' and spent + amount > tonumber(ARGV[11]) then
  return {'refused', bucket, 'spend_limit_exceeded'}
end
local key_spent = 0
if ARGV[12] ~= '' then
  local k = redis.call('HMGET', KEYS[7], 'day', 'spent')
  if k[1] == today then
    key_spent = tonumber(k[2]) or 0
  end
  if key_spent + amount > tonumber(ARGV[12]) then
    return {'refused', bucket, 'spend_limit_exceeded'}
  end
end
local balance = redis.call('GET', KEYS[3])
if not balance then
  -- A reseller created while Redis was away: nothing is sold until the rebuild.
  return {'refused', bucket, 'no_hot_balance'}
end
if tonumber(balance) + tonumber(ARGV[9]) < amount then
  return {'refused', bucket, 'insufficient_balance'}
end
local signals = ''
-- Velocity: orders this minute against an exponentially weighted mean of the minutes
-- before (a tenth per minute, idle minutes counting as zero). It fires once a minute,
-- on the order that first passes the threshold.
local minute = tonumber(ARGV[15])
local m, n, avg = tonumber(risk[4]), tonumber(risk[5]) or 0, tonumber(risk[6]) or 0
if m ~= minute then
  if m and minute > m then
    avg = (avg * 0.9 + n * 0.1) * 0.9 ^ math.min(minute - m - 1, 1000)
  end
  n = 0
end
n = n + 1
if ARGV[17] ~= '' then
  local threshold = math.max(tonumber(ARGV[17]), tonumber(ARGV[16]) * avg)
  if n > threshold and n - 1 <= threshold then
    signals = signals .. 'v'
  end
end
-- A new address: one this reseller, which has ordered before, has not ordered from in
-- 30 days. At most 1024 addresses are remembered per reseller; past that, an address
-- not remembered counts as new.
if ARGV[14] ~= '' then
  local now = tonumber(ARGV[13])
  local seen = tonumber(redis.call('HGET', KEYS[8], ARGV[14]))
  if not seen or now - seen > 2592000 then
    local known = redis.call('HLEN', KEYS[8])
    if known > 0 then
      signals = signals .. 'a'
    end
    if seen or known < 1024 then
      redis.call('HSET', KEYS[8], ARGV[14], now)
    end
  elseif now - seen > 3600 then
    redis.call('HSET', KEYS[8], ARGV[14], now)
  end
end

-- A rule whose action is hold refuses the very order that fires it (it is the order the
-- rule finds suspect) and every order after it, on every gateway, until an operator
-- releases the reseller. Nothing is taken; the rules' counts and the address are kept, so
-- the same order after a release is judged as any other. The background records the hold
-- in Postgres (src/risk.rs), which a rebuild restores it from; until then Redis has it
-- alone, and a release clears it.
if signals ~= '' and (ARGV[23] or '') ~= '' then
  for i = 1, #signals do
    if string.find(ARGV[23], string.sub(signals, i, i), 1, true) then
      redis.call('HSET', KEYS[6], 'hold', '1', 'm', minute, 'n', n, 'avg', tostring(avg))
      return {'refused', bucket, 'risk_hold', signals}
    end
  end
end
local codes = {}
if not upstream then
  codes = redis.call('LPOP', KEYS[2], qty)
  -- Sales of the last few minutes, from the first sale counted: the mover's rate.
  if redis.call('INCRBY', KEYS[10], qty) == qty then
    redis.call('EXPIRE', KEYS[10], 300)
  end
end
redis.call('DECRBY', KEYS[3], amount)
-- An order to be bought upstream says so: this script sent again must begin its purchase,
-- since nothing in the outbox will ever commit it.
if upstream then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'fp', ARGV[2], 'order', ARGV[1], 'up', '1')
else
  redis.call('HSET', KEYS[1], 'state', 'pending', 'fp', ARGV[2], 'order', ARGV[1])
end
if today ~= ARGV[10] then
  -- Counted into a later day than the gateway's own: an undo backs it out of that one.
  redis.call('HSET', KEYS[1], 'd', today)
end
redis.call('EXPIRE', KEYS[1], ARGV[6])

-- Whole numbers as integers ('%.0f'): a plain tostring writes 1e+15 past 10^14.
redis.call('HSET', KEYS[6], 'day', today, 'spent', string.format('%.0f', spent + amount), 'm', minute, 'n', n,
           'avg', tostring(avg))
if ARGV[12] ~= '' then
  redis.call('HSET', KEYS[7], 'day', today, 'spent', string.format('%.0f', key_spent + amount))
  redis.call('EXPIRE', KEYS[7], 172800)
end

if upstream then
  return {'upstream', bucket, signals}
end
-- Elements are binary and may be many: one field, each element behind a 2-byte length.
local packed = {}
for i = 1, #codes do
  local n = #codes[i]
  packed[i] = string.char(math.floor(n / 256), n % 256) .. codes[i]
end
-- The epoch goes with the fulfilment: Postgres refuses it if a rebuild came between.
redis.call('XADD', KEYS[4], '*', 'o', ARGV[7], 'c', table.concat(packed), 'e', epoch)
local out = {'ok', bucket, signals}
for i = 1, #codes do
  out[i + 3] = codes[i]
end
return out
