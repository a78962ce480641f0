-- Move a room to a new epoch if its stored position is behind what a pod has seen
-- in its epoch (Redis lost writes: a replica promoted before it had them).
-- KEYS: seq hash, history stream. ARGV: the epoch seen, the newest offset seen, the new
-- epoch. Returns the room's epoch after the call (the new one, or the current one if the
-- room is not behind: another pod moved it already, or it is fine).
local state = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
if state[1] ~= ARGV[1] or tonumber(state[2]) >= tonumber(ARGV[2]) then
  return state[1]
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'offset', ARGV[2])
return ARGV[3]
