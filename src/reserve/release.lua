-- Undo a reservation that will not be committed: its codes back to the front of the
-- stock, its amount back to the hot balance, its idempotency record dropped, its outbox
-- entry acknowledged and deleted. Runs at most once per entry: a second call (another
-- writer that claimed the same entry) finds the entry gone and changes nothing.
--
-- A reservation made before the last rebuild is only acknowledged: the rebuild read
-- Postgres, where it never was, so its codes and money are back already.
--
-- KEYS: 1 idempotency record, 2 stock, 3 hot balance, 4 outbox, 5 epoch,
--       6 the reseller's risk state, 7 the key's spend
-- ARGV: 1 order id, 2 amount, 3 consumer group, 4 entry id,
--       5 '1' to remove other copies of each element first (after a last-guard hit),
--       6 the epoch the reservation was made at, 7 the gateway's UTC day of the order
--       (give_back.lua),
--       8.. the elements to return
if redis.call('XDEL', KEYS[4], ARGV[4]) == 0 then
  return 0
end
redis.call('XACK', KEYS[4], ARGV[3], ARGV[4])
if redis.call('GET', KEYS[5]) ~= ARGV[6] then
  return 1
end
for i = #ARGV, 8, -1 do
  if ARGV[5] == '1' then
    redis.call('LREM', KEYS[2], 0, ARGV[i])
  end
  redis.call('LPUSH', KEYS[2], ARGV[i])
end
give_back(KEYS[1], ARGV[1], ARGV[7], ARGV[2], KEYS[3], KEYS[6], KEYS[7])
return 1
