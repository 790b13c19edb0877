-- After a Postgres commit: acknowledge and delete the outbox entries of one cell, in one
-- step (an entry acknowledged but left in the stream would never be read again).
--
-- The orders' idempotency records are left 'pending': a replay asks Postgres before it
-- trusts the record, so no answer depends on marking them done.
--
-- KEYS: 1 outbox
-- ARGV: 1 consumer group, 2.. entry ids
if #ARGV < 2 then
  return 0
end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
