-- Keep one pod's presence entries alive in many rooms; prune pods that stopped
-- refreshing. KEYS: each room's pods set. ARGV: pod, ttl ms, envelope head, full
-- (1: the keys' TTLs too, which the pod asks for once a `ttl`; 0: the pod's expiry
-- only), then per room: hash base, channel, room. Returns each room's events (a
-- list per room).
-- A pruned pod may have died between storing a room message and publishing it (a
-- pod appends a room it has verified with a plain XADD, then PUBLISH: at most
-- TAIL messages of a room at a time): the room's last TAIL entries are published
-- again, in the dead pod's name; pods drop the offsets they have.
local TAIL = tonumber('@TAIL@')
pod, ttl, head = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local full = ARGV[4] == '1'
local function republish_tail(gone)
  local seq = string.sub(base, 1, -10) .. 'seq'  -- `<base>:presence:` -> `<base>:seq`
  local epoch = redis.call('HGET', seq, 'epoch')
  if not epoch then
    return
  end
  local hist = string.sub(seq, 1, -4) .. 'hist:' .. epoch
  local tail = redis.call('XREVRANGE', hist, '+', '-', 'COUNT', TAIL)
  for i = #tail, 1, -1 do
    local id, fields = tail[i][1], tail[i][2]
    local envelope = gone .. '\n' .. string.sub(id, 3) .. ':' .. epoch .. '\n' .. fields[2]
    redis.call('PUBLISH', channel, envelope)
  end
end
local out = {}
for k = 1, #KEYS do
  local a = 5 + 3 * (k - 1)
  enter(KEYS[k], ARGV[a], ARGV[a + 1], ARGV[a + 2])
  keep_alive(full)
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
    republish_tail(dead[#dead])
  end
end
return out
