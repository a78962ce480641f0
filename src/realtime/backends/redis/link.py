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

from ...core.connection import holding_writes
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
_MORE = object()
"""What the parser returns when it needs more bytes (a reply may be ``False``
in RESP3: a Lua script's ``false``)."""


class Link(asyncio.Protocol):
    """One RESP3 connection to Redis: replies in order, pushes as they come.

    ``closed`` resolves when the connection is gone, for whatever reason
    (``lost_reason`` says which). ``sharded``: the Cluster's sharded pub/sub
    (``SSUBSCRIBE``, one command per channel: a command's channels must
    share a slot).
    """

    def __init__(
        self,
        on_message: OnMessage,
        on_subscribe: Callable[[bytes], None] | None = None,
        *,
        sharded: bool = False,
        on_dropped: Callable[[bytes, str], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_subscribe = on_subscribe
        self._on_dropped = on_dropped
        self.sharded = sharded
        self._subscribe = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        self._unsubscribe = b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE"
        self._reader = hiredis.Reader(notEnoughData=_MORE)
        self._transport: asyncio.Transport | None = None
        # What Redis will answer, oldest first: a batch of commands (replies
        # expected, future), or a (un)subscribe command (its channels, each
        # confirmed by a push; refused as a whole by an error reply).
        self._waiting: deque[_Waiting] = deque()
        self._replies: list[Any] = []
        self.channels: set[bytes] = set()
        """Channels Redis has confirmed."""
        self.closed: asyncio.Future[None] = loop.create_future()
        self.lost_reason = _CLOSED
        self.bytes_in = 0
        """Bytes read from Redis: replies and pushes."""

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        reader = self._reader
        reader.feed(data)
        try:
            reply = reader.gets()
            if reply is _MORE:
                return
            after = reader.gets()
            if after is _MORE:
                self._take(reply)
                return
            # Several at once: what they deliver to a member goes in one write.
            with holding_writes:
                if self._take(reply):
                    while after is not _MORE and self._take(after):
                        after = reader.gets()
        except hiredis.ProtocolError as exc:
            self.abort(f"unreadable reply from Redis: {exc}")

    def _take(self, reply: Any) -> bool:
        """One reply or push; False if the link was dropped."""
        if type(reply) is _PUSH:
            kind = reply[0]
            if kind == b"message" or kind == b"smessage":
                self._on_message(reply[1], reply[2])
            else:
                self._confirmed(kind, reply[1])
            return True
        return self._reply(reply)

    def _reply(self, reply: Any) -> bool:
        """A reply to a command (not a push); False if the link was dropped."""
        if isinstance(reply, hiredis.ReplyError):
            reply = _error(str(reply))
        waiting = self._waiting
        if not waiting:
            self.abort("a reply nobody asked for")
            return False
        head = waiting[0]
        if isinstance(head, _Subscription):  # Redis refused a (un)subscribe
            waiting.popleft()
            if self._on_dropped is not None and head.subscribe:
                for channel in head.channels:
                    self._on_dropped(channel, str(reply))
            return True
        replies = self._replies
        replies.append(reply)
        count, future = head
        if len(replies) == count:
            waiting.popleft()
            self._replies = []
            if not future.done():
                future.set_result(replies)
        return True

    def _confirmed(self, kind: bytes, channel: bytes) -> None:
        """A (un)subscribe confirmation, or a channel Redis dropped by itself
        (a Cluster slot that moved to another shard)."""
        subscribed = kind == b"subscribe" or kind == b"ssubscribe"
        if not subscribed and kind != b"unsubscribe" and kind != b"sunsubscribe":
            return  # a push we do not use
        waiting = self._waiting
        head = waiting[0] if waiting else None
        ours = (
            isinstance(head, _Subscription)
            and head.subscribe == subscribed
            and channel in head.channels
        )
        if ours:
            assert isinstance(head, _Subscription)
            head.channels.discard(channel)
            if not head.channels:
                waiting.popleft()
        if subscribed:
            self.channels.add(channel)
            if self._on_subscribe is not None:
                self._on_subscribe(channel)
            return
        self.channels.discard(channel)
        if not ours and self._on_dropped is not None:
            self._on_dropped(channel, "the channel's slot moved")

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.lost_reason is _CLOSED:
            self.lost_reason = f"connection lost: {exc!r}"
        self._transport = None
        self.channels.clear()
        while self._waiting:
            head = self._waiting.popleft()
            if isinstance(head, _Subscription):
                continue
            _, future = head
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
        """(S)SUBSCRIBE, batched; confirmed channels appear in ``channels``."""
        self._batched(self._subscribe, list(channels), subscribe=True)

    def unsubscribe(self, channels: Iterable[bytes] | None = None) -> None:
        """(S)UNSUBSCRIBE from ``channels``, or from every channel if None."""
        if channels is None:
            channels = list(self.channels)
            if not channels:
                return
        self._batched(self._unsubscribe, list(channels), subscribe=False)

    def _batched(self, command: bytes, channels: list[bytes], *, subscribe: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        size = 1 if self.sharded else _CHUNK
        out = []
        for i in range(0, len(channels), size):
            chunk = channels[i : i + size]
            self._waiting.append(_Subscription(subscribe, set(chunk)))
            out.append(pack_command(command, *chunk))
        transport.write(b"".join(out))

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


class _Subscription:
    """A (un)subscribe command in flight: the channels not yet confirmed."""

    __slots__ = ("channels", "subscribe")

    def __init__(self, subscribe: bool, channels: set[bytes]) -> None:
        self.subscribe = subscribe
        self.channels = channels


_Waiting = tuple[int, "asyncio.Future[list[Any]]"] | _Subscription


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
    if client_name:
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
    on_dropped: Callable[[bytes, str], None] | None = None,
    client_name: str,
    timeout: float,
    sharded: bool = False,
    primary_only: bool = False,
) -> Link:
    """Connect, speak RESP3, authenticate, name the connection and select the
    database within ``timeout``. Raises ``OSError``, ``TimeoutError`` or
    ``BroadcastError``; on failure the connection is already closed.
    (Subscriptions come next, ``subscribe``, confirmed by pushes: see
    ``on_subscribe``.) ``primary_only``: refuse a node that is not a
    primary (``ROLE``), as a Sentinel's old primary may be."""
    link: Link | None = None

    def factory() -> Link:
        nonlocal link
        link = Link(on_message, on_subscribe, sharded=sharded, on_dropped=on_dropped)
        return link

    try:
        async with asyncio.timeout(timeout):
            await address.connect(factory)
            assert link is not None  # the factory ran when the connection was made
            hello = _hello(address, client_name)
            count = 2 if address.db else 1
            if primary_only:
                hello += pack_command(b"ROLE")
                count += 1
            replies = await link.call(hello, count)
            refused = [r for r in replies if isinstance(r, ResponseError)]
            if refused:
                raise BroadcastError(f"Redis refused the connection: {refused[0]}")
            if primary_only and _text(replies[-1][0]) != "master":
                raise BroadcastError(
                    f"{address.label} is not a primary (its role: {_text(replies[-1][0])})"
                )
    except BaseException:
        if link is not None:
            link.abort()
        raise
    return link


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
