"""The aiohttp adapter: WebSocket routes, the reader loop, and stats.

This is the only module of ``realtime`` that knows aiohttp. Each connection
costs one task (aiohttp's request handler, which runs the reader loop) and no
writer task: frames go straight to the connection's transport, whose write
buffer is the bounded send buffer (see ``connection.py``). Nor does it cost a
timer: one pod-wide keepalive tick pings the clients that have gone quiet
(aiohttp's own heartbeat would keep a timer per connection, about 0.6 KB).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from .access import Admission, RoomCheck, admission
from .broadcast.base import Broadcaster, Stamp
from .connection import Connection, ConnectionState
from .exceptions import BroadcastError, ProtocolError
from .hub import LocalHub
from .presence import Presence
from .protocol import (
    NO_CATCHUP,
    Catchup,
    ClientFrame,
    CloseCode,
    ErrorCode,
    Identity,
    Join,
    Leave,
    Message,
    Ping,
    PresenceQuery,
    SendMessage,
    close_frame,
    decode_client_frame,
    encode_ack,
    encode_error,
    encode_event,
    parse_catchup,
    validate_room,
)
from .ratelimit import RateLimiter, Verdict
from .timeline import Timeline

__all__ = ["Handler", "HandlerSettings", "Identify", "guest_identity"]

log = logging.getLogger("realtime.handler")

Identify = Callable[[web.Request, str], Awaitable[Identity | Admission]]
"""Decide who a new connection is (given the request and a fresh connection
id), or refuse it by raising an ``aiohttp.web.HTTPException`` (answered
before the WebSocket is accepted). An ``Admission`` adds an expiry time and
room authorization to the identity."""


@dataclass(frozen=True, slots=True)
class HandlerSettings:
    pod_id: str
    max_message_bytes: int = 64 * 1024
    max_buffered_bytes: int = 1024 * 1024
    max_rooms: int = 10
    ping_interval: float = 20.0
    close_timeout: float = 5.0
    max_connections: int = 0
    """Open connections on this pod before new ones get HTTP 503 (0: no cap)."""
    rate_per_second: float = 0.0
    """Client frames per second per connection (0: no limit); see ``ratelimit``."""
    rate_burst: int = 100
    """Frames a connection may send at once before ``rate_per_second`` applies."""
    rate_max_refused: int = 100
    """Refused frames (draining at the rate) before a flood is closed with 1008."""


@dataclass(slots=True)
class HandlerCounters:
    connections_accepted: int = 0
    messages_received: int = 0
    errors_sent: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    rate_limited: int = 0
    closed_rate_abuse: int = 0
    closed_expired: int = 0
    started: float = field(default_factory=time.monotonic)


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


class _Ids:
    """Short ids unique across pods: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(5).hex()
        self._next = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._next):x}"


_PING = b"\x89\x00"
"""A WebSocket ping frame without payload (FIN + opcode 0x9, length 0)."""


def _pong(payload: bytes) -> bytes:
    """The pong frame answering a ping (FIN + opcode 0xA); the frame reader
    already refused control frames over 125 bytes, so one length byte fits."""
    return bytes((0x8A, len(payload))) + payload


