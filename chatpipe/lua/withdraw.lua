-- The api answered 503 (Kafka did not ack in time): the request was not queued, so its record,
-- if Kafka takes it late, must not be answered. A claim skips a withdrawn message (published
-- '1': there is no terminal to publish); the client's retry with the same message_id is
-- accepted anew (ACCEPT). Only a message no consumer has claimed (no epoch) is withdrawn.
-- KEYS msg open ; ARGV ttl message_id -> 1 withdrawn | 0 not (a consumer has it already)
local msg_key, open_key = KEYS[1], KEYS[2]
local ttl, message_id = ARGV[1], ARGV[2]

if redis.call('HGET', msg_key, 'state') ~= 'queued' then return 0 end
if redis.call('HEXISTS', msg_key, 'epoch') == 1 then return 0 end
redis.call('HSET', msg_key, 'state', 'withdrawn', 'published', '1')
redis.call('EXPIRE', msg_key, ttl)
redis.call('SREM', open_key, message_id)
return 1
