"""LocalHub: the rooms and members of this pod, and local fan-out.

No I/O and no awaits: a broadcast wraps the payload once and hands the same
``Outgoing`` to every member's connection, which queues it without blocking.
Membership changes say what they changed: ``join`` whether the member is the
room's first on this pod, ``leave`` and ``remove`` whether they emptied it,
so the caller (the node) subscribes the backend to exactly the rooms that
have local members. Nothing is pushed to a watcher.

A member that is too slow is closed with 1013 by its connection and counted
here, but stays a member until its transport reports it gone (the node then
calls ``remove``): a broadcast never changes membership in the middle of a
loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .connection import QUEUED, Connection, ConnectionState, Outgoing

__all__ = ["HubCounters", "LocalHub"]


@dataclass(slots=True)
class HubCounters:
    broadcasts: int = 0
    deliveries: int = 0
    slow_client_disconnects: int = 0


class LocalHub:
    """Membership by room, and delivery to local members."""

    def __init__(self) -> None:
        self._connections: dict[str, Connection] = {}
        self._rooms: dict[str, dict[str, Connection]] = {}
        self._waiting: dict[str, dict[str, Connection]] = {}
        """Members still catching up (history, resume): they count as members
        but get no live frames until ``go_live``."""
        self.counters = HubCounters()

    # -- membership -------------------------------------------------------

    def add(self, conn: Connection) -> None:
        self._connections[conn.id] = conn

    def remove(self, conn: Connection) -> list[str]:
        """Forget a connection and leave all its rooms (idempotent); returns
        the rooms it was the last local member of."""
        if self._connections.pop(conn.id, None) is None:
            return []
        return [room for room in conn.rooms if self.leave(conn, room)]

    def join(self, conn: Connection, room: str, *, live: bool = True) -> bool:
        """Add ``conn`` to ``room``; with ``live=False`` it waits (no live
        frames) until ``go_live``, so a catch-up can be sent first. Returns
        whether the room had no local member before."""
        first = room not in self._rooms and room not in self._waiting
        table = self._rooms if live else self._waiting
        table.setdefault(room, {})[conn.id] = conn
        if room not in conn.rooms:
            conn.rooms = (*conn.rooms, room)
        return first

    def is_waiting(self, conn: Connection, room: str) -> bool:
        return conn.id in self._waiting.get(room, ())

    def go_live(self, conn: Connection, room: str) -> bool:
        """Move a waiting member to live delivery; False if it is gone."""
        waiting = self._waiting.get(room)
        if waiting is None or waiting.pop(conn.id, None) is None:
            return False
        if not waiting:
            del self._waiting[room]
        self._rooms.setdefault(room, {})[conn.id] = conn
        return True

    def leave(self, conn: Connection, room: str) -> bool:
        """Take ``conn`` out of ``room``; returns whether that left the room
        with no local member."""
        if room in conn.rooms:
            conn.rooms = tuple(r for r in conn.rooms if r != room)
        removed = False
        for table in (self._rooms, self._waiting):
            members = table.get(room)
            if members is not None and members.pop(conn.id, None) is not None:
                removed = True
                if not members:
                    del table[room]
        return removed and room not in self._rooms and room not in self._waiting

    # -- queries ----------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    def room_sizes(self) -> dict[str, int]:
        sizes = {room: len(members) for room, members in self._rooms.items()}
        for room, members in self._waiting.items():
            sizes[room] = sizes.get(room, 0) + len(members)
        return sizes

    def rooms(self) -> list[str]:
        """The rooms with local members (live or waiting)."""
        return [*self._rooms, *(room for room in self._waiting if room not in self._rooms)]

    def has_room(self, room: str) -> bool:
        return room in self._rooms or room in self._waiting

    # -- delivery ---------------------------------------------------------

    def broadcast(self, room: str | None, payload: bytes) -> int:
        """Deliver a JSON payload to a room's live members, or to every
        connection if ``room`` is None. Never awaits; returns how many
        members it was queued for."""
        if room is None:
            members: Iterable[Connection] = self._connections.values()
        else:
            room_members = self._rooms.get(room)
            if room_members is None:
                return 0
            members = room_members.values()
        out = Outgoing(payload)
        sent = slow = 0
        for conn in members:
            result = conn.deliver(out)
            if result == QUEUED:
                sent += 1
            elif result:
                slow += 1
        counters = self.counters
        counters.broadcasts += 1
        counters.deliveries += sent
        counters.slow_client_disconnects += slow
        return sent

    def send_to(self, conn: Connection, payload: bytes) -> bool:
        """Send a payload to one member, with the same slow-client policy."""
        result = conn.deliver(Outgoing(payload))
        if result == QUEUED:
            return True
        if result:
            self.counters.slow_client_disconnects += 1
        return False

    def close_all(self, code: int, reason: str) -> int:
        """Start closing every open connection; returns how many."""
        count = 0
        for conn in list(self._connections.values()):
            if conn.state is ConnectionState.OPEN:
                conn.close(code, reason)
                count += 1
        return count
