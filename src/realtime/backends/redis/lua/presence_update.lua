-- Apply one pod's joins and leaves to a room's presence; publish the news.
-- KEYS: pods. ARGV: hash base, pod, ttl ms, channel, envelope head, room, number of joins,
-- joins as (id, name, since) triples, then leaving ids.
pod, ttl, head = ARGV[2], tonumber(ARGV[3]), ARGV[5]
enter(KEYS[1], ARGV[1], ARGV[4], ARGV[6])
local pods = live_pods()
local i = 8
for _ = 1, tonumber(ARGV[7]) do
  local uid, name, since = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if redis.call('HEXISTS', own, uid) == 0 then
    local known = present(pods, uid, pod)
    redis.call('HSET', own, uid, cjson.encode({id = uid, name = name, since = tonumber(since)}))
    if not known then emit('member_joined', uid, name) end
  end
end
while i <= #ARGV do
  local uid = ARGV[i]
  i = i + 1
  local raw = redis.call('HGET', own, uid)
  if raw then
    redis.call('HDEL', own, uid)
    if not present(pods, uid, pod) then emit('member_left', uid, cjson.decode(raw).name) end
  end
end
keep_alive(true)
return finish()
