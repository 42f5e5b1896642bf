-- KEYS[1] the group's members (set). ARGV: 1 "replace" | "add" | "remove", 2.. users.
-- Returns the member count after the change.
if ARGV[1] == 'replace' then
  redis.call('DEL', KEYS[1])
end
local cmd = 'SADD'
if ARGV[1] == 'remove' then cmd = 'SREM' end
-- unpack is bounded by Lua's stack: a few hundred users per call.
local i = 2
while i <= #ARGV do
  local j = math.min(i + 499, #ARGV)
  redis.call(cmd, KEYS[1], unpack(ARGV, i, j))
  i = j + 1
end
return redis.call('SCARD', KEYS[1])
