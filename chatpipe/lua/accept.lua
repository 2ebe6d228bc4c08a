-- Ownership (ARGV enforce = '1'): a message id another user sent, or a session whose owner
-- (KEYS owner, set by the session's first message) is another user, answers 'forbidden' and
-- changes nothing; otherwise the owner key is set (first message) and its TTL refreshed.
-- KEYS msg owner ; ARGV session user now ttl enforce owner_ttl  ->  "ok" | "forbidden" | state
local msg_key, owner_key = KEYS[1], KEYS[2]
local session, user, now, msg_ttl, enforce, owner_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local state = redis.call('HGET', msg_key, 'state')
if enforce == '1' then
  if state and redis.call('HGET', msg_key, 'user') ~= user then return 'forbidden' end
  if not state then
    local owner = redis.call('GET', owner_key)
    if owner and owner ~= user then return 'forbidden' end
  end
end
if state and state ~= 'withdrawn' then return state end
if enforce == '1' then redis.call('SET', owner_key, user, 'EX', owner_ttl) end
-- a withdrawn id (its first POST answered 503) is the client's retry: accepted anew
if state then redis.call('HDEL', msg_key, 'published') end
redis.call('HSET', msg_key, 'state', 'queued', 'session', session, 'user', user,
           'created', now)
redis.call('EXPIRE', msg_key, msg_ttl)
return 'ok'
