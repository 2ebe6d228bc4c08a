-- Messages whose lease lapsed, by Redis's clock (every instance agrees on it).
-- KEYS leases ; ARGV limit -> message ids
local leases_key = KEYS[1]
local limit = ARGV[1]

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', leases_key, '-inf', now, 'LIMIT', 0, limit)
