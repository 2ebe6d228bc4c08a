-- Messages whose lease lapsed, by Redis's clock (every instance agrees on it), from one or
-- more buckets' `leases` (on a Redis Cluster the caller sends one bucket per call).
-- KEYS leases1 leases2 ... ; ARGV limit -> members (escaped session:message), at most limit
local limit = tonumber(ARGV[1])

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local found = {}
for i = 1, #KEYS do
  if #found >= limit then break end
  local members = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'LIMIT', 0, limit - #found)
  for _, m in ipairs(members) do table.insert(found, m) end
end
return found
