-- A stream entry has the fields of chatpipe/entries.py: e (event), s (seq), d (JSON data).
-- One SSE event of a run, fenced: written only while the message is `streaming` under this
-- run's epoch (or its hash is gone: Redis lost it, the run goes on as before); the caller
-- produces the event's Kafka record only after this answered >= 0. The first event of a run
-- gives the stream its TTL (refreshed with the lease; FINISH sets the final one).
-- A write is idempotent: `written` (the run's epoch and the last seq it wrote) makes a batch
-- sent again after a lost connection (the sink retries it: Redis may have applied part of it)
-- skip the events it already holds, so no chunk is in the stream twice.
-- KEYS msg stream cancel ; ARGV epoch event seq data maxlen ttl
--   -> -1 lost (write refused) | 1 written, cancel requested | 0 written
local msg_key, stream_key, cancel_key = KEYS[1], KEYS[2], KEYS[3]
local run_epoch, event, event_seq, data, maxlen, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local f = redis.call('HMGET', msg_key, 'state', 'epoch', 'cancel_requested', 'written')
if f[1] and (f[1] ~= 'streaming' or f[2] ~= run_epoch) then return -1 end
local again = false
if f[4] then
  local epoch, seq = string.match(f[4], '^(.*)/(%d+)$')
  again = epoch == run_epoch and tonumber(seq) >= tonumber(event_seq)
end
if not again then
  redis.call('XADD', stream_key, 'MAXLEN', '~', maxlen, '*', 'e', event, 's', event_seq, 'd', data)
  if f[1] then redis.call('HSET', msg_key, 'written', run_epoch .. '/' .. event_seq) end
end
if ttl ~= '' then redis.call('EXPIRE', stream_key, ttl) end
if f[3] == '1' or redis.call('EXISTS', cancel_key) == 1 then return 1 end
return 0
