-- Keep one pod's presence entries alive; prune pods that stopped refreshing.
-- KEYS: pods. ARGV: hash base, pod, ttl ms, channel, envelope head, room.
pod, ttl, head = ARGV[2], tonumber(ARGV[3]), ARGV[5]
enter(KEYS[1], ARGV[1], ARGV[4], ARGV[6])
keep_alive()
local dead = redis.call('ZRANGEBYSCORE', pods_key, '-inf', '(' .. now)
if #dead == 0 then return events end
redis.call('ZREMRANGEBYSCORE', pods_key, '-inf', '(' .. now)
local pods = live_pods()
local told = {}
for _, gone in ipairs(dead) do
  local entries = redis.call('HGETALL', base .. gone)
  redis.call('DEL', base .. gone)
  for k = 1, #entries, 2 do
    local uid = entries[k]
    if not told[uid] and not present(pods, uid, nil) then
      told[uid] = true
      emit('member_left', uid, cjson.decode(entries[k + 1]).name)
    end
  end
end
return finish()
