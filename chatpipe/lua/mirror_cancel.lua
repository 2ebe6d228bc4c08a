-- The listener's mirror of a cancel record. Unlike the api's cancel it also flags a message
-- nobody has seen yet (a Spring frontend may cancel before its request is consumed).
-- With ownership enforced (ARGV enforce = '1') a cancel from anyone but the message's sender
-- (or, for a message not seen yet, the session's owner) changes nothing: -1.
-- `cancel_source` (ARGV source: kafka, session, interrupt) is where the first cancel came from.
-- KEYS msg cancel owner ; ARGV ttl queued_ttl enforce user source
--   -> 1 flag set | 0 message already final | -1 forbidden
local msg_key, cancel_key, owner_key = KEYS[1], KEYS[2], KEYS[3]
local cancel_ttl, queued_ttl, enforce, user, source = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local state = redis.call('HGET', msg_key, 'state')
if state == 'completed' or state == 'failed' or state == 'cancelled' then return 0 end
if enforce == '1' then
  if user == '' then return -1 end
  if state then
    if redis.call('HGET', msg_key, 'user') ~= user then return -1 end
  else
    local owner = redis.call('GET', owner_key)
    if owner and owner ~= user then return -1 end
  end
end
local ttl = queued_ttl
if state == 'streaming' then ttl = cancel_ttl end
redis.call('SET', cancel_key, '1', 'EX', ttl)
-- the cancel also lives in the message's hash, as long as the message can be claimed (the flag
-- lapses after its TTL); a message nobody has seen yet gets a hash of just this field, which
-- its request (OBSERVE/ACCEPT) turns into a queued message that stays cancelled
redis.call('HSET', msg_key, 'cancel_requested', '1')
if source and source ~= '' then redis.call('HSETNX', msg_key, 'cancel_source', source) end
if not state then redis.call('EXPIRE', msg_key, queued_ttl) end
return 1
