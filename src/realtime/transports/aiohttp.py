"""The aiohttp adapter: WebSocket routes, the reader loop, and stats.

With ``wsio``, its plumbing, the only module of ``realtime`` that knows
aiohttp. Each connection costs one task (aiohttp's request handler, which runs
the reader loop) and no writer task: frames go straight to the connection's
transport, whose write buffer is the bounded send buffer (see ``wsio`` and
``connection.py``). Nor does it cost a timer: one pod-wide keepalive tick
pings the clients that have gone quiet (see ``guard``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from ..backends.base import Broadcaster, Stamp
from ..core.access import admission
from ..core.connection import Connection, ConnectionState
from ..core.exceptions import BroadcastError, ProtocolError
from ..core.hub import LocalHub
from ..core.protocol import (
    Catchup,
    ClientFrame,
    CloseCode,
    ErrorCode,
    Join,
    Leave,
    Message,
    Ping,
    PresenceQuery,
    SendMessage,
    decode_client_frame,
    encode_ack,
    encode_error,
    encode_event,
    pong_frame,
)
from ..rooms.presence import Presence
from ..rooms.timeline import Timeline
from .guard import Guard, Keepalive, Warden
from .wsio import Closer, Identify, Ids, TransportSink, guest_identity, requested_room, upgrade

__all__ = ["Handler", "HandlerSettings", "Identify", "guest_identity"]

log = logging.getLogger("realtime.handler")


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
    started: float = field(default_factory=time.monotonic)


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
        self._message_ids = Ids()
        self._connection_ids = Ids()
        self._closer = Closer(settings.close_timeout)
        self._draining = False
        self._live = 0
        self._keepalive = Keepalive(hub, settings.ping_interval)
        self._warden = Warden(
            hub,
            max_rooms=settings.max_rooms,
            rate_per_second=settings.rate_per_second,
            rate_burst=settings.rate_burst,
            rate_max_refused=settings.rate_max_refused,
        )
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
        ``Guard`` (aiohttp keeps its own objects): the set-up runs in
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
                        conn.send_frame(pong_frame(msg.data))
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
    ) -> tuple[web.WebSocketResponse, Connection | None, Guard | None]:
        """Admit, upgrade, register, join the room and greet; no connection
        if the client vanished during the upgrade."""
        room, catchup = requested_room(request)
        connection_id = self._connection_ids()
        granted = admission(await self._identify(request, connection_id))
        if not granted.allows(room):
            where = "the global channel" if room is None else f"room {room!r}"
            raise web.HTTPForbidden(text=f"not allowed in {where}")

        ws, transport = await upgrade(request, self._max_msg_size, self._settings.close_timeout)
        if transport is None:  # vanished during the upgrade
            return ws, None, None
        conn = Connection(
            connection_id,
            granted.identity,
            TransportSink(self._closer, ws, transport),
            max_buffered=self._settings.max_buffered_bytes,
            default_room=room,
        )
        self.counters.connections_accepted += 1
        self._hub.add(conn)
        self._keepalive.arm()
        guard = self._warden.guard(conn, granted)
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

    def _release(self, conn: Connection, guard: Guard) -> None:
        """The socket is gone: forget the connection everywhere."""
        guard.disarm()
        if self._presence is not None:
            self._presence.drop(conn)
        self._hub.remove(conn)
        conn.closed()

    def _on_text(self, conn: Connection, guard: Guard, raw: str | bytes) -> Awaitable[None] | None:
        if self._settings.rate_per_second > 0 and not self._warden.within_rate(conn, guard, raw):
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

    def _dispatch(
        self, conn: Connection, guard: Guard, frame: ClientFrame
    ) -> Awaitable[None] | None:
        match frame:
            case SendMessage():
                self._on_message(conn, frame)
            case Join(room=room, ref=ref):
                if room not in conn.rooms:
                    self._warden.check_join(conn, guard, room, ref)
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

    async def close_all(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> int:
        """Close every connection with ``code`` and wait (up to the close
        timeout) for the close frames to go out. Returns how many."""
        count = self._hub.close_all(code, reason or "server shutting down")
        self._keepalive.stop()
        await self._closer.wait()
        return count

    # -- stats --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        hub = self._hub.counters
        guarded = self._warden.counters
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
            # Each frame refused by the rate limit was answered with an error.
            "errors_sent": self.counters.errors_sent + guarded.rate_limited,
            "slow_client_disconnects": hub.slow_client_disconnects,
            "refused": {str(status): n for status, n in sorted(self.counters.refused.items())},
            "rate_limited": guarded.rate_limited,
            "policy_closes": {
                "rate_limit": guarded.closed_rate_abuse,
                "token_expired": guarded.closed_expired,
            },
            "broadcaster": dict(self._broadcaster.stats()),
            **({"timeline": self._timeline.stats()} if self._timeline is not None else {}),
            **({"presence": self._presence.stats()} if self._presence is not None else {}),
        }
