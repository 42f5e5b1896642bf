-- ARGV: 1 device. Returns {device cursor or -1, user cursor}.
local u = redis.call('HGET', KEYS[1], 'ucur')
return {cursor_of(ARGV[1]), tonumber(u or 0)}
