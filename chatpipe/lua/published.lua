-- The terminal event of a message is acked by Kafka: a later claim need not publish it again.
-- KEYS msg lease ; ARGV instance
local msg_key, lease_key = KEYS[1], KEYS[2]
local instance = ARGV[1]

if redis.call('HGET', msg_key, 'state') then redis.call('HSET', msg_key, 'published', '1') end
if redis.call('GET', lease_key) == instance then redis.call('DEL', lease_key) end
return 1
