-- An api instance opened the message's event stream for a reader: recorded (last one wins)
-- for the message's description (GET /api/chat/{id}); a message whose state is gone is not
-- re-created (its hash would have no TTL).
-- KEYS msg ; ARGV instance -> 1 | 0
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'served_by', ARGV[1])
return 1
