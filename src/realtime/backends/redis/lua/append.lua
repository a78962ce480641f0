-- Append room messages, one or many in one call: give each its room's next
-- offset, store it in the room's history, publish it on the room's channel.
-- KEYS: four per message: the room's seq hash, the history stream of the epoch the pod
-- saw (`<base>:hist:<epoch>`; `<base>:hist:` if it saw none), keys hash, key order.
-- ARGV: TTL in ms, history length, history bytes, most keys kept, envelope head (pod id +
-- newline), a fresh epoch (for a room that needs one); then per message: channel, body
-- (the JSON after `{"type":"message",`), the newest offset and the epoch of the room the
-- pod has seen ('' and '' if none), and a mode: 0, or the sum of 1 (refresh the TTLs)
-- and 2 (a key follows: two more arguments, the key and the digest of its data).
-- Returns three per message: offset, epoch, flag (0 stored; 1 its key's message is
-- stored already: that one's offset and epoch; 2 its key names other data: not stored).
-- The common case is one XADD (`NOMKSTREAM`, `0-*`: the stream of the epoch the pod saw
-- gives the next offset, or nothing if the room is no longer in that epoch) and one
-- PUBLISH. Otherwise the room's epoch is read from the seq hash (a room of an earlier
-- layout is converted) and the message appended there; a room with no stored state
-- starts a new epoch at offset 1. If the room is behind what the pod has seen in its
-- epoch (Redis lost writes: a replica promoted before it had them), the room starts a
-- new epoch above that offset, so no offset ever names two messages. The history is
-- trimmed approximately (`MAXLEN ~`: whole nodes of entries; the read script never
-- reads past the history length). The body is stored and published as it is; the
-- envelope's second line is `<offset>:<epoch>`; pods build the frame. The pod asks for
-- the TTLs to be refreshed when an eighth of them has passed since it last did.
local ttl, maxlen = tonumber(ARGV[1]), ARGV[2]
local max_bytes, max_keys = tonumber(ARGV[3]), tonumber(ARGV[4])
local head, fresh = ARGV[5], ARGV[6]
local big = max_bytes / tonumber(maxlen)
local out = {}
local a, k = 7, 1

while a <= #ARGV do
  local seq, hist, keys, order = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local channel, body, seen, seen_epoch = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
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
    local epoch, id = seen_epoch, false
    if seen_epoch ~= '' then
      id = redis.call('XADD', hist, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '0-*', 'b', body)
    end
    if not id then
      -- not the room's epoch (or no room): read the room's own
      epoch = redis.call('HGET', seq, 'epoch')
      if epoch then
        convert(seq, epoch)
        hist = history_key(seq, epoch)
        id = redis.call('XADD', hist, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '0-*', 'b', body)
      end
    end
    local offset = '1'
    if id then
      offset = string.sub(id, 3)
      if epoch == seen_epoch and tonumber(offset) <= tonumber(seen) then
        -- behind what the pod saw in this epoch: Redis lost writes
        offset, id = tostring(seen + 1), false
      end
    end
    if not id then
      -- a new room, one whose history is gone, or one set back: a new epoch
      if epoch then
        redis.call('DEL', history_key(seq, epoch))
      else
        redis.call('DEL', keys, order)  -- new keys: they get their TTLs now
      end
      epoch, mode = fresh, 1
      hist = history_key(seq, epoch)
      redis.call('DEL', seq, hist)
      name_epoch(seq, epoch)
      redis.call('XADD', hist, '0-' .. offset, 'b', body)
    end
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
      redis.call('PEXPIRE', seq, ttl + SEQ_MARGIN)
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
