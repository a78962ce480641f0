-- Append room messages, one or many in one call: give each its room's next
-- offset, store it in the room's history, publish it on the room's channel.
-- KEYS: four per message: the room's seq hash, history stream, keys hash, key order.
-- ARGV: TTL in ms, history length, history bytes, most keys kept, envelope head (pod id +
-- newline); then per message: channel, epoch to use if the room has none (or a new one),
-- body (the JSON after `{"type":"message",`), `<offset>:<epoch>`: the newest entry of the
-- room the pod has seen ('' if none), and a mode: 0, or the sum of 1 (refresh the TTLs)
-- and 2 (a key follows: two more arguments, the key and the digest of its data).
-- Returns three per message: offset, epoch, flag (0 stored; 1 its key's message is
-- stored already: that one's offset and epoch; 2 its key names other data: not stored).
-- The seq hash holds `epoch` and, under `o:<epoch>`, the newest offset of that epoch:
-- a pod that has seen the room increments the counter of the epoch it saw, so in the
-- common case a message costs one increment, one XADD and one PUBLISH. The history is
-- trimmed approximately (`MAXLEN ~`: whole nodes of entries; the read script never
-- reads past the history length).
-- An increment that returns 1 found no such counter (the room expired, or moved to
-- another epoch): it is undone and the room's own epoch read. The body is stored and
-- published as it is; the envelope's second line is `<offset>:<epoch>`; pods build the
-- frame. The pod asks for the TTLs to be refreshed when an eighth of them has passed
-- since it last did. If the room is behind what the pod has seen in its epoch (Redis
-- lost writes: a replica promoted before it had them), the room starts a new epoch above
-- that offset, so no offset ever names two messages.
local ttl, maxlen = tonumber(ARGV[1]), ARGV[2]
local max_bytes, max_keys = tonumber(ARGV[3]), tonumber(ARGV[4])
local head = ARGV[5]
local big = max_bytes / tonumber(maxlen)
local out = {}
local a, k = 6, 1

local function renew(seq, hist, epoch, offset)
  -- the room's counter is gone or behind: one epoch, `offset` the newest in it
  redis.call('DEL', seq, hist)
  redis.call('HSET', seq, 'epoch', epoch, 'o:' .. epoch, offset)
end

while a <= #ARGV do
  local seq, hist, keys, order = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local channel, fresh, body, seen_at = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local mode = tonumber(ARGV[a + 4])
  local key, digest = '', ''
  k, a = k + 4, a + 5
  if mode >= 2 then
    key, digest = ARGV[a], ARGV[a + 1]
    a, mode = a + 2, mode - 2
  end
  local stored = false
  if key ~= '' then
    stored = redis.call('HGET', keys, key)
  end
  if stored then
    local p = string.find(stored, ':', 1, true)
    local q = string.find(stored, ':', p + 1, true)
    local flag = 1
    if string.sub(stored, q + 1) ~= digest then flag = 2 end
    out[#out + 1] = tonumber(string.sub(stored, 1, p - 1))
    out[#out + 1] = string.sub(stored, p + 1, q - 1)
    out[#out + 1] = flag
  else
    local epoch, offset, seen, seen_epoch = nil, nil, nil, nil
    if seen_at ~= '' then
      local c = string.find(seen_at, ':', 1, true)
      seen, seen_epoch = tonumber(string.sub(seen_at, 1, c - 1)), string.sub(seen_at, c + 1)
      offset = redis.call('HINCRBY', seq, 'o:' .. seen_epoch, 1)
      if offset == 1 then
        -- no counter for that epoch: not the room's epoch (or no room)
        redis.call('HDEL', seq, 'o:' .. seen_epoch)
        offset = nil
      else
        epoch = seen_epoch
      end
    end
    if offset == nil then
      epoch = redis.call('HGET', seq, 'epoch')
      if epoch then
        offset = redis.call('HINCRBY', seq, 'o:' .. epoch, 1)
        if offset == 1 then
          -- a room stored before offsets were counted per epoch
          offset = tonumber(redis.call('HGET', seq, 'offset') or 0) + 1
          redis.call('HSET', seq, 'o:' .. epoch, offset)
          redis.call('HDEL', seq, 'offset', 'refreshed')
        end
      else
        epoch, offset, mode = fresh, 1, 1  -- new keys: they get their TTLs now
        redis.call('DEL', keys, order)
        renew(seq, hist, epoch, offset)
      end
    end
    if epoch == seen_epoch and offset <= seen then
      -- behind what the pod saw in this epoch: Redis lost writes
      epoch, offset, mode = fresh, seen + 1, 1
      renew(seq, hist, epoch, offset)
    end
    redis.call('XADD', hist, 'MAXLEN', '~', maxlen, offset .. '-0', 'b', body)
    if #body > big then
      -- Count alone would not bound the history's bytes: trim by bytes.
      local total, kept = 0, nil
      for _, item in ipairs(redis.call('XREVRANGE', hist, '+', '-', 'COUNT', maxlen)) do
        local size = #item[2][2]
        if kept ~= nil and total + size > max_bytes then break end
        total = total + size
        kept = item[1]
      end
      redis.call('XTRIM', hist, 'MINID', kept)
    end
    if mode == 1 then
      redis.call('PEXPIRE', seq, ttl)
      redis.call('PEXPIRE', hist, ttl)
    end
    redis.call('PUBLISH', channel, head .. offset .. ':' .. epoch .. '\n' .. body)
    if key ~= '' then
      redis.call('HSET', keys, key, offset .. ':' .. epoch .. ':' .. digest)
      redis.call('ZADD', order, offset, key)
      if redis.call('ZCARD', order) > max_keys then
        local old = redis.call('ZPOPMIN', order, 1)
        redis.call('HDEL', keys, old[1])
      end
      redis.call('PEXPIRE', keys, ttl)
      redis.call('PEXPIRE', order, ttl)
    end
    out[#out + 1] = offset
    out[#out + 1] = epoch
    out[#out + 1] = 0
  end
end
return out
