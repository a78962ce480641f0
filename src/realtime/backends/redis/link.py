"""A pod's connection to Redis: RESP3, commands and pub/sub on one socket.

Both halves of the hot path go through it. **Out**: a batch of packed
commands is written at once (``call``) and one future resolves with all of
its replies, so a batch costs one wake-up however many messages it carries.
**In**: pub/sub messages arrive as RESP3 pushes, each handed to a callback
as ``(channel, data)`` straight from the ``hiredis`` parser, without a task,
a queue or a lock per message.

One connection for both, rather than a subscriber and a publisher: when a
pod appends to a room it hosts, Redis writes the script's reply and the
pod's own copy of the room's message (the push) to this one socket, in one
write; the pod reads them in one wake-up. (On two connections that was two
writes for Redis and two wake-ups for the pod, for every message.)

``SUBSCRIBE`` and ``UNSUBSCRIBE`` are written synchronously and confirmed by
pushes (``channels`` holds the confirmed set). Redis handles a connection's
commands in order, so a subscribe followed at once by an unsubscribe of the
same channel ends unsubscribed: the order of the calls is the order of the
outcome. Error replies come back in their place as ``ResponseError``
(``NoScriptError`` for an unknown script), as redis-py would raise them. A
connection that is lost fails every batch in flight with ``InFlightLost``:
whether those commands ran is unknown; a batch never written fails with a
plain ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

import hiredis
from redis.exceptions import NoScriptError, ResponseError

from ...core.exceptions import BroadcastError
from .resp import InFlightLost, RedisAddress, pack_command

__all__ = ["Link", "OnMessage", "open_link"]

OnMessage = Callable[[bytes, bytes], None]
"""Called with ``(channel, data)`` for every pub/sub message, in arrival order."""

_CLOSED = "Redis closed the connection"
STALLED = "Redis did not answer in time (stalled?)"
"""Why a link was dropped when a reply or the heartbeat did not come back."""
_CHUNK = 512  # channels per SUBSCRIBE command when (re)subscribing many at once
_PUSH = hiredis.PushNotification


class Link(asyncio.Protocol):
    """One RESP3 connection to Redis: replies in order, pushes as they come.

    ``closed`` resolves when the connection is gone, for whatever reason
    (``lost_reason`` says which).
    """

    def __init__(
        self, on_message: OnMessage, on_subscribe: Callable[[bytes], None] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_subscribe = on_subscribe
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        # Batches in flight, oldest first: (replies expected, future).
        self._waiting: deque[tuple[int, asyncio.Future[list[Any]]]] = deque()
        self._replies: list[Any] = []
        self.channels: set[bytes] = set()
        """Channels Redis has confirmed."""
        self.closed: asyncio.Future[None] = loop.create_future()
        self.lost_reason = _CLOSED

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        on_message = self._on_message
        replies = self._replies
        try:
            while (reply := reader.gets()) is not False:
                if type(reply) is _PUSH:
                    kind = reply[0]
                    if kind == b"message":
                        on_message(reply[1], reply[2])
                    elif kind == b"subscribe":
                        self.channels.add(reply[1])
                        if self._on_subscribe is not None:
                            self._on_subscribe(reply[1])
                    elif kind == b"unsubscribe":
                        self.channels.discard(reply[1])
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    reply = _error(str(reply))
                replies.append(reply)
                if not self._waiting:
                    self.abort("a reply nobody asked for")
                    return
                count, future = self._waiting[0]
                if len(replies) == count:
                    self._waiting.popleft()
                    self._replies = []
                    if not future.done():
                        future.set_result(replies)
                    replies = self._replies
        except hiredis.ProtocolError as exc:
            self.abort(f"unreadable reply from Redis: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.lost_reason is _CLOSED:
            self.lost_reason = f"connection lost: {exc!r}"
        self._transport = None
        self.channels.clear()
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(InFlightLost(self.lost_reason))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- commands ------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def call(self, commands: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Write ``count`` packed commands; the future gets their replies."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        transport = self._transport
        if transport is None or transport.is_closing():
            future.set_exception(ConnectionError(self.lost_reason))
            return future
        self._waiting.append((count, future))
        transport.write(commands)
        return future

    def subscribe(self, channels: Iterable[bytes]) -> None:
        """SUBSCRIBE, batched in chunks; confirmed channels appear in ``channels``."""
        self._batched(b"SUBSCRIBE", list(channels))

    def unsubscribe(self, channels: Iterable[bytes] | None = None) -> None:
        """UNSUBSCRIBE from ``channels``, or from every channel if None."""
        if channels is None:
            self._write(pack_command(b"UNSUBSCRIBE"))
        else:
            self._batched(b"UNSUBSCRIBE", list(channels))

    def _batched(self, command: bytes, channels: list[bytes]) -> None:
        for i in range(0, len(channels), _CHUNK):
            self._write(pack_command(command, *channels[i : i + _CHUNK]))

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        """Close after the data already written has been sent."""
        if self._transport is not None:
            self._transport.close()

    def abort(self, reason: str | None = None) -> None:
        """Drop the connection now; batches in flight fail."""
        if reason is not None:
            self.lost_reason = reason
        if self._transport is not None:
            self._transport.abort()


def _error(text: str) -> ResponseError:
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    return ResponseError(text)


def _hello(address: RedisAddress, client_name: str) -> bytes:
    """HELLO 3 (with AUTH if a password is set, and the client's name), and
    SELECT of the URL's database (for the keys: pub/sub ignores it)."""
    args = [b"HELLO", b"3"]
    if address.password is not None:
        args += [b"AUTH", (address.username or "default").encode(), address.password.encode()]
    args += [b"SETNAME", client_name.encode()]
    hello = pack_command(*args)
    if address.db:
        hello += pack_command(b"SELECT", str(address.db).encode())
    return hello


async def open_link(
    address: RedisAddress,
    on_message: OnMessage,
    *,
    on_subscribe: Callable[[bytes], None] | None = None,
    client_name: str,
    timeout: float,
) -> Link:
    """Connect, speak RESP3, authenticate, name the connection and select the
    database within ``timeout``. Raises ``OSError``, ``TimeoutError`` or
    ``BroadcastError``; on failure the connection is already closed.
    (Subscriptions come next, ``subscribe``, confirmed by pushes: see
    ``on_subscribe``.)"""
    link: Link | None = None

    def factory() -> Link:
        nonlocal link
        link = Link(on_message, on_subscribe)
        return link

    try:
        async with asyncio.timeout(timeout):
            await address.connect(factory)
            assert link is not None  # the factory ran when the connection was made
            count = 2 if address.db else 1
            replies = await link.call(_hello(address, client_name), count)
            refused = [r for r in replies if isinstance(r, ResponseError)]
            if refused:
                raise BroadcastError(f"Redis refused the connection: {refused[0]}")
    except BaseException:
        if link is not None:
            link.abort()
        raise
    return link
