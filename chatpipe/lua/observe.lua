-- Seen on chat.requests (also requests produced straight to Kafka by other frontends).
-- A new one joins its session's open messages (see accept.lua). With if_busy 'reject' (a
-- request produced straight to Kafka; the api decides its own at accept) a session with an
-- open message answers 'busy:<its id>': the new one is recorded but does not join the open
-- messages, and its handler ends it failed.
-- KEYS msg open ; ARGV session user now ttl message_id message if_busy msg_prefix
--   -> state | 'queued' | 'busy:<message_id>'
local msg_key, open_key = KEYS[1], KEYS[2]
local session, user, now, ttl, message_id, message = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local if_busy, msg_prefix = ARGV[7], ARGV[8]

local state = redis.call('HGET', msg_key, 'state')
if state then return state end
redis.call('HSET', msg_key, 'state', 'queued', 'session', session, 'user', user,
           'created', now)
if message ~= '' then redis.call('HSET', msg_key, 'message', message) end
redis.call('EXPIRE', msg_key, ttl)
if if_busy == 'reject' then
  for _, other in ipairs(redis.call('SMEMBERS', open_key)) do
    local s = redis.call('HGET', msg_prefix .. other, 'state')
    if s == 'queued' or s == 'streaming' then return 'busy:' .. other end
    redis.call('SREM', open_key, other)
  end
end
redis.call('SADD', open_key, message_id)
redis.call('EXPIRE', open_key, ttl)
return 'queued'
