-- Keep one pod's presence entries alive in many rooms; prune pods that stopped
-- refreshing. KEYS: each room's pods set. ARGV: pod, ttl ms, envelope head, then
-- per room: hash base, channel, room. Returns each room's events (a list per room).
pod, ttl, head = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
for k = 1, #KEYS do
  local a = 4 + 3 * (k - 1)
  enter(KEYS[k], ARGV[a], ARGV[a + 1], ARGV[a + 2])
  keep_alive()
  local dead = redis.call('ZRANGEBYSCORE', pods_key, '-inf', '(' .. now)
  if #dead == 0 then
    out[k] = events
  else
    redis.call('ZREMRANGEBYSCORE', pods_key, '-inf', '(' .. now)
    local pods = live_pods()
    local told = {}
    for _, gone in ipairs(dead) do
      local entries = redis.call('HGETALL', base .. gone)
      redis.call('DEL', base .. gone)
      for e = 1, #entries, 2 do
        local uid = entries[e]
        if not told[uid] and not present(pods, uid, nil) then
          told[uid] = true
          emit('member_left', uid, cjson.decode(entries[e + 1]).name)
        end
      end
    end
    out[k] = finish()
  end
end
return out
