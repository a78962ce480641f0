"""Session: what one connection may do, whatever the transport.

A transport (aiohttp, ASGI) reads frames off a WebSocket and hands each to
its connection's ``Session``: ``receive`` for a text frame, ``receive_binary``
for a binary one. The session decodes it (``core.protocol``), applies the
connection's terms — its rate limit, the rooms its ``Admission`` allows, the
room cap — and acts through the node: join and leave, publish with an ack,
presence queries. Every refusal is answered on the connection: an ``error``
frame, or a close frame with its code for policy breaches. Nothing here
knows a web framework or a socket; when the socket is gone the transport
calls ``closed``.

``receive`` returns an awaitable for the frames whose answer needs the
network (a join that catches up, a presence query, a message the node's
publish ``Screen`` must see first): the transport awaits it before reading
the next frame, so a client's frames keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from .backends import Stamp, Unstored, data_digest
from .core.access import Admission, Handshake
from .core.connection import Connection, ConnectionState, Transport
from .core.exceptions import BroadcastError, ProtocolError, Refused
from .core.protocol import (
    Catchup,
    ClientFrame,
    CloseCode,
    ErrorCode,
    Join,
    Leave,
    Message,
    Ping,
    PresenceQuery,
    Refresh,
    SendMessage,
    decode_client_frame,
    encode_ack,
    encode_error,
    encode_event,
    encode_presence,
)
from .core.ratelimit import RateLimiter, Verdict
from .core.screen import Reject, Replace, Screen, Submission
from .node import Node

__all__ = ["Session"]

log = logging.getLogger("realtime.session")


class Session:
    """One connection's conversation with the pod."""

    __slots__ = ("_expiry", "_limiter", "_node", "admission", "conn")

    def __init__(self, node: Node, conn: Connection, granted: Admission) -> None:
        self._node = node
        self.conn = conn
        self.admission = granted
        self._limiter: RateLimiter | None = None
        """Made at the first frame rather than at accept: a bucket starts
        full either way, so the limit is the same, and an idle connection
        does not carry one (about 160 bytes)."""
        self._expiry: asyncio.TimerHandle | None = None

    @classmethod
    def open(
        cls, node: Node, transport: Transport, handshake: Handshake, granted: Admission
    ) -> Session:
        """The session of a WebSocket the transport has just accepted for
        ``handshake``; it joins its room when ``start`` is awaited."""
        session = cls(node, node.connect(transport, handshake, granted), granted)
        session._expire_at(granted.expires_at)
        return session

    def _expire_at(self, expires_at: float | None) -> None:
        """Close the connection with 1008 at ``expires_at`` (None: never)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if expires_at is not None:
            delay = max(0.0, expires_at - time.time())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    async def start(self, room: str | None, catchup: Catchup) -> None:
        """Join the room of the URL (with its catch-up) and send the welcome,
        which comes once the room is live for this client."""
        if room is None:
            self._welcome()
        else:
            await self._node.join(self.conn, room, catchup, self._welcome)

    def _welcome(self) -> None:
        conn = self.conn
        node = self._node
        room = conn.default_room
        limits = node.settings.limits
        node.hub.send_to(
            conn,
            encode_event(
                "welcome",
                connection_id=conn.id,
                user=conn.identity.as_json(),
                pod=node.pod_id,
                room=room,
                rooms=sorted({*conn.rooms, room} if room is not None else conn.rooms),
                expires_at=self.admission.expires_at,
                limits={
                    "max_message_bytes": limits.max_message_bytes,
                    "max_rooms": limits.max_rooms,
                },
                **({} if self.admission.data is None else {"data": self.admission.data}),
            ),
        )

    def closed(self, client_code: int | None = None) -> None:
        """The socket is gone: forget the connection everywhere (idempotent).
        ``client_code``: the code of the client's Close if the client closed
        first (the transport knows), counted instead of the server's."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._node.disconnect(self.conn, client_code)

    def _expire(self) -> None:
        if self.conn.state is ConnectionState.OPEN:
            self._node.counters.closed_expired += 1
            self.conn.close(CloseCode.POLICY_VIOLATION, "token expired")

    # -- frames -------------------------------------------------------------------

    def receive(self, raw: str | bytes) -> Awaitable[None] | None:
        """A text frame from the client; an awaitable when its answer needs
        the network (await it before the next frame)."""
        conn = self.conn
        if conn.state is not ConnectionState.OPEN:
            return None
        node = self._node
        node.counters.frames_received += 1
        if node.settings.limits.rate_per_second > 0 and not self._within_rate(raw):
            return None
        try:
            return self._dispatch(decode_client_frame(raw))
        except ProtocolError as exc:
            self._error(exc)
            return None
        except Exception:
            # A bug of ours must cost one connection, never the pod.
            log.exception(
                "internal error on connection %s", conn.id, extra={"connection_id": conn.id}
            )
            conn.close(CloseCode.INTERNAL_ERROR, "internal error")
            return None

    def receive_control(self) -> bool:
        """A ping from the client: it counts against the same rate limit as
        text frames. Returns whether to answer it (over the limit it is
        dropped, unanswered; a flood is closed with 1008)."""
        if self.conn.state is not ConnectionState.OPEN:
            return False
        return self._node.settings.limits.rate_per_second <= 0 or self._within_rate(None)

    def receive_binary(self) -> None:
        """A binary frame: not part of the protocol."""
        self._node.counters.frames_received += 1
        self.conn.close(
            CloseCode.UNSUPPORTED_DATA, "binary frames are not supported; send JSON text frames"
        )

    def _error(self, exc: ProtocolError) -> None:
        self._send_error(exc.code, exc.message, exc.ref)

    def _send_error(
        self, code: str, message: str, ref: str | int | None, *, counted_as: str | None = None
    ) -> None:
        """An ``error`` frame to the client, counted by code (or by
        ``counted_as``: the application's codes are not metric labels)."""
        counters = self._node.counters
        counters.errors_sent += 1
        label = counted_as or code
        counters.errors[label] = counters.errors.get(label, 0) + 1
        self._node.hub.send_to(self.conn, encode_error(code, message, ref))

    def _within_rate(self, raw: str | bytes | None) -> bool:
        """Apply the rate limit: answer a text frame over it with
        ``rate_limited`` (dropping it; a control frame, ``raw`` None, is
        dropped silently), close a flood with 1008."""
        now = time.monotonic()
        limiter = self._limiter
        if limiter is None:
            limits = self._node.settings.limits
            limiter = self._limiter = RateLimiter(
                limits.rate_per_second, limits.rate_burst, limits.rate_max_refused, now=now
            )
        verdict = limiter.check(now)
        if verdict is Verdict.ALLOW:
            return True
        counters = self._node.counters
        if verdict is Verdict.ABUSE:
            counters.closed_rate_abuse += 1
            self.conn.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
            return False
        counters.rate_limited += 1
        if raw is None:
            return False
        try:
            ref = decode_client_frame(raw).ref
        except ProtocolError as exc:
            ref = exc.ref
        message = f"over {limiter.rate:g} frames per second; this frame was dropped"
        self._send_error(ErrorCode.RATE_LIMITED, message, ref)
        return False

    def _dispatch(self, frame: ClientFrame) -> Awaitable[None] | None:
        conn = self.conn
        hub = self._node.hub
        match frame:
            case SendMessage():
                return self._send(frame)
            case Join(room=room, ref=ref):
                if room not in conn.rooms:
                    self._check_join(room, ref)
                    return self._node.join(
                        conn,
                        room,
                        frame.catchup,
                        lambda: hub.send_to(conn, encode_event("joined", room=room, ref=ref)),
                    )
                hub.send_to(conn, encode_event("joined", room=room, ref=ref))
            case Leave(room=room, ref=ref):
                if room not in conn.rooms:
                    raise ProtocolError(ErrorCode.NOT_IN_ROOM, f"not in room {room!r}", ref=ref)
                self._node.leave(conn, room)
                hub.send_to(conn, encode_event("left", room=room, ref=ref))
            case Ping(ref=ref):
                hub.send_to(conn, encode_event("pong", ref=ref))
            case PresenceQuery(room=room, ref=ref):
                if room not in conn.rooms:
                    raise ProtocolError(ErrorCode.NOT_IN_ROOM, f"join room {room!r} first", ref=ref)
                return self._presence(room, ref)
            case Refresh(token=token, ref=ref):
                return self._refresh(token, ref)
        return None

    async def _refresh(self, token: str, ref: str | int | None) -> None:
        """Take a new credential for the same user: new terms (expiry, rooms)
        from now on; rooms it may not join are left with a ``left`` frame
        saying why. A bad one is refused and changes nothing."""
        node = self._node
        conn = self.conn
        if node.reauthorize is None:
            self._send_error(ErrorCode.INVALID_TOKEN, "this server does not use tokens", ref)
            return
        try:
            granted = await node.reauthorize(token, self.admission)
        except Refused as exc:
            self._send_error(ErrorCode.INVALID_TOKEN, exc.reason, ref)
            return
        if conn.state is not ConnectionState.OPEN:
            return
        if granted.holder != self.admission.holder:
            message = "the new token is for another user; reconnect to change users"
            self._send_error(ErrorCode.INVALID_TOKEN, message, ref)
            return
        self.admission = granted
        self._expire_at(granted.expires_at)
        node.counters.refreshed += 1
        hub = node.hub
        hub.send_to(conn, encode_event("refreshed", ref=ref, expires_at=granted.expires_at))
        for room in sorted(conn.rooms):
            if not granted.allows(room):
                node.leave(conn, room)
                hub.send_to(
                    conn,
                    encode_event("left", room=room, ref=None, reason=ErrorCode.FORBIDDEN_ROOM),
                )

    def _check_join(self, room: str, ref: str | int | None) -> None:
        """Raise ``ProtocolError`` unless the connection may join ``room``."""
        if not self.admission.allows(room):
            raise ProtocolError(ErrorCode.FORBIDDEN_ROOM, f"not allowed in room {room!r}", ref=ref)
        max_rooms = self._node.settings.limits.max_rooms
        if len(self.conn.rooms) >= max_rooms:
            raise ProtocolError(
                ErrorCode.TOO_MANY_ROOMS,
                f"a connection may be in at most {max_rooms} rooms",
                ref=ref,
            )

    async def _presence(self, room: str, ref: str | int | None) -> None:
        hub = self._node.hub
        try:
            members = await self._node.presence.members(room)
        except BroadcastError as exc:
            self._send_error(ErrorCode.UNAVAILABLE, f"presence unavailable: {exc}", ref)
            return
        hub.send_to(self.conn, encode_presence(room, [m.as_json() for m in members], ref))

    def _send(self, frame: SendMessage) -> Awaitable[None] | None:
        conn = self.conn
        room = conn.default_room if frame.room is None else frame.room
        if room is not None and room not in conn.rooms:  # never joined, or left since
            raise ProtocolError(
                ErrorCode.NOT_IN_ROOM, f"join room {room!r} before sending to it", ref=frame.ref
            )
        screen = self._node.screen
        if screen is not None and not self.admission.trusted:
            return self._screened(screen, frame, room)
        self._publish(frame, room, frame.data)
        return None

    async def _screened(self, screen: Screen, frame: SendMessage, room: str | None) -> None:
        """Send ``frame`` as the node's publish screen decides (the transport
        awaits this before the next frame: the client's order holds)."""
        conn = self.conn
        key = None if room is None else frame.key
        try:
            decision = await screen(Submission(room, conn.identity, frame.data, key, conn.id))
        except Exception:
            log.exception("publish screen failed", extra={"connection_id": conn.id})
            self._send_error(
                ErrorCode.UNAVAILABLE, "the message could not be checked; not sent", frame.ref
            )
            return
        if conn.state is not ConnectionState.OPEN:
            return
        if room is not None and room not in conn.rooms:  # removed while it was checked
            self._send_error(ErrorCode.NOT_IN_ROOM, f"not in room {room!r} any more", frame.ref)
        elif isinstance(decision, Reject):
            self._send_error(decision.code, decision.message, frame.ref, counted_as="rejected")
        elif isinstance(decision, Replace):
            # Under its key the message stays what the client sent: a resend is a duplicate.
            self._publish(frame, room, decision.data, digest=data_digest(frame.data))
        else:
            self._publish(frame, room, frame.data)

    def _publish(
        self, frame: SendMessage, room: str | None, data: Any, *, digest: str | None = None
    ) -> None:
        conn = self.conn
        node = self._node
        key = None if room is None else frame.key  # messages to everyone are not stored
        message = Message(
            id=node.message_id(room, key),
            room=room,
            sender=conn.identity,
            ts=time.time_ns() // 1_000_000,
            data=data,
            digest=digest,
        )
        node.counters.messages_received += 1
        ref = frame.ref
        if room is None:
            node.publish(message)
            if ref is not None:
                node.hub.send_to(conn, encode_ack(ref, message.id, None))
            return

        def acked(outcome: Stamp | Unstored) -> None:
            if outcome is Unstored.CONFLICT:
                self._error(
                    ProtocolError(
                        ErrorCode.KEY_CONFLICT,
                        f"key {key!r} was used for another message in room {room!r}",
                        ref=ref,
                    )
                )
            elif ref is None:
                return
            elif isinstance(outcome, Stamp):
                ack = encode_ack(
                    ref,
                    message.id,
                    room,
                    epoch=outcome.epoch,
                    offset=outcome.offset,
                    duplicate=outcome.duplicate,
                    replicated=outcome.replicated,
                )
                node.hub.send_to(conn, ack)
            else:  # not stored: this pod's members got it without offset, or none did
                node.hub.send_to(conn, encode_ack(ref, message.id, room))

        node.publish(message, acked if ref is not None or key is not None else None, key=key)