class _TransportSink:
    """Writes frames straight to the aiohttp transport of one WebSocket."""

    __slots__ = ("_handler", "_transport", "_ws")

    def __init__(
        self, handler: Handler, ws: web.WebSocketResponse, transport: asyncio.Transport
    ) -> None:
        self._handler = handler
        self._ws = ws
        self._transport = transport

    def write(self, frame: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(frame)

    def buffered(self) -> int:
        return self._transport.get_write_buffer_size()

    def close(self, code: int, reason: str) -> None:
        self._handler._close_soon(self._ws, self._transport, code, reason)


@dataclass(slots=True)
class _Guard:
    """Per-connection terms: room authorization, rate limit, expiry timer."""

    may_join: RoomCheck | None = None
    limiter: RateLimiter | None = None
    expiry: asyncio.TimerHandle | None = None

    def allows(self, room: str) -> bool:
        return self.may_join is None or self.may_join(room)


class Handler:
    """WebSocket endpoints of one pod: ``routes()``, ``handle_websocket``, ``stats()``."""

    def __init__(
        self,
        hub: LocalHub,
        broadcaster: Broadcaster,
        settings: HandlerSettings,
        *,
        identify: Identify = guest_identity,
        timeline: Timeline | None = None,
        presence: Presence | None = None,
    ) -> None:
        self._hub = hub
        self._timeline = timeline
        """Room offsets, order and catch-up; None: plain best-effort rooms."""
        self._presence = presence
        self._broadcaster = broadcaster
        self._settings = settings
        # aiohttp refuses a message of exactly max_msg_size bytes. (Computed
        # once: an int this large is a new object each time, kept per socket.)
        self._max_msg_size = settings.max_message_bytes + 1
        self._identify = identify
        self._message_ids = _Ids()
        self._connection_ids = _Ids()
        self._closing: set[asyncio.Task[bool]] = set()
        self._draining = False
        self._live = 0
        self._keepalive: asyncio.TimerHandle | None = None
        self.counters = HandlerCounters()

    # -- routes -----------------------------------------------------------

    def routes(self, prefix: str = "") -> list[web.RouteDef]:
        """``GET {prefix}`` (global) and ``GET {prefix}/{room}``."""
        return [
            web.get(prefix, self.handle_websocket),
            web.get(prefix + "/{room}", self.handle_websocket),
        ]

    def new_message_id(self) -> str:
        """A fresh message id, unique across pods (for server-made messages)."""
        return self._message_ids()

    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> None:
        """Refuse new connections from now on (readiness turns false)."""
        self._draining = True

    # -- lifecycle of one connection -----------------------------------------

    async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
        """Refuse with an HTTP error before accepting (shutting down, pod full,
        bad room, or whatever ``identify`` refuses), else serve the socket.

        This coroutine is the connection's reader loop, and all that an idle
        connection keeps of the handler's besides a ``Connection`` and a
        ``_Guard`` (aiohttp keeps its own objects): the set-up runs in
        ``_accept``, which has returned before the loop waits, so its locals
        are not held for the connection's lifetime.
        """
        cap = self._settings.max_connections
        if self._draining:
            raise self._refused(web.HTTPServiceUnavailable(text="server is shutting down"))
        if cap and self._live >= cap:
            raise self._refused(
                web.HTTPServiceUnavailable(
                    text="server is full; try again later", headers={"Retry-After": "1"}
                )
            )
        self._live += 1
        try:
            try:
                ws, conn, guard = await self._accept(request)
            except web.HTTPException as exc:
                self._refused(exc)
                raise
            if conn is None or guard is None:  # vanished during the upgrade
                return ws
            try:
                while True:
                    msg = await ws.receive()
                    conn.quiet_ticks = 0
                    if msg.type is WSMsgType.TEXT:
                        if conn.state is ConnectionState.OPEN:
                            pending = self._on_text(conn, guard, msg.data)
                            if pending is not None:
                                # A join with catch-up: later frames of this
                                # client wait for it, so they keep their order.
                                await pending
                    elif msg.type is WSMsgType.BINARY:
                        conn.close(
                            CloseCode.UNSUPPORTED_DATA,
                            "binary frames are not supported; send JSON text frames",
                        )
                    elif msg.type is WSMsgType.PING:
                        conn.send_frame(_pong(msg.data))
                    elif msg.type is not WSMsgType.PONG:  # CLOSE, CLOSING, CLOSED, ERROR
                        return ws
            finally:
                self._release(conn, guard)
        finally:
            self._live -= 1

    def _refused(self, exc: web.HTTPException) -> web.HTTPException:
        """Count a refusal by its HTTP status; returns ``exc``."""
        self.counters.refused[exc.status] = self.counters.refused.get(exc.status, 0) + 1
        return exc

    async def _accept(
        self, request: web.Request
    ) -> tuple[web.WebSocketResponse, Connection | None, _Guard | None]:
        """Admit, upgrade, register, join the room and greet; no connection
        if the client vanished during the upgrade."""
        room = request.match_info.get("room")
        catchup = NO_CATCHUP
        if room is not None:
            try:
                validate_room(room)
                catchup = _query_catchup(request)
            except ProtocolError as exc:
                raise web.HTTPBadRequest(text=exc.message) from exc
        connection_id = self._connection_ids()
        granted = admission(await self._identify(request, connection_id))
        if not granted.allows(room):
            where = "the global channel" if room is None else f"room {room!r}"
            raise web.HTTPForbidden(text=f"not allowed in {where}")

        ws = web.WebSocketResponse(
            max_msg_size=self._max_msg_size,
            # Pings and pongs reach the reader loop: the keepalive tick pings,
            # the reader loop answers the client's pings itself.
            autoping=False,
            compress=False,
            timeout=self._settings.close_timeout,
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():  # vanished during the upgrade
            return ws, None, None
        conn = Connection(
            connection_id,
            granted.identity,
            _TransportSink(self, ws, transport),
            max_buffered=self._settings.max_buffered_bytes,
            default_room=room,
        )
        self.counters.connections_accepted += 1
        self._hub.add(conn)
        self._arm_keepalive()
        guard = self._guard(conn, granted)
        try:
            if room is not None and self._timeline is not None:
                # The welcome goes out once the room is live for this client.
                await self._attach(conn, room, catchup, functools.partial(self._greet, conn))
            else:
                if room is not None:
                    self._hub.join(conn, room)
                self._greet(conn)
        except BaseException:
            self._release(conn, guard)
            raise
        return ws, conn, guard

    def _greet(self, conn: Connection) -> None:
        room = conn.default_room
        self._hub.send_to(
            conn,
            encode_event(
                "welcome",
                connection_id=conn.id,
                user=conn.identity.as_json(),
                pod=self._settings.pod_id,
                room=room,
                rooms=sorted({*conn.rooms, room} if room is not None else conn.rooms),
                limits={
                    "max_message_bytes": self._settings.max_message_bytes,
                    "max_rooms": self._settings.max_rooms,
                },
            ),
        )

    def _release(self, conn: Connection, guard: _Guard) -> None:
        """The socket is gone: forget the connection everywhere."""
        if guard.expiry is not None:
            guard.expiry.cancel()
        if self._presence is not None:
            self._presence.drop(conn)
        self._hub.remove(conn)
        conn.closed()

    def _guard(self, conn: Connection, granted: Admission) -> _Guard:
        guard = _Guard(may_join=granted.may_join)
        if granted.expires_at is not None:
            delay = max(0.0, granted.expires_at - time.time())
            guard.expiry = asyncio.get_running_loop().call_later(delay, self._expire, conn)
        return guard

    def _expire(self, conn: Connection) -> None:
        if conn.state is ConnectionState.OPEN:
            self.counters.closed_expired += 1
            conn.close(CloseCode.POLICY_VIOLATION, "token expired")

    # -- keepalive ------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        if self._keepalive is None and self._settings.ping_interval > 0:
            loop = asyncio.get_running_loop()
            self._keepalive = loop.call_later(self._settings.ping_interval / 2, self._tick)

    def _tick(self) -> None:
        """Every half ping interval: ping each client that has sent nothing
        for two ticks (half to one whole interval), and close each that has
        not answered by the next tick (half an interval after the ping)."""
        self._keepalive = None
        for conn in self._hub.connections():
            conn.quiet_ticks += 1
            if conn.quiet_ticks == 2:
                conn.send_frame(_PING)
            elif conn.quiet_ticks > 2:
                conn.close(CloseCode.GOING_AWAY, "no answer to ping")
        if self._hub.connection_count:
            self._arm_keepalive()

    def _on_text(self, conn: Connection, guard: _Guard, raw: str | bytes) -> Awaitable[None] | None:
        if self._settings.rate_per_second > 0 and not self._within_rate(conn, guard, raw):
            return None
        try:
            frame = decode_client_frame(raw)
            return self._dispatch(conn, guard, frame)
        except ProtocolError as exc:
            self.counters.errors_sent += 1
            self._hub.send_to(conn, encode_error(exc.code, exc.message, exc.ref))
            return None
        except Exception:
            # A bug of ours must cost one connection, never the pod.
            log.exception("internal error on connection %s", conn.id)
            conn.close(CloseCode.INTERNAL_ERROR, "internal error")
            return None

    def _within_rate(self, conn: Connection, guard: _Guard, raw: str | bytes) -> bool:
        """Apply the rate limit: answer a frame over it with ``rate_limited``
        (dropping it), close a flood with 1008."""
        now = time.monotonic()
        limiter = guard.limiter
        if limiter is None:
            # Made at the first frame rather than at accept: a bucket starts
            # full either way, so the limit is the same, and an idle
            # connection does not carry one (about 160 bytes).
            s = self._settings
            limiter = RateLimiter(s.rate_per_second, s.rate_burst, s.rate_max_refused, now=now)
            guard.limiter = limiter
        verdict = limiter.check(now)
        if verdict is Verdict.ALLOW:
            return True
        if verdict is Verdict.ABUSE:
            self.counters.closed_rate_abuse += 1
            conn.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
            return False
        try:
            ref = decode_client_frame(raw).ref
        except ProtocolError as exc:
            ref = exc.ref
        self.counters.rate_limited += 1
        self.counters.errors_sent += 1
        message = f"over {limiter.rate:g} frames per second; this frame was dropped"
        self._hub.send_to(conn, encode_error(ErrorCode.RATE_LIMITED, message, ref))
        return False

    def _dispatch(
        self, conn: Connection, guard: _Guard, frame: ClientFrame
    ) -> Awaitable[None] | None:
        match frame:
            case SendMessage():
                self._on_message(conn, frame)
            case Join(room=room, ref=ref):
                if room not in conn.rooms:
                    if not guard.allows(room):
                        raise ProtocolError(
                            ErrorCode.FORBIDDEN_ROOM, f"not allowed in room {room!r}", ref=ref
                        )
                    if len(conn.rooms) >= self._settings.max_rooms:
                        raise ProtocolError(
                            ErrorCode.TOO_MANY_ROOMS,
                            f"a connection may be in at most {self._settings.max_rooms} rooms",
                            ref=ref,
                        )
                    if self._timeline is not None:
                        return self._attach(
                            conn,
                            room,
                            frame.catchup,
                            lambda: self._hub.send_to(
                                conn, encode_event("joined", room=room, ref=ref)
                            ),
                        )
                    self._hub.join(conn, room)
                self._hub.send_to(conn, encode_event("joined", room=room, ref=ref))
            case Leave(room=room, ref=ref):
                if room not in conn.rooms:
                    raise ProtocolError(ErrorCode.NOT_IN_ROOM, f"not in room {room!r}", ref=ref)
                self._hub.leave(conn, room)
                if self._presence is not None:
                    self._presence.leave(conn, room)
                self._hub.send_to(conn, encode_event("left", room=room, ref=ref))
            case Ping(ref=ref):
                self._hub.send_to(conn, encode_event("pong", ref=ref))
            case PresenceQuery(room=room, ref=ref):
                return self._on_presence(conn, room, ref)
        return None

    async def _attach(
        self, conn: Connection, room: str, catchup: Catchup, greet: Callable[[], object]
    ) -> None:
        assert self._timeline is not None
        await self._timeline.attach(conn, room, catchup, greet)
        if (
            self._presence is not None
            and room in conn.rooms
            and not self._hub.is_waiting(conn, room)
        ):
            self._presence.join(conn, room)

    def _on_presence(
        self, conn: Connection, room: str, ref: str | int | None
    ) -> Awaitable[None] | None:
        if self._presence is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "presence is not available", ref=ref)
        if room not in conn.rooms:
            raise ProtocolError(ErrorCode.NOT_IN_ROOM, f"join room {room!r} first", ref=ref)
        return self._send_presence(conn, room, ref, self._presence)

    async def _send_presence(
        self, conn: Connection, room: str, ref: str | int | None, presence: Presence
    ) -> None:
        try:
            members = await presence.members(room)
        except BroadcastError as exc:
            self._hub.send_to(
                conn, encode_error(ErrorCode.UNAVAILABLE, f"presence unavailable: {exc}", ref)
            )
            return
        fields: dict[str, Any] = {"room": room, "members": [m.as_json() for m in members]}
        if ref is not None:
            fields["ref"] = ref
        self._hub.send_to(conn, encode_event("presence", **fields))

    def _on_message(self, conn: Connection, frame: SendMessage) -> None:
        room = conn.default_room if frame.room is None else frame.room
        if frame.room is not None and frame.room not in conn.rooms:
            raise ProtocolError(
                ErrorCode.NOT_IN_ROOM,
                f"join room {frame.room!r} before sending to it",
                ref=frame.ref,
            )
        message = Message(
            id=self._message_ids(),
            room=room,
            sender=conn.identity,
            ts=time.time_ns() // 1_000_000,
            data=frame.data,
        )
        self.counters.messages_received += 1
        if room is not None and self._timeline is not None:
            ref = frame.ref

            def stamped(stamp: Stamp | None) -> None:
                if ref is not None:
                    self._hub.send_to(
                        conn,
                        encode_ack(
                            ref,
                            message.id,
                            room,
                            epoch=None if stamp is None else stamp.epoch,
                            offset=None if stamp is None else stamp.offset,
                        ),
                    )

            self._timeline.publish(message, stamped)
            return
        self._broadcaster.publish(message)
        if frame.ref is not None:
            self._hub.send_to(conn, encode_ack(frame.ref, message.id, room))

    # -- closing ------------------------------------------------------------

    def _close_soon(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport, code: int, reason: str
    ) -> None:
        """Send a close frame now; cut the TCP connection if the client has
        not let go within ``close_timeout`` (a client that stopped reading
        would otherwise hold its unsent buffer forever)."""
        if ws.closed or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self._settings.close_timeout, transport.abort)
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

    async def close_all(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> int:
        """Close every connection with ``code`` and wait (up to the close
        timeout) for the close frames to go out. Returns how many."""
        count = self._hub.close_all(code, reason or "server shutting down")
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=self._settings.close_timeout)
        return count

    # -- stats --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        hub = self._hub.counters
        rooms = self._hub.room_sizes()
        return {
            "pod": self._settings.pod_id,
            "uptime_s": round(time.monotonic() - self.counters.started, 3),
            "draining": self._draining,
            "connections": {
                "open": self._hub.connection_count,
                "accepted": self.counters.connections_accepted,
            },
            "rooms": rooms,
            "room_count": len(rooms),
            "messages": {
                "received": self.counters.messages_received,
                "broadcasts": hub.broadcasts,
                "delivered": hub.deliveries,
            },
            "errors_sent": self.counters.errors_sent,
            "slow_client_disconnects": hub.slow_client_disconnects,
            "refused": {str(status): n for status, n in sorted(self.counters.refused.items())},
            "rate_limited": self.counters.rate_limited,
            "policy_closes": {
                "rate_limit": self.counters.closed_rate_abuse,
                "token_expired": self.counters.closed_expired,
            },
            "broadcaster": dict(self._broadcaster.stats()),
            **({"timeline": self._timeline.stats()} if self._timeline is not None else {}),
            **({"presence": self._presence.stats()} if self._presence is not None else {}),
        }


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
