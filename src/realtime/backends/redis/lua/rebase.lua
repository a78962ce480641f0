-- Move a room to a new epoch if its stored position is behind what a pod has seen
-- in its epoch (Redis lost writes: a replica promoted before it had them).
-- KEYS: seq hash, history stream. ARGV: the epoch seen, the newest offset seen, the new
-- epoch. Returns the room's epoch after the call (the new one, or the current one if the
-- room is not behind: another pod moved it already, or it is fine).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch ~= ARGV[1] then
  return epoch
end
-- the newest offset: counted per epoch (`o:<epoch>`; `offset` in rooms stored before)
local newest = tonumber(redis.call('HGET', KEYS[1], 'o:' .. epoch)
  or redis.call('HGET', KEYS[1], 'offset') or 0)
if newest >= tonumber(ARGV[2]) then
  return epoch
end
-- emptied, not deleted: both keys keep their TTLs (an append recreating a deleted
-- stream would leave it without one until the next refresh)
redis.call('XTRIM', KEYS[2], 'MAXLEN', 0)
redis.call('HDEL', KEYS[1], 'o:' .. epoch, 'offset', 'refreshed')
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'o:' .. ARGV[3], ARGV[2])
return ARGV[3]
