-- Move a room to a new epoch if its stored position is behind what a pod has seen
-- in its epoch (Redis lost writes: a replica promoted before it had them).
-- KEYS: seq hash, history stream base. ARGV: the epoch seen, the newest offset seen,
-- the new epoch. Returns the room's epoch after the call (the new one, or the current
-- one if the room is not behind: another pod moved it already, or it is fine).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch ~= ARGV[1] then
  return epoch
end
convert(KEYS[1], epoch)
local hist = history_key(KEYS[1], epoch)
local seen = tonumber(ARGV[2])
if (newest_of(hist) or 0) >= seen then
  return epoch
end
-- the new epoch's stream: empty, its next offset above what was seen, with the
-- TTL the room had (the hash keeps its own)
local ttl = redis.call('PTTL', KEYS[1])
local moved = history_key(KEYS[1], ARGV[3])
redis.call('DEL', hist, moved)
empty_stream(moved, seen)
if ttl > 0 then
  redis.call('PEXPIRE', moved, math.max(1, ttl - SEQ_MARGIN))
end
redis.call('HDEL', KEYS[1], 'o:' .. epoch)
name_epoch(KEYS[1], ARGV[3])
return ARGV[3]
