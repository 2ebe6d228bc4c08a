-- A lease that vanished (Redis restarted empty) is taken again, unless the message went on
-- without us meanwhile: a later run holds it (its epoch is not ours) or it is final (a finished
-- message's lease is held only by its finisher, until its terminal is published). One another
-- instance holds is lost.
-- A refreshed lease's lapse time in its bucket's `leases` moves with it.
-- KEYS lease1 active1 msg1 stream1 leases1 lease2 ... ; ARGV instance lease_ms active_ttl member1
--   epoch1 member2 epoch2 ... (member: the message in `leases`, its escaped session:message;
--   on a Redis Cluster the caller sends one bucket's streams per call) -> lost indexes (1-based)
local instance, lease_ms, active_ttl = ARGV[1], ARGV[2], ARGV[3]
-- per stream n: KEYS lease, active, msg, stream, leases from 5n-4; ARGV member, epoch from 2n+2

local lost = {}
local t = redis.call('TIME')
local lapse = t[1] * 1000 + math.floor(t[2] / 1000) + lease_ms
for i = 1, #KEYS, 5 do
  local n = (i + 4) / 5
  local owner = redis.call('GET', KEYS[i])
  local f = redis.call('HMGET', KEYS[i + 2], 'state', 'epoch')
  local epoch = ARGV[3 + 2 * n]
  local ours = (not f[1]) or epoch == '' or f[2] == epoch
  local final = f[1] == 'completed' or f[1] == 'failed' or f[1] == 'cancelled'
  if ours and (owner == instance or (not owner and not final)) then
    redis.call('SET', KEYS[i], instance, 'PX', lease_ms)
    if not final then
      redis.call('ZADD', KEYS[i + 4], lapse, ARGV[2 + 2 * n])
      redis.call('EXPIRE', KEYS[i + 1], active_ttl)
      redis.call('EXPIRE', KEYS[i + 3], active_ttl)
    end
  else
    table.insert(lost, n)
  end
end
return lost
