"""Presence in Redis, shared by every pod: three Lua scripts.

Per room (one hash slot, the ``{room}`` hash tag):

* ``{prefix}:room:{<room>}:pods`` — a sorted set: pod id → the time (Redis
  clock, ms) its entries expire unless refreshed;
* ``{prefix}:room:{<room>}:presence:<pod>`` — a hash per pod: user id → JSON
  ``{"id", "name", "since"}``.

``SYNC`` applies one pod's joins and leaves and publishes ``member_joined`` /
``member_left`` only for users not present on another live pod. ``REFRESH``
pushes this pod's expiry forward and prunes pods whose expiry passed,
publishing ``member_left`` for their users not present elsewhere. ``MEMBERS``
lists the users of live pods. Event frames are published on the room channel
with this pod's envelope (other pods deliver them) and returned (this pod
delivers them itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import orjson

from ...rooms.presence import PRESENCE_BURST, Member

if TYPE_CHECKING:
    from .backend import RedisBroadcaster

__all__ = ["RedisPresence"]

_COMMON: Final = """
local BURST_LIMIT = @BURST@
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base, pod, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local own = base .. pod
local events = {}
local function live_pods()
  return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
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
  table.insert(events, cjson.encode({type = kind, room = ARGV[6], user = user, ts = now}))
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
    events = {'{"type":"presence","room":' .. cjson.encode(ARGV[6]) .. ',"members":['
      .. table.concat(parts, ',') .. ']}'}
  end
  for _, payload in ipairs(events) do
    redis.call('PUBLISH', ARGV[4], ARGV[5] .. payload)
  end
  return events
end
local function keep_alive()
  if redis.call('EXISTS', own) == 1 then
    redis.call('ZADD', KEYS[1], now + ttl, pod)
    redis.call('PEXPIRE', own, ttl * 3)
    redis.call('PEXPIRE', KEYS[1], ttl * 3)
  else
    redis.call('ZREM', KEYS[1], pod)
  end
end
""".replace("@BURST@", str(PRESENCE_BURST))

SYNC: Final = (
    _COMMON
    + """
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
keep_alive()
return finish()
"""
)
"""KEYS: pods. ARGV: hash base, pod, ttl ms, channel, envelope head, room,
number of joins, joins as (id, name, since) triples, then leaving ids."""

REFRESH: Final = (
    _COMMON
    + """
keep_alive()
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
if #dead == 0 then return events end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
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
"""
)
"""KEYS: pods. ARGV: hash base, pod, ttl ms, channel, envelope head, room."""

MEMBERS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, pod in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  for _, raw in ipairs(redis.call('HVALS', ARGV[1] .. pod)) do
    table.insert(out, raw)
  end
end
return out
"""
"""KEYS: pods. ARGV: hash base. Returns the JSON entries of live pods."""


class RedisPresence:
    """``PresenceBackend`` over the Redis broadcaster's command connection."""

    def __init__(self, broadcaster: RedisBroadcaster, *, ttl: float) -> None:
        self._broadcaster = broadcaster
        self._prefix = broadcaster.channel_prefix
        self._pod = broadcaster.pod_id
        self._ttl_ms = max(1, int(ttl * 1000))
        self._envelope = broadcaster.pod_id.encode() + b"\n"

    def _keys(self, room: str) -> tuple[str, str]:
        base = f"{self._prefix}:room:{{{room}}}"
        return f"{base}:pods", f"{base}:presence:"

    def _args(self, room: str) -> list[Any]:
        _, base = self._keys(room)
        channel = f"{self._prefix}:room:{room}"
        return [base, self._pod, self._ttl_ms, channel, self._envelope, room]

    async def sync(self, room: str, joins: list[Member], leaves: list[str]) -> list[bytes]:
        pods, _ = self._keys(room)
        args = [*self._args(room), len(joins)]
        for member in joins:
            args += [member.id, member.name, member.since]
        args += leaves
        reply = await self._broadcaster.run_script(SYNC, [pods], args)
        return [bytes(event) for event in reply]

    async def refresh(self, rooms: list[str]) -> list[tuple[str, bytes]]:
        events: list[tuple[str, bytes]] = []
        for room in rooms:
            pods, _ = self._keys(room)
            reply = await self._broadcaster.run_script(REFRESH, [pods], self._args(room))
            events += [(room, bytes(event)) for event in reply]
        return events

    async def members(self, room: str) -> list[Member]:
        pods, base = self._keys(room)
        reply = await self._broadcaster.run_script(MEMBERS, [pods], [base])
        merged: dict[str, Member] = {}
        for raw in reply:
            entry = orjson.loads(raw)
            member = Member(str(entry["id"]), str(entry["name"]), int(entry["since"]))
            known = merged.get(member.id)
            if known is None or member.since < known.since:
                merged[member.id] = member
        return sorted(merged.values(), key=lambda m: (m.since, m.id))
