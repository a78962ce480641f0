"""aiohttp plumbing under the handler: the upgrade request, the transport.

Reading an upgrade request: the room and catch-up it asks for
(``requested_room``) and who it is (an ``Identify`` hook; ``guest_identity``
when nobody authenticates clients); accepting it (``upgrade``). Writing to
an accepted socket: ``TransportSink`` puts frames straight on the aiohttp
transport, whose write buffer is the connection's bounded send buffer (see
``connection.py``), and ``Closer`` sends close frames without the caller
awaiting them. ``Ids`` makes the message and connection ids.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..core.access import Admission
from ..core.exceptions import ProtocolError
from ..core.protocol import (
    NO_CATCHUP,
    Catchup,
    CloseCode,
    ErrorCode,
    Identity,
    close_frame,
    parse_catchup,
    validate_room,
)

__all__ = [
    "MAX_NAME_LENGTH",
    "Closer",
    "Identify",
    "Ids",
    "TransportSink",
    "clean_name",
    "guest_identity",
    "requested_room",
    "upgrade",
]

# The handler's logger: these are its sockets.
log = logging.getLogger("realtime.handler")

Identify = Callable[[web.Request, str], Awaitable[Identity | Admission]]
"""Decide who a new connection is (given the request and a fresh connection
id), or refuse it by raising an ``aiohttp.web.HTTPException`` (answered
before the WebSocket is accepted). An ``Admission`` adds an expiry time and
room authorization to the identity."""

_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]+")
MAX_NAME_LENGTH = 32


def clean_name(raw: str | None) -> str:
    """A display name with control and invisible characters removed, white
    space folded and the length capped; empty if nothing is left."""
    if not raw:
        return ""
    return " ".join(_NAME_JUNK.sub(" ", raw).split())[:MAX_NAME_LENGTH]


async def guest_identity(request: web.Request, connection_id: str) -> Identity:
    """The identity of an unauthenticated client: the ``name`` query
    parameter, cleaned, or a generated guest name."""
    suffix = connection_id.rsplit("-", 1)[-1]
    name = clean_name(request.query.get("name")) or f"guest-{suffix}"
    return Identity(id=f"guest-{connection_id}", name=name)


def requested_room(request: web.Request) -> tuple[str | None, Catchup]:
    """The room in the path (None: the global channel) and the catch-up
    asked for in the query string; HTTP 400 if either is invalid."""
    room = request.match_info.get("room")
    if room is None:
        return None, NO_CATCHUP
    try:
        validate_room(room)
        return room, _query_catchup(request)
    except ProtocolError as exc:
        raise web.HTTPBadRequest(text=exc.message) from exc


def _query_catchup(request: web.Request) -> Catchup:
    """``since``/``epoch`` or ``history`` from the query string."""
    query = request.query

    def number(name: str) -> int | None:
        raw = query.get(name)
        if raw is None or raw == "":
            return None
        if not raw.isdigit() or len(raw) > 16:
            raise ProtocolError(ErrorCode.INVALID_FRAME, f"{name!r} must be a non-negative integer")
        return int(raw)

    return parse_catchup(number("since"), query.get("epoch") or None, number("history"))


async def upgrade(
    request: web.Request, max_msg_size: int, close_timeout: float
) -> tuple[web.WebSocketResponse, asyncio.Transport | None]:
    """Accept the WebSocket; no transport if the client vanished meanwhile."""
    ws = web.WebSocketResponse(
        max_msg_size=max_msg_size,
        # Pings and pongs reach the reader loop: the keepalive tick pings,
        # the reader loop answers the client's pings itself.
        autoping=False,
        compress=False,
        timeout=close_timeout,
    )
    await ws.prepare(request)
    transport = request.transport
    if transport is None or transport.is_closing():
        return ws, None
    return ws, transport


class Ids:
    """Short ids unique across pods: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(5).hex()
        self._next = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._next):x}"


class Closer:
    """Closes sockets on request without making the caller await: each
    close that needs a task is kept here until it ends (``wait``)."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._closing: set[asyncio.Task[bool]] = set()

    def close_soon(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport, code: int, reason: str
    ) -> None:
        """Send a close frame now; cut the TCP connection if the client has
        not let go within the timeout (a client that stopped reading would
        otherwise hold its unsent buffer forever)."""
        if ws.closed or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self._timeout, transport.abort)
        if ws.prepared and code == CloseCode.TRY_AGAIN_LATER:
            # The buffer is full: put the close frame behind it and let the
            # reader loop end when the transport goes.
            transport.write(close_frame(code, reason))
            transport.close()
            return
        task = loop.create_task(ws.close(code=code, message=reason.encode(), drain=False))
        self._closing.add(task)
        task.add_done_callback(self._close_done)

    def _close_done(self, task: asyncio.Task[Any]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("closing a connection failed: %r", exc)

    async def wait(self) -> None:
        """Wait, up to the timeout, for the closes under way to finish."""
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=self._timeout)


class TransportSink:
    """Writes frames straight to the aiohttp transport of one WebSocket."""

    __slots__ = ("_closer", "_transport", "_ws")

    def __init__(
        self, closer: Closer, ws: web.WebSocketResponse, transport: asyncio.Transport
    ) -> None:
        self._closer = closer
        self._ws = ws
        self._transport = transport

    def write(self, frame: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(frame)

    def buffered(self) -> int:
        return self._transport.get_write_buffer_size()

    def close(self, code: int, reason: str) -> None:
        self._closer.close_soon(self._ws, self._transport, code, reason)
