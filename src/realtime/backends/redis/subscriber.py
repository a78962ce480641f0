"""A minimal Redis pub/sub connection: an asyncio ``Protocol`` feeding ``hiredis``.

The receive path is the hot path of cross-pod fan-out, so it skips the
layers of a general client: bytes from the socket go straight into the
``hiredis`` reply parser, and each parsed ``message`` reply is handed to a
callback as ``(channel, data)`` without a task, a queue or a lock per message.

Commands (``SUBSCRIBE``/``UNSUBSCRIBE``) are written synchronously. Redis
handles a connection's commands in order, so a subscribe followed at once by
an unsubscribe of the same channel ends unsubscribed: the order of the calls
is the order of the outcome, and no reconciliation is needed. The set of
channels Redis has confirmed is kept in ``channels``.

Publishing and appending go through ``pipe.py``, the same way; reads and
scripts off the hot path go through redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import cast

import hiredis

from ...core.exceptions import BroadcastError
from .resp import RedisAddress, pack_command

__all__ = ["OnMessage", "Subscriber", "open_subscriber"]

OnMessage = Callable[[bytes, bytes], None]
"""Called with ``(channel, data)`` for every pub/sub message, in arrival order."""

_CLOSED = "Redis closed the connection"
_CHUNK = 512  # channels per SUBSCRIBE command when (re)subscribing many at once


class Subscriber(asyncio.Protocol):
    """One subscribed connection to Redis.

    ``ready`` resolves when the handshake (AUTH, name, the first SUBSCRIBE)
    has been answered; ``closed`` resolves when the connection is gone, for
    whatever reason (``lost_reason`` says which).
    """

    def __init__(
        self, on_message: OnMessage, on_subscribe: Callable[[bytes], None] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_subscribe = on_subscribe
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self.channels: set[bytes] = set()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.lost_reason = _CLOSED

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        on_message = self._on_message
        try:
            while (reply := reader.gets()) is not False:
                if type(reply) is list:
                    kind = reply[0]
                    if kind == b"message":
                        on_message(reply[1], reply[2])
                    elif kind == b"subscribe":
                        self.channels.add(reply[1])
                        if self._on_subscribe is not None:
                            self._on_subscribe(reply[1])
                    elif kind == b"unsubscribe":
                        self.channels.discard(reply[1])
                    elif kind == b"pong" and not self.ready.done():
                        self.ready.set_result(None)
                elif isinstance(reply, hiredis.ReplyError):
                    self._fail(f"Redis refused the subscriber: {reply}")
                    return
        except hiredis.ProtocolError as exc:
            self._fail(f"unreadable reply from Redis: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.lost_reason is _CLOSED:
            self.lost_reason = f"connection lost: {exc!r}"
        self._transport = None
        self.channels.clear()
        if not self.ready.done():
            self.ready.set_exception(BroadcastError(self.lost_reason))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- commands ------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _fail(self, reason: str) -> None:
        self.lost_reason = reason
        if not self.ready.done():
            self.ready.set_exception(BroadcastError(reason))
        self.abort()

    def handshake(
        self, channels: Iterable[bytes], *, address: RedisAddress, client_name: str
    ) -> None:
        """Authenticate, name the connection, subscribe, and PING so that
        ``ready`` resolves once every one of those has been answered."""
        self._write(address.hello(client_name))
        self.subscribe(channels)
        self._write(pack_command(b"PING"))

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

    def close(self) -> None:
        """Close after the data already written has been sent."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now."""
        if self._transport is not None:
            self._transport.abort()


async def open_subscriber(
    address: RedisAddress,
    channels: Iterable[bytes],
    on_message: OnMessage,
    *,
    on_subscribe: Callable[[bytes], None] | None = None,
    client_name: str,
    timeout: float,
) -> Subscriber:
    """Connect, authenticate and subscribe to ``channels`` within ``timeout``.

    Raises ``OSError``, ``TimeoutError`` or ``BroadcastError``; on failure the
    connection is already closed.
    """
    subscriber: Subscriber | None = None

    def factory() -> Subscriber:
        nonlocal subscriber
        subscriber = Subscriber(on_message, on_subscribe)
        return subscriber

    try:
        async with asyncio.timeout(timeout):
            await address.connect(factory)
            assert subscriber is not None
            subscriber.handshake(channels, address=address, client_name=client_name)
            await subscriber.ready
    except BaseException:
        if subscriber is not None:
            if not subscriber.ready.done():
                subscriber.ready.cancel()
            subscriber.abort()
        raise
    return subscriber
