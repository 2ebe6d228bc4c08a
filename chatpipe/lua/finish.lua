-- A stream entry has the fields of chatpipe/entries.py: e (event), s (seq), d (JSON data).
-- The lease is kept (lease_ms, refreshed by the finisher) until the terminal's Kafka ack is
-- recorded (PUBLISHED): a claim meanwhile waits; one after a finisher that died re-publishes.
-- ARGV epoch '' : no run of ours to fence (a message failed or refused before it started).
-- The message's turn (its text, the answer's text, the final state) is appended to the
-- session's history list, cut to its newest history_max turns (ARGV message '': no turn, as
-- for a request refused in another user's session; history_max 0: history off).
-- KEYS msg lease cancel active stream leases open history ; ARGV instance wanted reason seq
--   final_ttl message_id now maxlen epoch lease_ms chunks message answer truncated
--   history_max history_ttl completion_tokens prompt_tokens ('' unknown) lease_member (the
--   message in `leases`: its escaped session:message)
--   -> {final_state, reason, stream_id, cancel_source} | {'already', state}
local msg_key, lease_key, cancel_key, active_key, stream_key, leases_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local open_key, history_key = KEYS[7], KEYS[8]  -- the session's open messages (accept.lua), turns
local instance, wanted, wanted_reason, seq, final_ttl, message_id, now, maxlen, epoch, lease_ms, chunks = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local message, answer, truncated, history_max, history_ttl = ARGV[12], ARGV[13], ARGV[14], tonumber(ARGV[15]), ARGV[16]
local completion_tokens, prompt_tokens, lease_member = ARGV[17], ARGV[18], ARGV[19]

local f = redis.call('HMGET', msg_key, 'state', 'epoch', 'cancel_requested', 'created')
local state = f[1]
if state == 'completed' or state == 'failed' or state == 'cancelled' then
  return {'already', state}
end
if epoch ~= '' and state and f[2] ~= epoch then return {'already', 'fenced'} end
local owner = redis.call('GET', lease_key)
if owner and owner ~= instance then return {'already', 'owned:' .. owner} end
local final = wanted
local reason = wanted_reason
if final ~= 'cancelled' and (redis.call('EXISTS', cancel_key) == 1 or f[3] == '1') then
  final = 'cancelled'
  reason = 'cancelled by user'
end
redis.call('HSET', msg_key, 'state', final, 'reason', reason, 'finished', now,
           'final_seq', seq, 'chunks', chunks, 'completion_tokens', completion_tokens)
if prompt_tokens ~= '' then redis.call('HSET', msg_key, 'prompt_tokens', prompt_tokens) end
redis.call('HDEL', msg_key, 'published', 'request', 'message')
redis.call('ZREM', leases_key, lease_member)
redis.call('SREM', open_key, message_id)
redis.call('EXPIRE', msg_key, final_ttl)
if redis.call('GET', active_key) == message_id then redis.call('DEL', active_key) end
redis.call('SET', lease_key, instance, 'PX', lease_ms)
redis.call('DEL', cancel_key)
if message ~= '' and history_max > 0 then
  local turn = {message_id = message_id, message = message, answer = answer, status = final,
                created_at = f[4] or now, finished_at = now, chunks = tonumber(chunks)}
  if reason ~= '' then turn['reason'] = reason end
  if truncated == '1' then turn['truncated'] = true end
  redis.call('RPUSH', history_key, cjson.encode(turn))
  redis.call('LTRIM', history_key, -history_max, -1)
  redis.call('EXPIRE', history_key, history_ttl)
end
local data = {status = final}
if reason ~= '' then data['reason'] = reason end
local id = redis.call('XADD', stream_key, 'MAXLEN', '~', maxlen, '*', 'e', 'done', 's', seq,
                      'd', cjson.encode(data))
redis.call('EXPIRE', stream_key, final_ttl)
return {final, reason, id, redis.call('HGET', msg_key, 'cancel_source') or ''}
