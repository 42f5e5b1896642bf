-- ARGV: 1 device ('' = keeps no cursor: only the user cursor moves), 2 epoch, 3 seq, 4 max_devices, 5 inbox_ttl ms.
-- Cursors move forward only, never past the head, and only in the current epoch. The
-- least recently acked devices beyond max_devices lose their cursor.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch ~= ARGV[2] then return 0 end
local head = tonumber(redis.call('HGET', KEYS[1], 'head'))
local seq = math.min(tonumber(ARGV[3]), head)
if ARGV[1] ~= '' then
  local cur = redis.call('HGET', KEYS[5], ARGV[1])
  if not cur or tonumber(cur) < seq then
    redis.call('HSET', KEYS[5], ARGV[1], seq)
  end
  local n = redis.call('HINCRBY', KEYS[1], 'ackn', 1)
  redis.call('ZADD', KEYS[6], n, ARGV[1])
  local over = redis.call('ZCARD', KEYS[6]) - tonumber(ARGV[4])
  if over > 0 then
    local gone = redis.call('ZRANGE', KEYS[6], 0, over - 1)
    redis.call('ZREMRANGEBYRANK', KEYS[6], 0, over - 1)
    redis.call('HDEL', KEYS[5], unpack(gone))
  end
end
local ucur = tonumber(redis.call('HGET', KEYS[1], 'ucur') or 0)
if seq > ucur then
  redis.call('HSET', KEYS[1], 'ucur', seq)
end
touch(tonumber(ARGV[5]))
return 1
