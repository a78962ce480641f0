-- Append room messages, one or many in one call: give each its room's next
-- offset, store it in the room's history, publish it on the room's channel.
-- KEYS: four per message: the room's seq hash, history stream, keys hash, key order.
-- ARGV: TTL in ms, history length, history bytes, most keys kept, envelope head (pod
-- id + newline), now (ms, the pod's clock); then six per message: channel, epoch to use
-- if the room has none (or a new one), body (the JSON after `{"type":"message",`), key
-- ('' for none), digest of its data, and `<offset>:<epoch>`: the newest entry of the room
-- the pod has seen ('' if none).
-- Returns three per message: offset, epoch, flag (0 stored; 1 its key's message is
-- stored already: that one's offset and epoch; 2 its key names other data: not stored).
-- The body is stored and published as it is; the envelope's second line is
-- `<offset>:<epoch>`; pods build the frame. Per message this is one hash read, one
-- increment, one XADD (exact MAXLEN) and one PUBLISH; the TTLs are refreshed only when
-- an eighth of them has passed, and the history's bytes counted only when a message is
-- big enough for the count alone not to bound them. If the room is behind what the pod
-- has seen in its epoch (Redis lost writes: a replica promoted before it had them), the
-- room starts a new epoch above that offset, so no offset ever names two messages.
local ttl, maxlen = tonumber(ARGV[1]), ARGV[2]
local max_bytes, max_keys = tonumber(ARGV[3]), tonumber(ARGV[4])
local head, now = ARGV[5], tonumber(ARGV[6])
local big = max_bytes / tonumber(maxlen)
local out = {}
local a = 7
for k = 1, #KEYS, 4 do
  local seq, hist, keys, order = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local channel, fresh, body, key, digest = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local seen_at = ARGV[a + 5]
  a = a + 6
  local seen = false
  if key ~= '' then
    seen = redis.call('HGET', keys, key)
  end
  if seen then
    local p = string.find(seen, ':', 1, true)
    local q = string.find(seen, ':', p + 1, true)
    local flag = 1
    if string.sub(seen, q + 1) ~= digest then flag = 2 end
    out[#out + 1] = tonumber(string.sub(seen, 1, p - 1))
    out[#out + 1] = string.sub(seen, p + 1, q - 1)
    out[#out + 1] = flag
  else
    local state = redis.call('HMGET', seq, 'epoch', 'refreshed', 'offset')
    local epoch, refreshed = state[1], tonumber(state[2])
    if not epoch then
      epoch = fresh
      redis.call('DEL', hist, keys, order)
      redis.call('HSET', seq, 'epoch', epoch, 'offset', 0)
    elseif seen_at ~= '' then
      local c = string.find(seen_at, ':', 1, true)
      local seen = tonumber(string.sub(seen_at, 1, c - 1))
      if string.sub(seen_at, c + 1) == epoch and tonumber(state[3]) < seen then
        epoch = fresh
        redis.call('DEL', hist)
        redis.call('HSET', seq, 'epoch', epoch, 'offset', seen)
      end
    end
    local offset = redis.call('HINCRBY', seq, 'offset', 1)
    redis.call('XADD', hist, 'MAXLEN', maxlen, offset .. '-0', 'b', body)
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
    if refreshed == nil or now - refreshed > ttl / 8 or now < refreshed then
      redis.call('PEXPIRE', seq, ttl)
      redis.call('PEXPIRE', hist, ttl)
      redis.call('HSET', seq, 'refreshed', now)
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
