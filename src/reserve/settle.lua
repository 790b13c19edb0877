-- After a Postgres commit: acknowledge and delete the outbox entries and mark each
-- order's idempotency record done (only if it still names that order).
--
-- KEYS: 1 outbox, 2.. one idempotency record per order
-- ARGV: 1 consumer group, then per order: entry id, order id
if #KEYS < 2 then
  return 0
end
-- One XACK and one XDEL for the batch: per entry they were half the script's commands.
local entries = {}
for i = 2, #KEYS do
  entries[i - 1] = ARGV[2 * i - 2]
end
redis.call('XACK', KEYS[1], ARGV[1], unpack(entries))
redis.call('XDEL', KEYS[1], unpack(entries))
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'order') == ARGV[2 * i - 1] then
    redis.call('HSET', KEYS[i], 'state', 'done')
  end
end
return #KEYS - 1
