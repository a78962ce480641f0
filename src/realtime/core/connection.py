"""One client connection: its state, its rooms, and the slow-client policy.

A connection does not own a socket. It hands server frames to a
``Transport`` (the web server's side of one WebSocket, see
``realtime.transports``) and never awaits: the transport's send buffer *is*
the bounded send buffer. When a client stops reading and its buffer passes
the limit, the connection is closed with 1013 ("try again later") instead of
letting one reader hold up a broadcast.

What a transport is given is an ``Outgoing``: one server frame's JSON,
shared by every recipient of a broadcast. A transport that must turn it into
bytes of its own (the aiohttp transport builds the RFC 6455 frame) does so
through ``Outgoing.encoded``, which keeps the result, so a broadcast to a
thousand members encodes once.

While ``holding_writes`` is entered, frames are held instead and written when
it is left, each connection's in one write (``Transport.write_many``): a
backend holds them while it hands over a burst (several pushes read at once,
or a batch's replies: a sender's own message and its ack), so that a member
sent several frames costs one send, not one each.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

from .exceptions import StateError
from .protocol import CloseCode, Identity

__all__ = [
    "NOT_OPEN",
    "QUEUED",
    "TOO_SLOW",
    "Connection",
    "ConnectionState",
    "Outgoing",
    "Transport",
    "holding_writes",
]

_T = TypeVar("_T")


class Outgoing:
    """A server frame's JSON on its way to one or many connections."""

    __slots__ = ("_encoded", "_encoder", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._encoder: Callable[[bytes], Any] | None = None
        self._encoded: Any = None

    def encoded(self, encode: Callable[[bytes], _T]) -> _T:
        """``encode(payload)``, computed once for every recipient that asks
        with the same ``encode``."""
        if self._encoder is not encode:
            self._encoded = encode(self.payload)
            self._encoder = encode
        value: _T = self._encoded
        return value


class Transport(Protocol):
    """What a connection needs from the web server below it."""

    def write(self, out: Outgoing) -> None:
        """Queue a server frame for sending; never blocks."""

    def write_many(self, outs: list[Outgoing]) -> None:
        """Queue several frames, in order, at once (one write where it can)."""

    def buffered(self) -> int:
        """Bytes queued but not yet sent."""

    def close(self, code: int, reason: str) -> None:
        """Start closing with ``code`` and ``reason``; returns at once."""


class _Holding:
    """The context manager ``holding_writes``: see the module's docstring.

    A hold never spans an await (it is entered and left within one callback
    of the loop), so one for the whole process does; nested holds write when
    the outermost is left."""

    __slots__ = ("connections", "depth")

    def __init__(self) -> None:
        self.connections: list[Connection] | None = None
        """Connections with frames held, in the order of their first; None
        when not holding."""
        self.depth = 0

    def __enter__(self) -> None:
        self.depth += 1
        if self.connections is None:
            self.connections = []

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth:
            return
        held, self.connections = self.connections, None
        failed: Exception | None = None
        for conn in held or ():
            try:
                conn.release()
            except Exception as exc:  # noqa: BLE001 -- raised below, once all are out
                failed = failed or exc  # one socket's error must not keep the others' frames
        if failed is not None:
            raise failed


holding_writes: Final = _Holding()


class ConnectionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_ALLOWED = {
    ConnectionState.OPEN: {ConnectionState.CLOSING, ConnectionState.CLOSED},
    ConnectionState.CLOSING: {ConnectionState.CLOSED},
    ConnectionState.CLOSED: set(),
}

QUEUED: Final = 1
"""``Connection.deliver``: the frame is queued."""
NOT_OPEN: Final = 0
"""``Connection.deliver``: nothing queued, the connection is closing or closed."""
TOO_SLOW: Final = -1
"""``Connection.deliver``: nothing queued, the client fell too far behind and
the connection has just started closing with 1013."""


class Connection:
    """A member of the hub: identity, rooms, and a bounded way to send."""

    __slots__ = (
        "close_code",
        "default_room",
        "held",
        "id",
        "identity",
        "max_buffered",
        "rooms",
        "state",
        "transport",
    )

    def __init__(
        self,
        id: str,
        identity: Identity,
        transport: Transport,
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
        self.transport = transport
        self.held: list[Outgoing] | None = None
        """Frames held by ``holding_writes``, to write when it is left."""

    def _move(self, new: ConnectionState) -> None:
        if new not in _ALLOWED[self.state]:
            raise StateError(f"connection {self.id}: {self.state.value} -> {new.value}")
        self.state = new

    def deliver(self, out: Outgoing) -> int:
        """Queue a server frame: ``QUEUED``, ``NOT_OPEN`` or ``TOO_SLOW``
        (the client has fallen more than ``max_buffered`` bytes behind: the
        connection starts closing with 1013 instead)."""
        if self.state is not ConnectionState.OPEN:
            return NOT_OPEN
        if self.transport.buffered() > self.max_buffered:
            self.close(CloseCode.TRY_AGAIN_LATER, "client too slow: send buffer full")
            return TOO_SLOW
        holding = holding_writes.connections
        if holding is None:
            self.transport.write(out)
        elif self.held is None:
            self.held = [out]
            holding.append(self)
        else:
            self.held.append(out)
        return QUEUED

    def release(self) -> None:
        """Write the frames ``holding_writes`` held (if still open)."""
        held = self.held
        if held is None:
            return
        self.held = None
        if self.state is ConnectionState.OPEN:
            if len(held) == 1:
                self.transport.write(held[0])
            else:
                self.transport.write_many(held)

    def close(self, code: int, reason: str) -> None:
        """Start closing; a second call while closing is a no-op."""
        if self.state is not ConnectionState.OPEN:
            return
        self.release()  # what was held goes ahead of the Close
        self._move(ConnectionState.CLOSING)
        self.close_code = code
        self.transport.close(code, reason)

    def closed(self) -> None:
        """Record that the socket is gone (idempotent)."""
        if self.state is not ConnectionState.CLOSED:
            self._move(ConnectionState.CLOSED)

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.identity.name!r} {self.state.value}>"
