"""Presence: who is in each room, across pods, with coalesced join/leave events.

Each pod tracks its own live members per room (a user with several
connections counts once, ``since`` its first). Every ``flush_interval`` the
rooms that changed are written to the backend's ``PresenceStore`` as the
difference between what the pod last wrote and what it has now — so a user
who leaves and comes back within the interval (a reconnect) causes no event
at all. The store decides which changes are news to the room (a user still
present on another pod neither joins nor leaves) and returns the event
frames, which this pod hands to ``deliver`` (the node's way in for unordered
messages, the same that other pods' events take; the Redis store publishes
them to the other pods itself).

Each pod refreshes its entries every ``ttl / 3``; the entries of a pod that
stops refreshing (killed) vanish from every list after ``ttl`` and are pruned,
with ``member_left`` events for users not present elsewhere, by the next
refresh of any pod hosting the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends.base import Member, PresenceStore
from ..core.connection import Connection
from ..core.exceptions import BroadcastError
from ..core.hub import LocalHub

__all__ = ["Presence"]

log = logging.getLogger("realtime.presence")


@dataclass(slots=True)
class _Local:
    name: str
    since: int
    connections: tuple[str, ...]
    """Ids of the user's connections in the room: a tuple, because it almost
    always holds one (a set of one costs 216 bytes, a tuple of one 48)."""


def _with(items: tuple[str, ...], item: str) -> tuple[str, ...]:
    return items if item in items else (*items, item)


def _without(items: tuple[str, ...], item: str) -> tuple[str, ...]:
    return tuple(i for i in items if i != item) if item in items else items


class Presence:
    """This pod's side of presence: local tracking, flushing and refreshing."""

    def __init__(
        self,
        hub: LocalHub,
        store: PresenceStore,
        *,
        deliver: Callable[[str, bytes], None],
        ttl: float = 15.0,
        flush_interval: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._hub = hub
        self._store = store
        self._deliver_event = deliver
        self.ttl = ttl
        self._flush_interval = flush_interval
        self._clock = clock
        self._local: dict[str, dict[str, _Local]] = {}
        self._by_connection: dict[str, tuple[str, ...]] = {}
        """Rooms each connection is present in (tuples, like ``_Local``)."""
        self._written: dict[str, dict[str, None]] = {}
        """Users this pod last wrote to the store, per room: an ordered set
        (keys only: a ``Member`` per user would cost 56 bytes more)."""
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.events_sent = 0
        self.failures = 0
        self._failing = False

    # -- local changes (never await) -----------------------------------------

    def join(self, conn: Connection, room: str) -> None:
        self._by_connection[conn.id] = _with(self._by_connection.get(conn.id, ()), room)
        members = self._local.setdefault(room, {})
        entry = members.get(conn.identity.id)
        if entry is None:
            now = int(self._clock() * 1000)
            members[conn.identity.id] = _Local(conn.identity.name, now, (conn.id,))
            self._mark(room)
        else:
            entry.connections = _with(entry.connections, conn.id)

    def leave(self, conn: Connection, room: str) -> None:
        rooms = _without(self._by_connection.get(conn.id, ()), room)
        if rooms:
            self._by_connection[conn.id] = rooms
        else:
            self._by_connection.pop(conn.id, None)
        members = self._local.get(room)
        entry = None if members is None else members.get(conn.identity.id)
        if members is None or entry is None:
            return
        entry.connections = _without(entry.connections, conn.id)
        if not entry.connections:
            del members[conn.identity.id]
            if not members:
                del self._local[room]
            self._mark(room)

    def drop(self, conn: Connection) -> None:
        """The connection is gone: it leaves every room it was present in."""
        for room in self._by_connection.get(conn.id, ()):
            self.leave(conn, room)

    def _mark(self, room: str) -> None:
        self._dirty.add(room)
        self._wake.set()

    # -- queries ------------------------------------------------------------------

    async def members(self, room: str) -> list[Member]:
        """Everyone in ``room`` on every pod; raises ``BroadcastError``."""
        return await self._store.members(room)

    # -- background ------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._flusher(), name="presence-flush"),
            loop.create_task(self._refresher(), name="presence-refresh"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    async def stop(self) -> None:
        """Stop writing. Entries left behind expire after ``ttl``: clients
        that reconnect to another pod meanwhile cause no join/leave event."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("presence task %s crashed", task.get_name(), exc_info=exc)

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            # Coalesce: whatever changes within the interval is written once.
            await asyncio.sleep(self._flush_interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write every changed room's difference to the store."""
        rooms, self._dirty = self._dirty, set()
        for room in rooms:
            local = self._local.get(room, {})
            written = self._written.get(room, {})
            joins = [
                Member(uid, entry.name, entry.since)
                for uid, entry in local.items()
                if uid not in written
            ]
            leaves = [uid for uid in written if uid not in local]
            if not joins and not leaves:
                continue
            try:
                events = await self._store.update(room, joins, leaves)
            except BroadcastError as exc:
                self._failed(exc)
                self._dirty.add(room)  # retried at the next flush
                self._wake.set()
                continue
            self._recovered()
            now_written = self._written.setdefault(room, {})
            for member in joins:
                now_written[member.id] = None
            for uid in leaves:
                now_written.pop(uid, None)
            if not now_written:
                del self._written[room]
            self._deliver(room, events)

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)  # the heartbeat period
            rooms = sorted(set(self._written) | set(self._hub.rooms()))
            if not rooms:
                continue
            try:
                events = await self._store.refresh(rooms)
            except BroadcastError as exc:
                self._failed(exc)
                continue
            self._recovered()
            for room, event in events:
                self._deliver(room, [event])

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if not self._failing:  # once per outage
            self._failing = True
            log.warning("presence cannot be written (%s); retrying", exc)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("presence is written again")

    def _deliver(self, room: str, events: list[bytes]) -> None:
        for event in events:
            self._deliver_event(room, event)
        self.events_sent += len(events)

    def stats(self) -> dict[str, Any]:
        return {
            "rooms": len(self._local),
            "members": sum(len(m) for m in self._local.values()),
            "events_sent": self.events_sent,
            "failures": self.failures,
            "ttl_s": self.ttl,
        }
