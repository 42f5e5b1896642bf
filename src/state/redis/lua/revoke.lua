-- KEYS[1] the user's revocations (hash: device id, '' for the whole user -> ms).
-- ARGV: 1 device, 2 at ms. The latest revocation wins.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or tonumber(cur) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
