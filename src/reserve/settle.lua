-- After a Postgres commit: acknowledge and delete the outbox entries and mark each
-- order's idempotency record done (only if it still names that order).
--
-- KEYS: 1 outbox, 2.. one idempotency record per order
-- ARGV: 1 consumer group, then per order: entry id, order id
for i = 2, #KEYS do
  local entry, order = ARGV[2 * i - 2], ARGV[2 * i - 1]
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
  if redis.call('HGET', KEYS[i], 'order') == order then
    redis.call('HSET', KEYS[i], 'state', 'done')
  end
end
return #KEYS - 1
