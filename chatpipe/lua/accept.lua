-- Ownership (ARGV enforce = '1'): a message id another user sent, or a session whose owner
-- (KEYS owner, set by the session's first message) is another user, answers 'forbidden' and
-- changes nothing; otherwise the owner key is set (first message) and its TTL refreshed.
-- Every queued or streaming message of a session is in the set `open` (FINISH and WITHDRAW
-- take it out): with if_busy 'reject' a session with an open message answers 'busy:<its id>'
-- and queues nothing (a member whose message is gone or final is dropped first).
-- The user's text is kept (field `message`) until the message ends and its turn is in the
-- session's history (finish.lua), so the conversation shows a queued message too.
-- KEYS msg owner open ; ARGV session user now ttl enforce owner_ttl if_busy msg_prefix message_id
--   message  ->  "ok" | "forbidden" | "busy:<message_id>" | state
local msg_key, owner_key, open_key = KEYS[1], KEYS[2], KEYS[3]
local session, user, now, msg_ttl, enforce, owner_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local if_busy, msg_prefix, message_id, message = ARGV[7], ARGV[8], ARGV[9], ARGV[10]

local state = redis.call('HGET', msg_key, 'state')
if enforce == '1' then
  if state and redis.call('HGET', msg_key, 'user') ~= user then return 'forbidden' end
  if not state then
    local owner = redis.call('GET', owner_key)
    if owner and owner ~= user then return 'forbidden' end
  end
end
if state and state ~= 'withdrawn' then return state end
if if_busy == 'reject' then
  for _, other in ipairs(redis.call('SMEMBERS', open_key)) do
    local s = redis.call('HGET', msg_prefix .. other, 'state')
    if s == 'queued' or s == 'streaming' then return 'busy:' .. other end
    redis.call('SREM', open_key, other)
  end
end
if enforce == '1' then redis.call('SET', owner_key, user, 'EX', owner_ttl) end
-- a withdrawn id (its first POST answered 503) is the client's retry: accepted anew
if state then redis.call('HDEL', msg_key, 'published') end
redis.call('HSET', msg_key, 'state', 'queued', 'session', session, 'user', user,
           'created', now)
if message ~= '' then redis.call('HSET', msg_key, 'message', message) end
redis.call('EXPIRE', msg_key, msg_ttl)
redis.call('SADD', open_key, message_id)
redis.call('EXPIRE', open_key, msg_ttl)
return 'ok'
