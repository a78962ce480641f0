"""The publishing connection: pipelined commands, replies read by ``hiredis``.

Publishing is the other half of the hot path (one ``EVALSHA`` or ``PUBLISH``
per message). Like the subscriber, this is an asyncio ``Protocol`` feeding the
``hiredis`` parser: a batch of commands is written at once and one future
resolves with all of its replies, so a batch costs one wake-up of the
publishing task however many messages it carries (redis-py reads a reply at a
time, through several coroutines each).

Error replies come back in their place as ``ResponseError`` (``NoScriptError``
for an unknown script), as redis-py would raise them. A connection that is
lost fails every batch in flight with ``InFlightLost``: whether those commands
ran is unknown. A batch never written fails with a plain ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import hiredis
from redis.exceptions import NoScriptError, ResponseError

from ...core.exceptions import BroadcastError
from .resp import InFlightLost, RedisAddress, pack_command

__all__ = ["CommandPipe", "InFlightLost", "open_pipe"]


class CommandPipe(asyncio.Protocol):
    """One Redis connection for pipelined commands; replies in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        # Batches in flight, oldest first: (replies expected, future).
        self._waiting: deque[tuple[int, asyncio.Future[list[Any]]]] = deque()
        self._replies: list[Any] = []
        self.lost_reason = "Redis closed the connection"

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        replies = self._replies
        try:
            while (reply := reader.gets()) is not False:
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
        if exc is not None:
            self.lost_reason = f"connection lost: {exc!r}"
        self._transport = None
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(InFlightLost(self.lost_reason))

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


async def open_pipe(address: RedisAddress, *, client_name: str, timeout: float) -> CommandPipe:
    """Connect, authenticate, name the connection and select the database
    within ``timeout``. Raises ``OSError``, ``TimeoutError`` or
    ``BroadcastError``; on failure the connection is already closed."""
    pipe: CommandPipe | None = None

    def factory() -> CommandPipe:
        nonlocal pipe
        pipe = CommandPipe()
        return pipe

    try:
        async with asyncio.timeout(timeout):
            await address.connect(factory)
            assert pipe is not None
            hello = address.hello(client_name)
            count = 2 if address.password is not None else 1
            if address.db:
                hello += pack_command(b"SELECT", str(address.db).encode())
                count += 1
            replies = await pipe.call(hello, count)
    except BaseException:
        if pipe is not None:
            pipe.abort()
        raise
    refused = [r for r in replies if isinstance(r, ResponseError)]
    if refused:
        pipe.abort()
        raise BroadcastError(f"Redis refused the publisher: {refused[0]}")
    return pipe
