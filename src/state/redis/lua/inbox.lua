-- Shared by the inbox scripts. Every key of one user carries the hash tag {u:<user>}, so
-- Redis Cluster runs a script on the user's shard.
-- KEYS[1] meta (hash: epoch, head, ucur, ackn)   KEYS[2] entries (list, oldest first)
-- KEYS[3] dedupe id -> seq (hash)               KEYS[4] dedupe id -> stored at (zset, ms)
-- KEYS[5] device -> cursor (hash)               KEYS[6] device -> ack order (zset)
-- An entry is "<stored at ms>:<payload>"; the list always ends at `head`, so the first
-- retained seq is head - LLEN + 1.

-- Server time, so instances with skewed clocks agree on expiry.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The user's epoch. When the meta hash is gone (never written, or expired with the inbox)
-- a new epoch starts with an empty inbox: positions from the old one are recognised as stale.
local function epoch_of(new_epoch)
  local e = redis.call('HGET', KEYS[1], 'epoch')
  if e then return e end
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
  redis.call('HSET', KEYS[1], 'epoch', new_epoch, 'head', 0, 'ucur', 0, 'ackn', 0)
  return new_epoch
end

-- Drop entries stored `ttl` ms ago or earlier, oldest first (bounded work per call).
local function expire_front(now, ttl)
  for _ = 1, 1000 do
    local v = redis.call('LINDEX', KEYS[2], 0)
    if not v then return end
    local at = tonumber(string.match(v, '^(%d+):'))
    if at + ttl > now then return end
    redis.call('LPOP', KEYS[2])
  end
end

-- Keep the inbox, its epoch and its cursors for `ttl` more ms: they expire together, so
-- "inbox lost" always means "new epoch".
local function touch(ttl)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[5], ttl)
  redis.call('PEXPIRE', KEYS[6], ttl)
end

-- {head, seq of the first entry returned, trimmed (0/1), entries}
local function read_range(after, limit)
  local head = tonumber(redis.call('HGET', KEYS[1], 'head'))
  local len = redis.call('LLEN', KEYS[2])
  local first = head - len + 1
  local start = math.max(after + 1, first)
  local items = {}
  if start <= head and limit > 0 then
    items = redis.call('LRANGE', KEYS[2], start - first, start - first + limit - 1)
  end
  local trimmed = 0
  if after < head and first > after + 1 then trimmed = 1 end
  return {head, start, trimmed, items}
end

local function cursor_of(device)
  if device == '' then return -1 end
  local c = redis.call('HGET', KEYS[5], device)
  if c then return tonumber(c) end
  return -1
end
