-- Everyone present in a room on a live pod.
-- KEYS: pods. ARGV: hash base. Returns the JSON entries of live pods.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, pod in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  for _, raw in ipairs(redis.call('HVALS', ARGV[1] .. pod)) do
    table.insert(out, raw)
  end
end
return out
