"""The aiohttp transport: the fast path ``chat-api`` runs on.

``AiohttpTransport(node)`` serves the WebSocket routes (``routes(prefix)``:
``GET {prefix}`` for the global channel, ``GET {prefix}/{room}``). Each
connection costs one task — aiohttp's request handler, which runs the reader
loop and hands every frame to the connection's ``Session`` — and no writer
task: frames go straight to the connection's asyncio transport, whose write
buffer is the bounded send buffer (see ``core.connection``), and a broadcast
builds its RFC 6455 frame once for every member (``rfc6455.text_frame``).
Nor does a connection cost a timer: one pod-wide keepalive tick pings the
clients that have gone quiet and closes those that do not answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import WSMsgType, web

from ..core.connection import ConnectionState, Outgoing
from ..core.exceptions import Refused
from ..core.hub import LocalHub
from ..core.protocol import CloseCode
from ..node import Node
from ..session import Session
from .rfc6455 import PING_FRAME, close_frame, pong_frame, text_frame

__all__ = ["AiohttpTransport"]

log = logging.getLogger("realtime.transports.aiohttp")


class AiohttpTransport:
    """WebSocket endpoints of one pod on an aiohttp server."""

    def __init__(
        self, node: Node, *, ping_interval: float = 20.0, close_timeout: float = 5.0
    ) -> None:
        self._node = node
        self._close_timeout = close_timeout
        # aiohttp refuses a message of exactly max_msg_size bytes. (Computed
        # once: an int this large is a new object each time, kept per socket.)
        self._max_msg_size = node.settings.limits.max_message_bytes + 1
        self._closer = _Closer(close_timeout)
        self._keepalive = _Keepalive(node.hub, ping_interval)

    def routes(self, prefix: str = "") -> list[web.RouteDef]:
        """``GET {prefix}`` (global) and ``GET {prefix}/{room}``."""
        return [web.get(prefix, self.handle), web.get(prefix + "/{room}", self.handle)]

    async def close_all(self) -> int:
        """Close every connection with 1001 and wait (up to the close
        timeout) for the close frames to go out. Returns how many."""
        count = self._node.close_connections()
        self._keepalive.stop()
        await self._closer.wait()
        return count

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Refuse with an HTTP error before accepting (shutting down, pod
        full, bad room, or whatever ``identify`` refuses), else serve the
        socket: this coroutine is the connection's reader loop."""
        node = self._node
        try:
            async with node.admit(
                room=request.match_info.get("room"),
                query=request.query,
                headers=request.headers,
                remote=request.remote,
            ) as (handshake, granted):
                ws, session, sock = await self._accept(request, handshake, granted)
        except Refused as exc:
            return web.Response(status=exc.status, text=exc.reason, headers=exc.headers)
        if session is None or sock is None:  # vanished during the upgrade
            return ws
        conn = session.conn
        try:
            await session.start(handshake.room, handshake.catchup)
            while True:
                msg = await ws.receive()
                sock.quiet_ticks = 0
                kind = msg.type
                if kind is WSMsgType.TEXT:
                    pending = session.receive(msg.data)
                    if pending is not None:
                        # A join with catch-up, a presence query: later frames
                        # of this client wait for it, so they keep their order.
                        await pending
                elif kind is WSMsgType.BINARY:
                    session.receive_binary()
                elif kind is WSMsgType.PING:
                    conn.deliver(_Frame(pong_frame(msg.data)))
                elif kind is not WSMsgType.PONG:  # CLOSE, CLOSING, CLOSED, ERROR
                    return ws
        finally:
            session.closed()

    async def _accept(
        self, request: web.Request, handshake: Any, granted: Any
    ) -> tuple[web.WebSocketResponse, Session | None, _Socket | None]:
        """Accept the WebSocket; no session if the client vanished meanwhile."""
        ws = web.WebSocketResponse(
            max_msg_size=self._max_msg_size,
            # Pings and pongs reach the reader loop: the keepalive tick pings,
            # the reader loop answers the client's pings itself.
            autoping=False,
            compress=False,
            timeout=self._close_timeout,
        )
        await ws.prepare(request)
        io = request.transport
        if io is None or io.is_closing():
            return ws, None, None
        sock = _Socket(self._closer, ws, io)
        session = Session.open(self._node, sock, handshake, granted)
        self._keepalive.arm()
        return ws, session, sock


class _Frame(Outgoing):
    """A frame built already (a pong, a ping): written as it is."""

    __slots__ = ()

    def __init__(self, frame: bytes) -> None:
        super().__init__(frame)

    def encoded(self, encode: Any) -> Any:
        return self.payload


_PING = _Frame(PING_FRAME)


class _Socket:
    """The ``Transport`` of one connection: frames straight to aiohttp's
    asyncio transport."""

    __slots__ = ("_closer", "_io", "_ws", "quiet_ticks")

    def __init__(self, closer: _Closer, ws: web.WebSocketResponse, io: asyncio.Transport) -> None:
        self._closer = closer
        self._ws = ws
        self._io = io
        self.quiet_ticks = 0
        """Keepalive ticks since the client last sent a frame."""

    def write(self, out: Outgoing) -> None:
        if not self._io.is_closing():
            self._io.write(out.encoded(text_frame))

    def buffered(self) -> int:
        return self._io.get_write_buffer_size()

    def close(self, code: int, reason: str) -> None:
        self._closer.close_soon(self._ws, self._io, code, reason)


class _Closer:
    """Closes sockets on request without making the caller await: each
    close that needs a task is kept here until it ends (``wait``)."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._closing: set[asyncio.Task[bool]] = set()

    def close_soon(
        self, ws: web.WebSocketResponse, io: asyncio.Transport, code: int, reason: str
    ) -> None:
        """Send a close frame now; cut the TCP connection if the client has
        not let go within the timeout (a client that stopped reading would
        otherwise hold its unsent buffer forever)."""
        if ws.closed or io.is_closing():
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self._timeout, io.abort)
        if ws.prepared and code == CloseCode.TRY_AGAIN_LATER:
            # The buffer is full: put the close frame behind it and let the
            # reader loop end when the transport goes.
            io.write(close_frame(code, reason))
            io.close()
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


class _Keepalive:
    """One tick for the whole pod, every half ``interval`` while it has
    connections (aiohttp's own heartbeat would keep a timer per connection,
    about 0.6 KB); the reader loop resets a socket's ``quiet_ticks`` at each
    frame its client sends."""

    def __init__(self, hub: LocalHub, interval: float) -> None:
        self._hub = hub
        self._interval = interval
        """Seconds; 0 turns keepalive off."""
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Make sure the tick is scheduled (a connection was just added)."""
        if self._timer is None and self._interval > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._interval / 2, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        """Ping each client that has sent nothing for two ticks (half to one
        whole interval), and close each that has not answered by the next
        tick (half an interval after the ping)."""
        self._timer = None
        for conn in self._hub.connections():
            sock = conn.transport
            if type(sock) is not _Socket or conn.state is not ConnectionState.OPEN:
                continue
            sock.quiet_ticks += 1
            if sock.quiet_ticks == 2:
                conn.deliver(_PING)
            elif sock.quiet_ticks > 2:
                conn.close(CloseCode.GOING_AWAY, "no answer to ping")
        if self._hub.connection_count:
            self.arm()
