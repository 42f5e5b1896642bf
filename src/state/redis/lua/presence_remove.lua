-- KEYS[1] the user's connections (hash: conn -> record). ARGV: 1 conn.
-- Removes the connection and returns its record (the caller then drops it from its
-- instance's index, which lives on another shard).
local r = redis.call('HGET', KEYS[1], ARGV[1])
if not r then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
return r
