-- What a reservation that will have no order took, given back (release.lua, and the hold
-- of an upstream purchase refused in its window): its idempotency record dropped if it
-- still names the order, its amount returned to the hot balance, and its spend backed out
-- of the day it was counted in. That is the gateway's day of the order, unless
-- reserve.lua counted it into a later one and wrote that day into the record.
local function give_back(record, order_id, day, amount, balance, risk, key_spend)
  if redis.call('HGET', record, 'order') == order_id then
    day = redis.call('HGET', record, 'd') or day
    redis.call('DEL', record)
  end
  -- A missing hot balance is rebuilt whole from Postgres; creating it here would be wrong.
  if redis.call('EXISTS', balance) == 1 then
    redis.call('INCRBY', balance, amount)
  end
  for _, k in ipairs({risk, key_spend}) do
    if redis.call('HGET', k, 'day') == day then
      redis.call('HINCRBY', k, 'spent', -tonumber(amount))
    end
  end
end
