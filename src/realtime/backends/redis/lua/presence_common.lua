-- Shared by the presence scripts (prepended to each when loaded). The room a
-- script works on is set by enter(): its pods set, its hashes' base name, its
-- channel and its name; this pod (pod), the TTL (ttl, ms) and the envelope
-- head (head) are the script's own.
local BURST_LIMIT = tonumber('@BURST@')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pod, ttl, head
local pods_key, base, channel, room, own, events
local function enter(room_pods, room_base, room_channel, room_name)
  pods_key, base, channel, room = room_pods, room_base, room_channel, room_name
  own = base .. pod
  events = {}
end
local function live_pods()
  return redis.call('ZRANGEBYSCORE', pods_key, now, '+inf')
end
local function present(pods, uid, except)
  for _, other in ipairs(pods) do
    if other ~= except and redis.call('HEXISTS', base .. other, uid) == 1 then
      return true
    end
  end
  return false
end
local function emit(kind, uid, name)
  local user = {id = uid, name = name}
  table.insert(events, cjson.encode({type = kind, room = room, user = user, ts = now}))
end
local function finish()
  if #events > BURST_LIMIT then
    -- A burst (mass reconnect): one member list instead of many events.
    local best, order = {}, {}
    for _, p in ipairs(live_pods()) do
      for _, raw in ipairs(redis.call('HVALS', base .. p)) do
        local m = cjson.decode(raw)
        local known = best[m.id]
        if not known then table.insert(order, m.id) end
        if not known or m.since < known.since then best[m.id] = {since = m.since, raw = raw} end
      end
    end
    table.sort(order, function(x, y)
      if best[x].since ~= best[y].since then return best[x].since < best[y].since end
      return x < y
    end)
    local parts = {}
    for _, uid in ipairs(order) do table.insert(parts, best[uid].raw) end
    events = {'{"type":"presence","room":' .. cjson.encode(room) .. ',"members":['
      .. table.concat(parts, ',') .. ']}'}
  end
  for _, payload in ipairs(events) do
    redis.call('PUBLISH', channel, head .. payload)
  end
  return events
end
local function keep_alive(full)
  -- This pod live in the room until `now + ttl` while it has members here.
  -- With `full`, both keys live `3 * ttl` more (PEXPIRE's answer says whether
  -- the pod's hash is there); without, their TTLs are left alone (set at most
  -- `ttl` ago: see presence_refresh.lua) and `XX` adds no TTL-less key.
  local here
  if full then
    here = redis.call('PEXPIRE', own, ttl * 3) == 1
  else
    here = redis.call('EXISTS', own) == 1
  end
  if not here then
    redis.call('ZREM', pods_key, pod)
  elseif full then
    redis.call('ZADD', pods_key, now + ttl, pod)
    redis.call('PEXPIRE', pods_key, ttl * 3)
  else
    redis.call('ZADD', pods_key, 'XX', now + ttl, pod)
  end
end
