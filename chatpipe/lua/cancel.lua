-- The api's cancel. KEYS msg cancel ; ARGV session ttl queued_ttl enforce user instance source
--   -> answer ('cancelled_by' records the api instance that took the first cancel,
--   'cancel_source' where it came from: api, session, interrupt)
-- 'repeated': the message is cancelled already, or an earlier cancel of it was accepted (its
-- flag is set again); the api publishes nothing again: a second record on chat.cancels could
-- land after the tombstone and stay in the compacted topic)
local msg_key, cancel_key = KEYS[1], KEYS[2]
local session, cancel_ttl, queued_ttl, enforce, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local instance, source = ARGV[6], ARGV[7]

local state = redis.call('HGET', msg_key, 'state')
if not state then return 'not_found' end
if redis.call('HGET', msg_key, 'session') ~= session then return 'not_found' end
if enforce == '1' and redis.call('HGET', msg_key, 'user') ~= user then return 'forbidden' end
if state == 'cancelled' then return 'repeated' end
if state == 'completed' or state == 'failed' then return state end
local asked = redis.call('HGET', msg_key, 'cancel_requested') == '1'
local ttl = cancel_ttl
if state == 'queued' then ttl = queued_ttl end
redis.call('SET', cancel_key, '1', 'EX', ttl)
if asked then return 'repeated' end
redis.call('HSET', msg_key, 'cancel_requested', '1')
if instance and instance ~= '' then redis.call('HSET', msg_key, 'cancelled_by', instance) end
if source and source ~= '' then redis.call('HSETNX', msg_key, 'cancel_source', source) end
return 'cancelled'
