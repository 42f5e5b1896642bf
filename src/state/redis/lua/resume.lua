-- A connecting device's whole start in one round trip (SPEC §5 resume).
-- ARGV: 1 device ('' = keeps no cursor), 2 since mode (0 none, 1 a position, 2 unparsable),
-- 3 since epoch, 4 since seq, 5 limit, 6 epoch to create if none, 7 inbox_ttl ms.
-- KEYS[7] is the user's revocations (so an instance that missed a revocation on the bus,
-- or started after it, learns it at login at no extra round trip).
-- KEYS[8] is the user's presence: its size is the user's connections on every instance,
-- for `sessions.max_per_user` across the cluster.
-- Returns {epoch, head, device cursor or -1, user cursor, after, first seq, trimmed, entries,
-- user-wide revoked at or -1, device revoked at or -1, connections}.
local ttl = tonumber(ARGV[7])
local epoch = epoch_of(ARGV[6])
expire_front(now_ms(), ttl)
touch(ttl)
local head = tonumber(redis.call('HGET', KEYS[1], 'head'))
local ucur = tonumber(redis.call('HGET', KEYS[1], 'ucur') or 0)
local dcur = cursor_of(ARGV[1])
local after
if ARGV[2] == '1' and ARGV[3] == epoch then
  after = math.min(tonumber(ARGV[4]), head)
elseif ARGV[2] ~= '0' then
  after = 0
elseif dcur >= 0 then
  after = dcur
else
  after = ucur
end
local r = read_range(after, tonumber(ARGV[5]))
local function revoked(field)
  return tonumber(redis.call('HGET', KEYS[7], field) or -1)
end
local rdev = -1
if ARGV[1] ~= '' then
  rdev = revoked(ARGV[1])
end
return {epoch, head, dcur, ucur, after, r[2], r[3], r[4], revoked(''), rdev,
  redis.call('HLEN', KEYS[8])}
