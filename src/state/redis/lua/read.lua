-- ARGV: 1 after, 2 limit, 3 epoch to create if none, 4 inbox_ttl ms.
-- Returns {epoch, head, first seq returned, trimmed, entries}.
local ttl = tonumber(ARGV[4])
local epoch = epoch_of(ARGV[3])
expire_front(now_ms(), ttl)
touch(ttl)
local r = read_range(tonumber(ARGV[1]), tonumber(ARGV[2]))
return {epoch, r[1], r[2], r[3], r[4]}
