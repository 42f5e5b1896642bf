-- KEYS[1] the user's revocations (hash: device id, '' for the whole user -> ms).
-- ARGV: 1 device, 2 at ms, 3 how long a revocation matters (ms: no accepted token lives
-- longer). The latest revocation wins; the hash goes that long after the last one.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or tonumber(cur) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
