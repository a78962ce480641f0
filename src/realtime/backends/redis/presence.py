"""Presence in Redis, shared by every pod: three Lua scripts.

Per room (one hash slot, the ``{room}`` hash tag):

* ``{prefix}:room:{<room>}:pods`` — a sorted set: pod id → the time (Redis
  clock, ms) its entries expire unless refreshed;
* ``{prefix}:room:{<room>}:presence:<pod>`` — a hash per pod: user id → JSON
  ``{"id", "name", "since"}``.

``presence_update.lua`` applies one pod's joins and leaves and publishes ``member_joined`` /
``member_left`` only for users not present on another live pod. ``presence_refresh.lua``
pushes this pod's expiry forward and prunes pods whose expiry passed,
publishing ``member_left`` for their users not present elsewhere, for up to
``REFRESH_ROOMS`` rooms a call (on a Cluster, rooms of one slot a call); the
keys' TTLs (three times the presence TTL) it pushes forward only once a TTL
(``RedisPresence.refresh``), not at every refresh. ``presence_members.lua``
lists the users of live pods. Event frames are published on the room channel
with this pod's envelope (other pods deliver them) and returned (this pod
delivers them itself).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ..base import Member
from .names import Names
from .scripts import PRESENCE_MEMBERS, PRESENCE_REFRESH, PRESENCE_UPDATE, Script
from .slots import key_slot

__all__ = ["REFRESH_ROOMS", "RedisPresence", "RunScript", "RunScripts"]

REFRESH_ROOMS = 100
"""Rooms per call of the refresh script: Redis's fixed cost of a script call
is shared by this many rooms, and one call still holds Redis for well under a
millisecond."""

RunScript = Callable[[Script, list[str], list[Any]], Awaitable[Any]]
"""Runs one of the backend's scripts with these keys and arguments; raises
``BroadcastError`` on link trouble."""
RunScripts = Callable[[Script, list[tuple[list[str], list[Any]]]], Awaitable[list[Any]]]
"""``RunScript`` for many ``(keys, args)``, one round trip per primary."""


class RedisPresence:
    """``PresenceStore`` through the Redis backend's command connection."""

    def __init__(
        self,
        run_script: RunScript,
        run_scripts: RunScripts,
        names: Names,
        *,
        pod_id: str,
        ttl: float,
    ) -> None:
        self._run = run_script
        self._run_many = run_scripts
        self._names = names
        self._pod = pod_id
        self._ttl_ms = max(1, int(ttl * 1000))
        self._full_every = 0.9 * ttl
        """A refresh pushes the keys' TTLs forward too once this long has
        passed since the last one that did: every third refresh (they come
        every third of the TTL), the keys living three TTLs."""
        self._full_at = float("-inf")
        """When the last refresh that pushed the TTLs forward succeeded (monotonic)."""

    def _keys(self, room: str) -> tuple[str, str]:
        return self._names.presence_keys(room)

    def _args(self, room: str) -> list[Any]:
        _, base = self._keys(room)
        channel = self._names.channel(room)
        return [base, self._pod, self._ttl_ms, channel, self._names.envelope, room]

    async def update(self, room: str, joins: list[Member], leaves: list[str]) -> list[bytes]:
        pods, _ = self._keys(room)
        args = [*self._args(room), len(joins)]
        for member in joins:
            args += [member.id, member.name, member.since]
        args += leaves
        reply = await self._run(PRESENCE_UPDATE, [pods], args)
        return [bytes(event) for event in reply]

    async def refresh(self, rooms: list[str]) -> list[tuple[str, bytes]]:
        # every room's refresh in one round trip per primary, and up to
        # REFRESH_ROOMS rooms in each script call: a pod hosting thousands of
        # rooms wakes itself and Redis once per period, and Redis pays a
        # script call's own cost once per hundred rooms, not once per room
        by_slot: dict[int, list[list[str]]] = {}
        for room in rooms:
            slot = key_slot(self._keys(room)[0].encode()) if self._names.sharded else 0
            chunks = by_slot.setdefault(slot, [[]])
            if len(chunks[-1]) == REFRESH_ROOMS:
                chunks.append([])
            chunks[-1].append(room)
        batches = [chunk for chunks in by_slot.values() for chunk in chunks]
        # The TTLs too once a TTL; the other refreshes only push the pod's
        # expiry forward and prune: three commands a room instead of four.
        started = time.monotonic()
        full = started - self._full_at >= self._full_every
        calls = []
        for chunk in batches:
            keys: list[str] = []
            args: list[Any] = [self._pod, self._ttl_ms, self._names.envelope, int(full)]
            for room in chunk:
                pods, base = self._keys(room)
                keys.append(pods)
                args += [base, self._names.channel(room), room]
            calls.append((keys, args))
        replies = await self._run_many(PRESENCE_REFRESH, calls)
        if full:
            self._full_at = started
        events: dict[str, list[bytes]] = {}
        for chunk, reply in zip(batches, replies, strict=True):
            for room, room_events in zip(chunk, reply, strict=True):
                if room_events:
                    events[room] = [bytes(event) for event in room_events]
        return [(room, event) for room in rooms for event in events.get(room, ())]

    async def members(self, room: str) -> list[Member]:
        pods, base = self._keys(room)
        reply = await self._run(PRESENCE_MEMBERS, [pods], [base])
        merged: dict[str, Member] = {}
        for raw in reply:
            entry = orjson.loads(raw)
            member = Member(str(entry["id"]), str(entry["name"]), int(entry["since"]))
            known = merged.get(member.id)
            if known is None or member.since < known.since:
                merged[member.id] = member
        return sorted(merged.values(), key=lambda m: (m.since, m.id))
