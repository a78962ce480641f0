"""The ASGI transport: the same routes and protocol under any ASGI server.

``AsgiTransport(node)`` is an ASGI application. Make it the endpoint of two
WebSocket routes of a Starlette or FastAPI app (``WebSocketRoute(path,
transport)`` for ``path`` and ``path + "/{room}"``: the room comes from the
route's ``room`` path parameter), or run it as the whole application (the
room is then the path after ``prefix``; it answers the lifespan protocol by
starting and stopping the node). Nothing here imports a web framework.

Each connection costs two tasks: the server's, which runs the reader loop
and hands every frame to the connection's ``Session``, and a writer: an
ASGI server is written to by awaiting ``send``, so a connection's frames go
through a queue of its own, and the bytes queued are the bounded send
buffer (a client that falls behind is closed with 1013). A broadcast still
encodes its text once for every member (``Outgoing.encoded``). Pings and
the closing handshake are the server's (uvicorn: ``--ws-ping-interval``); a
refusal before the upgrade is an HTTP answer where the server offers the
``websocket.http.response`` extension, else a plain 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from ..core.connection import ConnectionState, Outgoing
from ..core.exceptions import Refused
from ..core.protocol import CloseCode
from ..node import Node
from ..session import Session

__all__ = ["AsgiTransport"]

log = logging.getLogger("realtime.transports.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _text(payload: bytes) -> str:
    return payload.decode()


class AsgiTransport:
    """WebSocket endpoints of one pod as an ASGI application."""

    def __init__(self, node: Node, *, prefix: str = "", close_timeout: float = 5.0) -> None:
        self._node = node
        self._prefix = prefix.rstrip("/")
        self._close_timeout = close_timeout
        self._max_bytes = node.settings.limits.max_message_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._serve(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            body = b"WebSocket endpoint: connect with a WebSocket client"
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Run as the whole application: start and stop the node with the server."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._node.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._node.close_connections()
                await self._node.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _room(self, scope: Scope) -> tuple[bool, str | None]:
        """``(found, room)``: the room of a route's ``room`` parameter, or of
        the path after ``prefix`` (None: the global channel)."""
        params = scope.get("path_params")
        if params is not None:
            room = params.get("room")
            return True, None if room is None else str(room)
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if not path.startswith(self._prefix):
            return False, None
        rest = path[len(self._prefix) :].strip("/")
        if "/" in rest:
            return False, None
        return True, rest or None

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        found, room = self._room(scope)
        node = self._node
        try:
            if not found:
                raise Refused(404, "no such WebSocket route")
            async with node.admit(
                room=room,
                query=dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))),
                headers=_headers(scope),
                remote=(scope.get("client") or (None,))[0],
            ) as (handshake, granted):
                await send({"type": "websocket.accept"})
                sock = _Socket(send, self._close_timeout)
                session = Session.open(node, sock, handshake, granted)
                sock.on_abandon = session.closed
        except Refused as exc:
            await _refuse(scope, send, exc)
            return
        conn = session.conn
        max_bytes = self._max_bytes
        disconnected = False
        client_code: int | None = None
        try:
            await session.start(handshake.room, handshake.catchup)
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    disconnected = True
                    if conn.state is ConnectionState.OPEN:  # the client closed first
                        client_code = message.get("code", 1005)
                    return
                if kind != "websocket.receive":
                    continue
                text = message.get("text")
                if text is None:
                    session.receive_binary()
                elif len(text) * 4 > max_bytes and len(text.encode()) > max_bytes:
                    conn.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
                else:
                    pending = session.receive(text)
                    if pending is not None:
                        # A join with catch-up, a presence query: later frames
                        # of this client wait for it, so they keep their order.
                        await pending
                # The server hands over frames already read without yielding:
                # give the writers a turn, or a burst from one client would
                # fill every member's queue (and count as their slowness).
                await asyncio.sleep(0)
        finally:
            session.closed(client_code)
            await sock.finish(disconnected=disconnected)


async def _refuse(scope: Scope, send: Send, exc: Refused) -> None:
    """An HTTP answer before the upgrade, where the server can give one."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
        return
    headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    headers.append((b"content-type", b"text/plain; charset=utf-8"))
    await send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": exc.reason.encode()})


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (repeated ones joined by ``,``)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


class _Socket:
    """The ``Transport`` of one connection: a queue and the task that
    writes it to the ASGI server, in order, then the close."""

    __slots__ = (
        "_close",
        "_close_timeout",
        "_queue",
        "_queued",
        "_send",
        "_waiter",
        "_writer",
        "on_abandon",
    )

    def __init__(self, send: Send, close_timeout: float) -> None:
        self._send = send
        self.on_abandon: Callable[[], None] | None = None
        """Called when a close could not be delivered in time: the client
        is given up on (the server still holds its TCP connection until its
        own close timeout)."""
        self._close_timeout = close_timeout
        self._queue: deque[Outgoing] = deque()
        self._queued = 0
        """Bytes of the payloads in the queue: the send buffer's fill."""
        self._close: tuple[int, str] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writer = self._spawn(self._write())

    @staticmethod
    def _spawn(coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_writer_done)
        return task

    def write(self, out: Outgoing) -> None:
        if self._close is None:
            self._queue.append(out)
            self._queued += len(out.payload)
            self._wake()

    def write_many(self, outs: list[Outgoing]) -> None:
        for out in outs:
            self.write(out)

    def buffered(self) -> int:
        return self._queued

    def close(self, code: int, reason: str) -> None:
        """Send the close after what is queued; if that has not gone out
        within the close timeout (a client that stopped reading), drop it
        and send the close at once (the server then cuts the connection
        after its own close timeout)."""
        if self._close is not None:
            return
        self._close = (code, reason)
        self._wake()
        asyncio.get_running_loop().call_later(self._close_timeout, self._force)

    def _force(self) -> None:
        if not self._writer.done():
            self._writer.cancel()
            self._queue.clear()
            self._queued = 0
            self._writer = self._spawn(self._send_close())
            if self.on_abandon is not None:
                self.on_abandon()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _write(self) -> None:
        queue = self._queue
        send = self._send
        loop = asyncio.get_running_loop()
        while True:
            while queue:
                out = queue.popleft()
                self._queued -= len(out.payload)
                await send({"type": "websocket.send", "text": out.encoded(_text)})
            if self._close is not None:
                await self._send_close()
                return
            self._waiter = loop.create_future()
            await self._waiter
            self._waiter = None

    async def _send_close(self) -> None:
        assert self._close is not None  # only once a close was asked for
        code, reason = self._close
        await self._send({"type": "websocket.close", "code": code, "reason": reason[:123]})

    async def finish(self, *, disconnected: bool) -> None:
        """The reader loop ended. If the client is gone, stop writing; else
        close (1011 if nothing asked for a close: the loop failed) and give
        the writer the close timeout to send what it has."""
        if disconnected:
            self._writer.cancel()
        elif self._close is None:
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._writer), self._close_timeout * 2)
        if not self._writer.done():
            self._writer.cancel()


def _writer_done(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    # The server refuses sends once the client is gone (uvicorn raises an
    # OSError, others a RuntimeError): the reader loop ends on its own then.
    if exc is not None and not isinstance(exc, OSError | RuntimeError):
        log.warning("writing to a WebSocket failed: %r", exc)
