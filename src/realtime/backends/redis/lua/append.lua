-- Append a room message: give it the room's next offset, store it, publish it.
-- KEYS: seq hash, history stream[, idempotency key]. ARGV: channel, epoch to use if the
-- room has none, history length, TTL in ms, message body (the JSON after
-- `{"type":"message",`), envelope head (pod id + newline). Returns `{offset, epoch,
-- duplicate}`. The body is stored and published as it is, with the offset and epoch
-- beside it (the envelope's second line: `<offset>:<epoch>`); the pods make the frame.
local idem = KEYS[3]
if idem then
  local seen = redis.call('GET', idem)
  if seen then
    local sep = string.find(seen, ':', 1, true)
    return {tonumber(string.sub(seen, 1, sep - 1)), string.sub(seen, sep + 1), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'b', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], ARGV[6] .. offset .. ':' .. epoch .. '\n' .. ARGV[5])
if idem then
  redis.call('SET', idem, offset .. ':' .. epoch, 'PX', ARGV[4])
end
return {offset, epoch, 0}
