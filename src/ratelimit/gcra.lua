-- A tier's token bucket, shared by every gateway (docs/api.md §3 "Rate limits"): GCRA,
-- the generic cell rate algorithm, as redis-cell, Stripe and governor count. A bucket is
-- one number, its theoretical arrival time (TAT): when it would be full again if nothing
-- more were taken. It is kept in microseconds of Redis's own clock (TIME), so gateways
-- whose clocks disagree still share one bucket; Redis 7 replicates scripts by their
-- effects, so a script may read the clock and then write. The key expires when the
-- bucket would be full again, so a reseller that stops calling costs no memory.
--
-- take(key, n, interval, burst): takes n tokens, all or none. interval is how long one
-- token takes to come back (microseconds), burst how many the bucket holds. Returns the
-- bucket as the answer's RateLimit-* headers need it, 'burst remaining reset retry'
-- (microseconds until it is full again, and until the n tokens are there: 0 when they
-- were taken), and whether it refused.
local function take(key, n, interval, burst)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  local tau = interval * burst
  local tat = math.max(tonumber(redis.call('GET', key)) or now, now)
  local after = tat + n * interval
  local retry = after - tau - now
  if retry > 0 then
    -- Refused, nothing taken. More than the bucket can ever hold: no wait helps, and a
    -- full bucket's time is said.
    if n > burst then
      retry = tau
    end
    after = tat
  else
    retry = 0
    redis.call('SET', key, string.format('%.0f', after), 'PX', math.ceil((after - now) / 1000))
  end
  local remaining = math.floor((tau - (after - now)) / interval)
  return string.format('%d %d %.0f %.0f', burst, remaining, after - now, retry), retry > 0
end
