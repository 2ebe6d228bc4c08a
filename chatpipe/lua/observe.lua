-- Seen on chat.requests (also requests produced straight to Kafka by other frontends).
-- KEYS msg ; ARGV session user now ttl -> state
local msg_key = KEYS[1]
local session, user, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local state = redis.call('HGET', msg_key, 'state')
if state then return state end
redis.call('HSET', msg_key, 'state', 'queued', 'session', session, 'user', user,
           'created', now)
redis.call('EXPIRE', msg_key, ttl)
return 'queued'
