"""One client connection: its state, its rooms, and the slow-client policy.

A connection does not own a socket. It writes ready-made frames to a
``FrameSink`` (the I/O adapter's view of the socket) and never awaits: the
sink's write buffer *is* the bounded send buffer. When a client stops reading
and its buffer passes the limit, the connection is closed with 1013 ("try
again later") instead of letting one reader hold up a broadcast.
"""

from __future__ import annotations

import enum
from typing import Protocol

from .exceptions import StateError
from .protocol import CloseCode, Identity, text_frame

__all__ = ["Connection", "ConnectionState", "FrameSink"]


class FrameSink(Protocol):
    """What a connection needs from the transport below it."""

    def write(self, frame: bytes) -> None:
        """Queue a complete WebSocket frame for sending; never blocks."""

    def buffered(self) -> int:
        """Bytes queued but not yet sent."""

    def close(self, code: int, reason: str) -> None:
        """Start closing with ``code``; returns at once."""


class ConnectionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_ALLOWED = {
    ConnectionState.OPEN: {ConnectionState.CLOSING, ConnectionState.CLOSED},
    ConnectionState.CLOSING: {ConnectionState.CLOSED},
    ConnectionState.CLOSED: set(),
}


class Connection:
    """A member of the hub: identity, rooms, and a bounded way to send."""

    __slots__ = (
        "_sink",
        "close_code",
        "default_room",
        "id",
        "identity",
        "max_buffered",
        "quiet_ticks",
        "rooms",
        "state",
    )

    def __init__(
        self,
        id: str,
        identity: Identity,
        sink: FrameSink,
        *,
        max_buffered: int,
        default_room: str | None = None,
    ) -> None:
        self.id = id
        self.identity = identity
        self.default_room = default_room
        """Where a message without ``room`` goes; None means everyone."""
        self.rooms: tuple[str, ...] = ()
        """The rooms joined, in order (the hub keeps it). A tuple: it almost
        always holds one room, and a set of one costs 216 bytes, this 48."""
        self.max_buffered = max_buffered
        self.state = ConnectionState.OPEN
        self.close_code: int | None = None
        self.quiet_ticks = 0
        """Keepalive ticks since the client last sent a frame; the I/O adapter
        counts them, pings and closes (see ``realtime.guard``)."""
        self._sink = sink

    def _move(self, new: ConnectionState) -> None:
        if new not in _ALLOWED[self.state]:
            raise StateError(f"connection {self.id}: {self.state.value} -> {new.value}")
        self.state = new

    def send_frame(self, frame: bytes) -> bool:
        """Queue a ready-made WebSocket frame.

        Returns False, without writing, when the connection is not open or
        when the client has fallen more than ``max_buffered`` bytes behind; in
        the latter case the connection starts closing with 1013.
        """
        if self.state is not ConnectionState.OPEN:
            return False
        if self._sink.buffered() > self.max_buffered:
            self.close(CloseCode.TRY_AGAIN_LATER, "client too slow: send buffer full")
            return False
        self._sink.write(frame)
        return True

    def send(self, payload: bytes) -> bool:
        """Frame and queue one JSON payload meant for this connection only."""
        return self.send_frame(text_frame(payload))

    def close(self, code: int, reason: str) -> None:
        """Start closing; a second call while closing is a no-op."""
        if self.state is not ConnectionState.OPEN:
            return
        self._move(ConnectionState.CLOSING)
        self.close_code = code
        self._sink.close(code, reason)

    def closed(self) -> None:
        """Record that the socket is gone (idempotent)."""
        if self.state is not ConnectionState.CLOSED:
            self._move(ConnectionState.CLOSED)

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.identity.name!r} {self.state.value}>"
