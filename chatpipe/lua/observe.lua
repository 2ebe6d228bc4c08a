-- Seen on chat.requests (also requests produced straight to Kafka by other frontends).
-- A new one joins its session's open messages (see accept.lua).
-- KEYS msg open ; ARGV session user now ttl message_id message -> state
local msg_key, open_key = KEYS[1], KEYS[2]
local session, user, now, ttl, message_id, message = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local state = redis.call('HGET', msg_key, 'state')
if state then return state end
redis.call('HSET', msg_key, 'state', 'queued', 'session', session, 'user', user,
           'created', now)
if message ~= '' then redis.call('HSET', msg_key, 'message', message) end
redis.call('EXPIRE', msg_key, ttl)
redis.call('SADD', open_key, message_id)
redis.call('EXPIRE', open_key, ttl)
return 'queued'
