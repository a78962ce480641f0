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

The closing handshake is the transport's own (RFC 6455 section 7.1.1),
whoever starts it and why — a policy close, a slow consumer, token expiry,
shutdown, keepalive, a protocol error aiohttp's parser found: the close
frame goes out behind what is queued, nothing is delivered after it, and
what the client still sends is read and dropped until its own Close, its
EOF or ``close_timeout``; only then is the TCP connection closed. (Closing
it with unread bytes in the receive buffer would turn the close into a
reset, and the client's kernel would throw away the close frame and
everything before it.) To read and drop
without aiohttp, each socket puts a thin protocol (``_Socket``) in front of
aiohttp's: it follows the client's frame boundaries, which also lets it
refuse unmasked client frames (1002, section 5.1) and too large ones (1009)
before they are buffered.

That protocol also takes the common read off aiohttp's hands: one that holds
nothing but whole, unfragmented text frames (``rfc6455.text_payloads``),
while nothing of the client waits in aiohttp's queue, goes to the session
at once, in the read's own callback: no queue entry, future and task step
per frame (3 to 11 % of a pod's CPU per room message in rooms of 4, measured
side by side). Any other read (a control frame, a fragment, a frame cut by
the read, invalid UTF-8) goes to aiohttp's parser, which handles everything
as before. A frame whose answer needs the network (a join with catch-up)
holds the frames after it, on either path, until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Final, cast

from aiohttp import WSMsgType, web

from ..core.connection import Connection, ConnectionState, Outgoing
from ..core.exceptions import Refused
from ..core.hub import LocalHub
from ..core.protocol import CloseCode
from ..node import Node
from ..session import Session
from .rfc6455 import PING_FRAME, close_frame, pong_frame, text_frame, text_payloads

__all__ = ["AiohttpTransport"]

log = logging.getLogger("realtime.transports.aiohttp")


