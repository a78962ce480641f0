-- Read a room's position and a range of its stored history, atomically.
-- KEYS: seq hash, log stream. ARGV: after (-1: newest), limit, epoch or '', history
-- length. Returns `{epoch or nil, newest, first, [[id, [field, value]], ...]}`.
-- The stream is trimmed approximately (whole nodes of entries at a time): it may hold
-- more than the history length, but what is read never reaches further back.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {false, 0, 1, {}}
end
-- the newest offset: counted per epoch (`o:<epoch>`; `offset` in rooms stored before)
local newest = tonumber(redis.call('HGET', KEYS[1], 'o:' .. epoch)
  or redis.call('HGET', KEYS[1], 'offset') or 0)
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
first = math.max(first, newest - tonumber(ARGV[4]) + 1, 1)
local entries = {}
if limit > 0 then
  if after < 0 then
    entries = redis.call('XREVRANGE', KEYS[2], '+', first .. '-0', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], math.max(after + 1, first) .. '-0', '+', 'COUNT', limit)
  end
end
return {epoch, newest, first, entries}
