-- A tier's token bucket, shared by every gateway (docs/api.md §3 "Rate limits"): GCRA,
-- the generic cell rate algorithm, as redis-cell, Stripe and governor count. A bucket is
-- one number, its theoretical arrival time (TAT): when it would be full again if nothing
-- more were taken. It is kept in microseconds of Redis's own clock (TIME), so gateways
-- whose clocks disagree still share one bucket; Redis 7 replicates scripts by their
-- effects, so a script may read the clock and then write. The key expires when the
-- bucket would be full again, so a reseller that stops calling costs no memory.

-- Redis's clock, in microseconds.
local function gcra_now()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end

-- The bucket stored at key, as of now: its TAT, never in the past.
local function gcra_load(key, now)
  return math.max(tonumber(redis.call('GET', key)) or now, now)
end

-- Times are whole microseconds, so '%d' (a 64-bit integer here) writes them exactly, and
-- is cheaper for Redis than '%.0f'; a plain tostring would write 1e+15.
local function gcra_store(key, tat, now)
  redis.call('SET', key, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000))
end

-- Takes n tokens from a bucket at tat, all or none, and stores nothing. interval is how
-- long one token takes to come back (microseconds), burst how many the bucket holds.
-- Returns the bucket's new TAT, the bucket as the answer's RateLimit-* headers need it,
-- 'burst remaining reset retry' (microseconds until it is full again, and until the n
-- tokens are there: 0 when they were taken), and whether it refused.
local function gcra_step(tat, now, n, interval, burst)
  local tau = interval * burst
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
  end
  local remaining = math.floor((tau - (after - now)) / interval)
  return after, string.format('%d %d %d %d', burst, remaining, after - now, retry), retry > 0
end

-- take(key, n, interval, burst): gcra_step on the bucket stored at key, stored back when
-- it admitted. Returns the report and whether it refused.
local function take(key, n, interval, burst)
  local now = gcra_now()
  local after, report, refused = gcra_step(gcra_load(key, now), now, n, interval, burst)
  if not refused then
    gcra_store(key, after, now)
  end
  return report, refused
end
