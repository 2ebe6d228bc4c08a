-- A stream entry has the fields of chatpipe/entries.py: e (event), s (seq), d (JSON data).
-- SSE events of runs, fenced, many per call (the sink's batch of one loop tick; on a Redis
-- Cluster, those of one hash slot): each is written only while its message is `streaming`
-- under the run's epoch (or its hash is gone: Redis lost it, the run goes on as before); the
-- caller produces an event's Kafka record only after it answered >= 0. The first event of a
-- run gives the stream its TTL (refreshed with the lease; FINISH sets the final one).
-- A call is idempotent: its writer's marker (KEYS[1], one key per writer and bucket) holds
-- the number of the writer's last call; the same call sent again (a lost connection: Redis may
-- have run it; redis-py and the sink both send it again) finds its own number there and writes
-- nothing, only answers. One marker write per call, not one per event. Events of one message
-- in one call are written in order, each seeing the one before.
-- KEYS: marker, then per event: msg stream cancel
-- ARGV maxlen ttl call, then per event: epoch event seq data first (1 | '')
--   -> per event, in order: -1 lost (write refused) | 1 written, cancel requested | 0 written
local maxlen, ttl, call = ARGV[1], ARGV[2], ARGV[3]
local again = redis.call('SET', KEYS[1], call, 'EX', ttl, 'GET') == call
local answers = {}
for i = 1, (#KEYS - 1) / 3 do
  local msg_key, stream_key, cancel_key = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local a = 4 + 5 * (i - 1)
  local run_epoch, event, event_seq, data, first = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local f = redis.call('HMGET', msg_key, 'state', 'epoch', 'cancel_requested')
  if f[1] and (f[1] ~= 'streaming' or f[2] ~= run_epoch) then
    answers[i] = -1
  else
    if not again then
      redis.call('XADD', stream_key, 'MAXLEN', '~', maxlen, '*', 'e', event, 's', event_seq, 'd', data)
      if first == '1' then redis.call('EXPIRE', stream_key, ttl) end
    end
    if f[3] == '1' or redis.call('EXISTS', cancel_key) == 1 then answers[i] = 1 else answers[i] = 0 end
  end
end
return answers
