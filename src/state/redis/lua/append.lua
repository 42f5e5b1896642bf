-- The instance of each presence record (codec.rs encode_presence: an 8-byte time, then six
-- u32-LE-length-prefixed fields, the instance last), each once.
local function routes_of(key)
  local out, seen = {}, {}
  for _, rec in ipairs(redis.call('HVALS', key)) do
    local pos = 9
    local inst
    for i = 1, 6 do
      local a, b, c, d = string.byte(rec, pos, pos + 3)
      if not d then inst = nil; break end
      local n = a + b * 256 + c * 65536 + d * 16777216
      if i == 6 then inst = string.sub(rec, pos + 4, pos + 3 + n) end
      pos = pos + 4 + n
    end
    if inst and not seen[inst] then
      seen[inst] = true
      out[#out + 1] = inst
    end
  end
  return out
end
-- ARGV: 1 message id, 2 payload, 3 epoch to create if none, 4 inbox_max, 5 inbox_ttl ms,
-- 6 dedupe_window ms. KEYS[7] is the user's presence hash. Returns {epoch, seq, duplicate
-- (0/1), instances holding connections of the user}: the routes come back with the seq, so
-- routing a push costs no round trip of its own.
local now = now_ms()
local ttl = tonumber(ARGV[5])
local window = math.max(tonumber(ARGV[6]), 1)
local epoch = epoch_of(ARGV[3])
local seen = redis.call('ZSCORE', KEYS[4], ARGV[1])
if seen and tonumber(seen) + window > now then
  local seq = redis.call('HGET', KEYS[3], ARGV[1])
  if seq then
    touch(ttl)
    return {epoch, tonumber(seq), 1, {}}
  end
end
-- Forget ids older than the window (bounded work per call; the keys expire as a whole too).
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - window, 'LIMIT', 0, 100)
if #old > 0 then
  redis.call('ZREM', KEYS[4], unpack(old))
  redis.call('HDEL', KEYS[3], unpack(old))
end
local seq = redis.call('HINCRBY', KEYS[1], 'head', 1)
redis.call('RPUSH', KEYS[2], string.format('%d:', now) .. ARGV[2])
expire_front(now, ttl)
local len = redis.call('LLEN', KEYS[2])
local max = tonumber(ARGV[4])
if len > max then
  redis.call('LTRIM', KEYS[2], len - max, -1)
end
redis.call('HSET', KEYS[3], ARGV[1], seq)
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('PEXPIRE', KEYS[3], window)
redis.call('PEXPIRE', KEYS[4], window)
touch(ttl)
return {epoch, seq, 0, routes_of(KEYS[7])}
