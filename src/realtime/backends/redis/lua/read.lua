-- Read a room's position and a range of its stored history, atomically.
-- KEYS: seq hash, log stream. ARGV: after (-1: newest), limit, epoch or ''. Returns `{epoch
-- or nil, newest, first, [[id, [field, value]], ...]}`.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {false, 0, 1, {}}
end
local newest = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local after = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if ARGV[3] ~= '' and ARGV[3] ~= epoch then
  after = 0
end
local first = newest + 1
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #oldest > 0 then
  first = tonumber(string.match(oldest[1][1], '^(%d+)'))
end
local entries = {}
if limit > 0 then
  if after < 0 then
    entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], '(' .. after .. '-0', '+', 'COUNT', limit)
  end
end
return {epoch, newest, first, entries}
