-- A stream entry has the fields of chatpipe/entries.py: e (event), s (seq), d (JSON data).
-- With ownership enforced (ARGV enforce = '1'): a request without a user, or for a message id
-- another user sent, or in another user's session answers {'forbidden', why} before anything
-- changes; otherwise the session's owner key is set (first message) and its TTL refreshed.
-- A run's lease is also in the sorted set `leases` (its lapse time, Redis's clock), and the
-- request in the message hash (`request`): a surviving instance takes over a message whose
-- lease lapsed from there, without waiting for Kafka's group to move the partition
-- (ai_consumer/takeover.py). FINISH removes both.
-- A message created before the session's cancel time (session_cancel.lua; ARGV created: the
-- request's created_at) is cancelled like one whose flag is set.
-- KEYS msg lease cancel active stream owner leases session_cancelled
-- ARGV instance lease_ms session user now msg_ttl active_ttl message_id enforce owner_ttl request
--   created lease_member (the message in `leases`: its escaped session:message)
--   -> {'final', state} | {'owned', owner} | {'forbidden', why}
--      | {'republish', state, final_seq, reason, chunks}
--      | {'cancel', restart, next_seq, epoch} | {'start', restart, next_seq, epoch}
local msg_key, lease_key, cancel_key, active_key, stream_key, owner_key, leases_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local instance, lease_ms, session, user, now, msg_ttl, active_ttl, message_id, enforce, owner_ttl, request = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local session_cancelled_key, created, lease_member = KEYS[8], ARGV[12], ARGV[13]

local state = redis.call('HGET', msg_key, 'state')
if state == 'withdrawn' then return {'final', state} end
if state == 'completed' or state == 'failed' or state == 'cancelled' then
  -- a terminal event whose Kafka ack was never recorded (its finisher died or was stopped
  -- before it): published again by whoever claims it next, unless its finisher still holds
  -- the lease (it is publishing right now)
  local f = redis.call('HMGET', msg_key, 'published', 'final_seq', 'reason', 'chunks')
  if f[1] or not f[2] then return {'final', state} end
  local holder = redis.call('GET', lease_key)
  if holder and holder ~= instance then return {'owned', holder} end
  redis.call('SET', lease_key, instance, 'PX', lease_ms)
  return {'republish', state, f[2], f[3] or '', f[4] or '0'}
end
if enforce == '1' then
  if user == '' then return {'forbidden', 'user'} end
  if state and (redis.call('HGET', msg_key, 'user') ~= user
                or redis.call('HGET', msg_key, 'session') ~= session) then
    return {'forbidden', 'message'}
  end
  local session_owner = redis.call('GET', owner_key)
  if session_owner and session_owner ~= user then return {'forbidden', 'session'} end
  redis.call('SET', owner_key, user, 'EX', owner_ttl)
end
local owner = redis.call('GET', lease_key)
if owner and owner ~= instance then return {'owned', owner} end
redis.call('SET', lease_key, instance, 'PX', lease_ms)
local t = redis.call('TIME')
redis.call('ZADD', leases_key, t[1] * 1000 + math.floor(t[2] / 1000) + lease_ms, lease_member)
if request ~= '' then redis.call('HSET', msg_key, 'request', request) end
local restart = 0
if state == 'streaming' then restart = 1 end
local next_seq = 0
local last = redis.call('XREVRANGE', stream_key, '+', '-', 'COUNT', 1)
if last[1] then
  local f = last[1][2]
  for i = 1, #f, 2 do if f[i] == 's' then next_seq = tonumber(f[i + 1]) + 1 end end
end
redis.call('HSET', msg_key, 'session', session, 'user', user, 'owner', instance)
if not state then redis.call('HSET', msg_key, 'created', now) end
redis.call('EXPIRE', msg_key, msg_ttl)
-- the fencing token of this run: every write of an earlier run (an owner frozen past its
-- lease, woken after this claim) is refused from now on
local epoch = redis.call('HINCRBY', msg_key, 'epoch', 1)
if redis.call('EXISTS', stream_key) == 1 then redis.call('EXPIRE', stream_key, active_ttl) end
local cancelled_before = redis.call('GET', session_cancelled_key)
if redis.call('EXISTS', cancel_key) == 1
   or redis.call('HGET', msg_key, 'cancel_requested') == '1'
   or (cancelled_before and created ~= '' and created < cancelled_before) then
  redis.call('HSET', msg_key, 'cancel_requested', '1')
  redis.call('HSETNX', msg_key, 'cancel_source', 'session')  -- else a flag named it
  return {'cancel', restart, next_seq, epoch}
end
redis.call('HSET', msg_key, 'state', 'streaming', 'started', now)
redis.call('SET', active_key, message_id, 'EX', active_ttl)
return {'start', restart, next_seq, epoch}
