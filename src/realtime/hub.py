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
        for room in list(conn.rooms):
            self.leave(conn, room)

    def join(self, conn: Connection, room: str) -> None:
        members = self._rooms.get(room)
        if members is None:
            members = self._rooms[room] = {}
            if self._watcher is not None:
                self._watcher.subscribe(room)
        members[conn.id] = conn
        conn.rooms.add(room)

    def leave(self, conn: Connection, room: str) -> None:
        conn.rooms.discard(room)
        members = self._rooms.get(room)
        if members is None or members.pop(conn.id, None) is None:
            return
        if not members:
            del self._rooms[room]
            if self._watcher is not None:
                self._watcher.unsubscribe(room)

    # -- queries ----------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    def room_sizes(self) -> dict[str, int]:
        return {room: len(members) for room, members in self._rooms.items()}

    def has_room(self, room: str) -> bool:
        return room in self._rooms

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
