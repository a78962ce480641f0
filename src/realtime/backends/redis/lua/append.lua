-- Append a room message: give it the room's next offset, store it, publish it.
-- KEYS: seq hash, history stream, keys hash, key order (sorted set).
-- ARGV: channel, epoch to use if the room has none, history length, TTL in ms, message
-- body (the JSON after `{"type":"message",`), envelope head (pod id + newline), history
-- bytes, key field ('' for none), content digest, most keys kept.
-- Returns `{offset, epoch, flag}`: flag 0 stored, 1 a duplicate of its key's message (the
-- stamp is that one's), 2 its key names a message with other content (nothing stored).
-- The body is stored and published as it is, with the offset and epoch beside it (the
-- envelope's second line: `<offset>:<epoch>`); the pods make the frame.
local key = ARGV[8]
if key ~= '' then
  local seen = redis.call('HGET', KEYS[3], key)
  if seen then
    local a = string.find(seen, ':', 1, true)
    local b = string.find(seen, ':', a + 1, true)
    local flag = 1
    if string.sub(seen, b + 1) ~= ARGV[9] then flag = 2 end
    return {tonumber(string.sub(seen, 1, a - 1)), string.sub(seen, a + 1, b - 1), flag}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'bytes', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local body = ARGV[5]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'b', body)
-- History bytes: a running sum (an overestimate once the count trims), recounted
-- and trimmed exactly when it passes the limit.
local max_bytes = tonumber(ARGV[7])
if redis.call('HINCRBY', KEYS[1], 'bytes', #body) > max_bytes then
  local total, keep = 0, nil
  for _, item in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-')) do
    local size = #item[2][2]
    if keep ~= nil and total + size > max_bytes then break end
    total = total + size
    keep = item[1]
  end
  redis.call('XTRIM', KEYS[2], 'MINID', keep)
  redis.call('HSET', KEYS[1], 'bytes', total)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], ARGV[6] .. offset .. ':' .. epoch .. '\n' .. body)
if key ~= '' then
  redis.call('HSET', KEYS[3], key, offset .. ':' .. epoch .. ':' .. ARGV[9])
  redis.call('ZADD', KEYS[4], offset, key)
  local extra = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[10])
  if extra > 0 then
    local old = redis.call('ZPOPMIN', KEYS[4], extra)
    for i = 1, #old, 2 do redis.call('HDEL', KEYS[3], old[i]) end
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
end
return {offset, epoch, 0}
