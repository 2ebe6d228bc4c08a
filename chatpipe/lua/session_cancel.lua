-- A session-wide cancel: every message of the session created before `before` (an RFC 3339
-- time in chatpipe's one format, so strings compare as times) is cancelled. The latest such
-- time is kept (a second, earlier cancel changes nothing), for ttl seconds: CLAIM cancels a
-- message created before it, also one Redis has not seen yet (still only in Kafka).
-- With ownership enforced (ARGV enforce = '1'), a session another user owns answers -1 and
-- changes nothing.
-- KEYS marker owner ; ARGV before ttl enforce user -> 1 | -1
local marker_key, owner_key = KEYS[1], KEYS[2]
local before, ttl, enforce, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

if enforce == '1' then
  local owner = redis.call('GET', owner_key)
  if user == '' or (owner and owner ~= user) then return -1 end
end
local current = redis.call('GET', marker_key)
if not current or current < before then
  redis.call('SET', marker_key, before, 'EX', ttl)
end
return 1
