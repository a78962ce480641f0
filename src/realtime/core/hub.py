"""LocalHub: the rooms and members of this pod, and local fan-out.

No I/O and no awaits: a broadcast frames the payload once and hands the same
bytes to every member's connection, which queues them without blocking. The
hub tells a ``RoomWatcher`` (the broadcaster) when a room gains its first
local member and when it loses its last, so cross-pod subscriptions follow
local membership.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .connection import Connection, ConnectionState
from .protocol import CloseCode, text_frame

__all__ = ["HubCounters", "LocalHub", "RoomWatcher"]


class RoomWatcher(Protocol):
    def subscribe(self, room: str) -> None:
        """``room`` now has local members."""

    def unsubscribe(self, room: str) -> None:
        """``room`` has no local members any more."""


@dataclass(slots=True)
class HubCounters:
    broadcasts: int = 0
    deliveries: int = 0
    slow_client_disconnects: int = 0


class LocalHub:
    """Membership by room, and delivery to local members."""

    def __init__(self, watcher: RoomWatcher | None = None) -> None:
        self._watcher = watcher
        self._connections: dict[str, Connection] = {}
        self._rooms: dict[str, dict[str, Connection]] = {}
        self._waiting: dict[str, dict[str, Connection]] = {}
        """Members still catching up (history, resume): they count for the
        room's subscription but get no live frames until ``go_live``."""
        self.counters = HubCounters()

    def watch(self, watcher: RoomWatcher) -> None:
        """Set who is told about rooms opening and closing on this pod."""
        self._watcher = watcher

    # -- membership -------------------------------------------------------

    def add(self, conn: Connection) -> None:
        self._connections[conn.id] = conn

    def remove(self, conn: Connection) -> None:
        """Forget a connection and leave all its rooms (idempotent)."""
        if self._connections.pop(conn.id, None) is None:
            return
        for room in conn.rooms:
            self.leave(conn, room)

    def join(self, conn: Connection, room: str, *, live: bool = True) -> None:
        """Add ``conn`` to ``room``; with ``live=False`` it waits (no live
        frames) until ``go_live``, so a catch-up can be sent first."""
        new = room not in self._rooms and room not in self._waiting
        if new and self._watcher is not None:
            self._watcher.subscribe(room)
        if live:
            self._rooms.setdefault(room, {})[conn.id] = conn
        else:
            self._waiting.setdefault(room, {})[conn.id] = conn
        if room not in conn.rooms:
            conn.rooms = (*conn.rooms, room)

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

    def leave(self, conn: Connection, room: str) -> None:
        if room in conn.rooms:
            conn.rooms = tuple(r for r in conn.rooms if r != room)
        removed = False
        for table in (self._rooms, self._waiting):
            members = table.get(room)
            if members is not None and members.pop(conn.id, None) is not None:
                removed = True
                if not members:
                    del table[room]
        gone = removed and room not in self._rooms and room not in self._waiting
        if gone and self._watcher is not None:
            self._watcher.unsubscribe(room)

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

    def has_room(self, room: str) -> bool:
        return room in self._rooms or room in self._waiting

    # -- delivery ---------------------------------------------------------

    def broadcast(self, room: str | None, payload: bytes) -> int:
        """Deliver a JSON payload to a room's members, or to all if ``room`` is None.

        Frames once, never awaits. Members that are too slow are closed with
        1013 and removed; returns how many members the frame was queued for.
        """
        if room is None:
            members: Iterable[Connection] = self._connections.values()
        else:
            room_members = self._rooms.get(room)
            if room_members is None:
                return 0
            members = room_members.values()
        frame = text_frame(payload)
        sent = 0
        dropped: list[Connection] = []
        for conn in members:
            if conn.send_frame(frame):
                sent += 1
            elif conn.close_code == CloseCode.TRY_AGAIN_LATER:
                dropped.append(conn)
        for conn in dropped:
            self.remove(conn)
        self.counters.broadcasts += 1
        self.counters.deliveries += sent
        self.counters.slow_client_disconnects += len(dropped)
        return sent

    def send_to(self, conn: Connection, payload: bytes) -> bool:
        """Send a payload to one member, applying the same slow-client policy."""
        if conn.send(payload):
            return True
        if conn.close_code == CloseCode.TRY_AGAIN_LATER and conn.id in self._connections:
            self.remove(conn)
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
