-- Read a room's position and a range of its stored history, atomically.
-- KEYS: seq hash, history stream base (`<base>:hist`: the epoch's stream is
-- `<base>:hist:<epoch>`). ARGV: after (-1: newest), limit, epoch or '', history
-- length. Returns `{epoch or nil, newest, first, [[id, [field, value]], ...]}`, IDs
-- `0-<offset>`. The stream is trimmed approximately (whole nodes of entries at a
-- time): it may hold more than the history length, but what is read never reaches
-- further back.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {false, 0, 1, {}}
end
convert(KEYS[1], epoch)
local hist = history_key(KEYS[1], epoch)
local newest = newest_of(hist)
if newest == nil then
  -- the history ran out first (it expires before the hash): no room
  return {false, 0, 1, {}}
end
local after = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if ARGV[3] ~= '' and ARGV[3] ~= epoch then
  after = 0
end
local first = newest + 1
local oldest = redis.call('XRANGE', hist, '-', '+', 'COUNT', 1)
if #oldest > 0 then
  first = tonumber(string.sub(oldest[1][1], 3))
end
first = math.max(first, newest - tonumber(ARGV[4]) + 1, 1)
local entries = {}
if limit > 0 then
  if after < 0 then
    entries = redis.call('XREVRANGE', hist, '+', '0-' .. first, 'COUNT', limit)
  else
    entries = redis.call('XRANGE', hist, '0-' .. math.max(after + 1, first), '+', 'COUNT', limit)
  end
end
return {epoch, newest, first, entries}