class AiohttpTransport:
    """WebSocket endpoints of one pod on an aiohttp server."""

    def __init__(
        self,
        node: Node,
        *,
        ping_interval: float = 20.0,
        close_timeout: float = 5.0,
        upgrade_timeout: float = 10.0,
    ) -> None:
        self._node = node
        self._close_timeout = close_timeout
        self._upgrade_timeout = upgrade_timeout
        # aiohttp refuses a message of exactly max_msg_size bytes. (Computed
        # once: an int this large is a new object each time, kept per socket.)
        self._max_msg_size = node.settings.limits.max_message_bytes + 1
        self._closing = _Closing(close_timeout)
        self._keepalive = _Keepalive(node.hub, ping_interval)

    def routes(self, prefix: str = "") -> list[web.RouteDef]:
        """``GET {prefix}`` (global) and ``GET {prefix}/{room}``."""
        return [web.get(prefix, self.handle), web.get(prefix + "/{room}", self.handle)]

    async def close_all(self) -> int:
        """Close every connection with 1001 and wait (up to the close
        timeout) for the closing handshakes to end. Returns how many."""
        count = self._node.close_connections()
        self._keepalive.stop()
        await self._closing.wait()
        return count

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Refuse with an HTTP error before accepting (shutting down, pod
        full, bad room, or whatever ``identify`` refuses), else serve the
        socket: this coroutine is the connection's reader loop."""
        node = self._node
        try:
            async with (
                asyncio.timeout(self._upgrade_timeout),
                node.admit(
                    room=request.match_info.get("room"),
                    query=request.query,
                    headers=request.headers,
                    remote=request.remote,
                ) as (handshake, granted),
            ):
                ws, session, sock = await self._accept(request, handshake, granted)
        except Refused as exc:
            return web.Response(status=exc.status, text=exc.reason, headers=exc.headers)
        except TimeoutError:
            return web.Response(status=503, text="the upgrade took too long; try again")
        if session is None or sock is None:  # vanished during the upgrade
            return ws
        conn = session.conn
        client_code: int | None = None
        try:
            await session.start(handshake.room, handshake.catchup)
            sock.session = session
            while True:
                msg = await ws.receive()
                sock.unread -= 1
                sock.quiet_ticks = 0
                if sock.waiting is not None:  # frames read before this one wait
                    await asyncio.wait((sock.waiting,))
                kind = msg.type
                if kind is WSMsgType.TEXT:
                    sock.receive((msg.data,))
                elif kind is WSMsgType.BINARY:
                    session.receive_binary()
                elif kind is WSMsgType.PING:
                    if session.receive_control():
                        conn.deliver(_Frame(pong_frame(msg.data)))
                elif kind is not WSMsgType.PONG:  # CLOSE, CLOSING, CLOSED, ERROR
                    if kind is WSMsgType.CLOSE:  # the client closed first (ours drop theirs)
                        client_code = msg.data
                    break
            # The closing handshake is under way (whoever began it): wait for
            # its end, which the close timeout bounds.
            await sock.gone
        finally:
            sock.session = None
            if sock.waiting is not None:
                sock.waiting.cancel()
            session.closed(client_code)
        return ws

    async def _accept(
        self, request: web.Request, handshake: Any, granted: Any
    ) -> tuple[web.WebSocketResponse, Session | None, _Socket | None]:
        """Accept the WebSocket; no session if the client vanished meanwhile."""
        ws = _WebSocket(
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
        sock = _Socket(io, self._closing, self._max_msg_size - 1)
        session = Session.open(self._node, sock, handshake, granted)
        ws.conn = sock.conn = session.conn
        self._keepalive.arm()
        return ws, session, sock


class _WebSocket(web.WebSocketResponse):
    """aiohttp's WebSocket, whose closes all go through the transport's
    closing handshake (aiohttp closes by itself on a protocol error, on a
    client's Close and on EOF)."""

    conn: Connection | None = None

    async def close(
        self, *, code: int = CloseCode.NORMAL, message: bytes = b"", drain: bool = True
    ) -> bool:
        conn = self.conn
        if conn is None:  # not ours yet (the upgrade)
            return await super().close(code=code, message=message, drain=drain)
        conn.close(code, message.decode(errors="replace") or _REASONS.get(code, ""))
        return True


_REASONS: dict[int, str] = {
    CloseCode.NORMAL: "",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.INVALID_PAYLOAD: "invalid UTF-8 in a text frame",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
}


class _Frame(Outgoing):
    """A frame built already (a pong, a ping): written as it is."""

    __slots__ = ()

    def __init__(self, frame: bytes) -> None:
        super().__init__(frame)

    def encoded(self, encode: Any) -> Any:
        return self.payload


_PING = _Frame(PING_FRAME)

_OP_CLOSE: Final = 0x8


class _Socket(asyncio.Protocol):
    """One connection's socket: the ``Transport`` the connection writes to
    (frames straight to aiohttp's asyncio transport), and the protocol in
    front of aiohttp's that reads what the client sends."""

    __slots__ = (
        "_closing",
        "_head",
        "_inner",
        "_io",
        "_limit",
        "_message",
        "_skip",
        "_timer",
        "closing",
        "conn",
        "gone",
        "quiet_ticks",
        "session",
        "unread",
        "waiting",
    )

    def __init__(self, io: asyncio.Transport, closing: _Closing, limit: int) -> None:
        self._io = io
        self._closing = closing
        self._inner = cast(asyncio.Protocol, io.get_protocol())
        self._limit = limit
        """Largest message a client may send (its frames' payloads summed)."""
        self._head = b""
        """The start of a frame header split across reads."""
        self._skip = 0
        """Payload bytes of the current frame still to come."""
        self._message = 0
        """Payload bytes of the data message being received so far."""
        self._timer: asyncio.TimerHandle | None = None
        self.closing = False
        """Our Close is sent: nothing more is written, what comes is dropped."""
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolves when the TCP connection is closed."""
        self.quiet_ticks = 0
        """Keepalive ticks since the client last sent a frame."""
        self.conn: Connection | None = None
        """The connection this socket serves, once it is one."""
        self.session: Session | None = None
        """Its session, once the reader loop serves it (the fast path's)."""
        self.unread = 0
        """Messages (and control frames) handed to aiohttp's parser that the
        reader loop has not taken yet (below 0 once aiohttp has made up some
        of its own, closing: the fast path is off from then on)."""
        self.waiting: asyncio.Future[Any] | None = None
        """A frame's answer that needs the network (a join with catch-up):
        the frames read after it wait for it."""
        io.set_protocol(self)

    # -- the connection's Transport -------------------------------------------

    def write(self, out: Outgoing) -> None:
        if not self.closing:
            self._io.write(out.encoded(text_frame))

    def write_many(self, outs: list[Outgoing]) -> None:
        if not self.closing:
            self._io.write(b"".join([out.encoded(text_frame) for out in outs]))

    def buffered(self) -> int:
        return self._io.get_write_buffer_size()

    def close(self, code: int, reason: str) -> None:
        """Begin the closing handshake: our Close behind what is queued;
        the connection is closed once the client's Close is in (or its EOF),
        and cut if neither has come within the close timeout."""
        if self.closing:
            return
        self.closing = True
        io = self._io
        if io.is_closing():
            return
        io.write(close_frame(code, reason))
        io.resume_reading()  # aiohttp may have paused it; what comes is dropped now
        self._timer = asyncio.get_running_loop().call_later(self._closing.timeout, io.abort)
        self._closing.add(self)

    # -- asyncio.Protocol, in front of aiohttp's ---------------------------------

    def data_received(self, data: bytes) -> None:
        if (
            self.waiting is None
            and self.unread == 0
            and not self._skip
            and not self._head
            and not self._message
            and not self.closing
            and self.session is not None
        ):
            # The fast path: a read of whole, unfragmented, masked text
            # frames (what a chat client sends), with nothing of this client
            # waiting in aiohttp's queue, goes to the session here, without
            # aiohttp's queue, future and task step per frame. Anything else
            # is aiohttp's, as below.
            texts = text_payloads(data, self._limit)
            if texts is not None:
                self.receive(texts)
                return
        verdict = self._frames(data)
        if self.closing:
            if verdict == _CLOSE_SEEN:
                self._io.close()  # the handshake is done: close first, as a server should
            return
        if verdict in (_OK, _CLOSE_SEEN):  # the client's Close: aiohttp answers it
            self._inner.data_received(data)
        elif verdict == _UNMASKED:
            self._fail(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
        else:
            self._fail(CloseCode.MESSAGE_TOO_BIG, "message too big")

    def receive(self, texts: Sequence[str | bytes]) -> None:
        """Client text frames to the session, in order, from either path. A
        frame whose answer needs the network (a join with catch-up, a
        presence query) makes the ones after it wait (``waiting``), these
        and any read later, so that they keep their order."""
        session = self.session
        assert session is not None  # set before either path reads
        self.quiet_ticks = 0
        for i, text in enumerate(texts):
            pending = session.receive(text)
            if pending is not None:
                self.waiting = waiting = asyncio.ensure_future(self._then(pending, texts[i + 1 :]))
                waiting.add_done_callback(self._waited)
                return

    async def _then(self, pending: Awaitable[None], texts: Sequence[str | bytes]) -> None:
        """Await a frame's answer, then give the session the frames read
        with it, in order (each waiting for the one before)."""
        await pending
        for text in texts:
            session = self.session
            if session is None:  # the connection is over
                return
            more = session.receive(text)
            if more is not None:
                await more

    def _waited(self, waiting: asyncio.Future[Any]) -> None:
        if self.waiting is waiting:
            self.waiting = None
        if not waiting.cancelled() and (exc := waiting.exception()) is not None:
            log.error("a client frame's answer failed", exc_info=exc)
            if self.conn is not None:
                self.conn.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _fail(self, code: int, reason: str) -> None:
        """The client broke the protocol: close through the connection, so
        that it is served no more."""
        if self.conn is not None:
            self.conn.close(code, reason)
        else:
            self.close(code, reason)

    def _frames(self, data: bytes) -> int:
        """Follow the client's frame boundaries through ``data``: ``_OK``,
        or why to stop (an unmasked frame, a message over the limit, a Close
        seen while closing)."""
        n = len(data)
        pos = self._skip
        if pos >= n:
            self._skip = pos - n
            return _OK
        self._skip = 0
        if self._head:
            data = self._head + data[pos:]
            n = len(data)
            pos = 0
            self._head = b""
        seen = _OK
        while pos < n:
            if n - pos < 2:
                self._head = data[pos:]
                return seen
            first, second = data[pos], data[pos + 1]
            if not second & 0x80:
                return _UNMASKED
            length = second & 0x7F
            size = 6 if length < 126 else 8 if length == 126 else 14
            if n - pos < size:
                self._head = data[pos:]
                return seen
            if length == 126:
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            opcode = first & 0x0F
            if opcode < _OP_CLOSE:  # a data frame or a continuation
                message = self._message + length
                if message > self._limit:
                    return _TOO_BIG
                if first & 0x80:
                    self._message = 0
                    self.unread += 1
                else:
                    self._message = message
            else:
                self.unread += 1
                if opcode == _OP_CLOSE:
                    seen = _CLOSE_SEEN
            pos += size + length
        self._skip = pos - n
        return seen

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._closing.discard(self)
        if not self.gone.done():
            self.gone.set_result(None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


_OK: Final = 0
_UNMASKED: Final = 1
_TOO_BIG: Final = 2
_CLOSE_SEEN: Final = 3


class _Closing:
    """The sockets whose closing handshake is under way, so that shutdown
    can wait (at most the close timeout) for them to end."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._sockets: set[_Socket] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, sock: _Socket) -> None:
        self._sockets.add(sock)
        self._idle.clear()

    def discard(self, sock: _Socket) -> None:
        self._sockets.discard(sock)
        if not self._sockets:
            self._idle.set()

    async def wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.timeout + 1.0)


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
