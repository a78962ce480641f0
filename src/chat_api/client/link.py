"""One connection's plumbing, apart from the client's decisions: the
reconnect delay, which close codes end the client, URLs and token expiry,
and the small records the client keeps (a message in the outbox, a
connection and its requests and tasks, the caller's event queue).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from .errors import ClientError
from .events import Ack, Event

log = logging.getLogger("chat_api.client")

REFUSED_STATUSES = frozenset({400, 401, 403, 404})
"""Handshake answers that trying again will not change."""
CLIENT_FAULT_CODES = frozenset({1002, 1003, 1007})
"""Close codes that say this client broke the protocol: reconnecting would repeat it."""
RETRY_LATER = frozenset({"rate_limited", "unavailable"})
"""Error codes after which a message is sent again later (same key)."""
NO_REFRESH = frozenset({"unknown_type", "invalid_frame"})
"""A server that answers ``refresh`` with these does not know the frame."""


def backoff_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before attempt ``attempt`` (0, 1, 2…): a random time between
    half and all of ``min(cap, base * 2**attempt)`` ("equal jitter"), so a
    pod restart does not bring every client back in the same millisecond."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))
    return float(ceiling / 2 + rand() * ceiling / 2)


def is_terminal_close(code: int) -> bool:
    """Close codes after which the client must not reconnect by itself:
    1008 (policy: token expired, flood), 4000-4999 (the service's own, e.g.
    a disconnect by the server API), and the client's own protocol faults."""
    return code == 1008 or 4000 <= code <= 4999 or code in CLIENT_FAULT_CODES


def split_endpoint(url: str) -> tuple[URL, str | None]:
    """``(base, room)`` of a chat-api WebSocket URL: ``…/ws`` (no room) or
    ``…/ws/{room}``; ``base`` ends in ``/ws`` and keeps the query."""
    parsed = URL(url)
    if parsed.scheme not in ("ws", "wss"):
        raise ValueError(f"{url!r}: a chat-api URL starts with ws:// or wss://")
    parts = [p for p in parsed.path.split("/") if p]
    if parts and parts[-1] == "ws":
        return parsed, None
    if len(parts) >= 2 and parts[-2] == "ws":
        return parsed.with_path("/" + "/".join(parts[:-1])).with_query(parsed.query), parts[-1]
    raise ValueError(
        f"{url!r}: a chat-api WebSocket URL ends in /ws or /ws/{{room}} "
        "(e.g. ws://127.0.0.1:8000/api/chat-api/ws/general)"
    )


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the server
    does that); None when there is none or it is not a JWT."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


class LinkLost(Exception):
    """The connection a request was sent on ended before its answer."""


class Answer(ClientError):
    """An ``error`` frame answering a request of ours."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass(eq=False)
class Outgoing:
    """A message sent (or to send) until it is acknowledged with an offset."""

    ref: int
    key: str
    room: str | None
    frame: str
    future: asyncio.Future[Ack]
    link: int = 0
    """Number of the connection it was last written to (0: none yet)."""
    due: float | None = None
    """Loop time of a planned resend (after ``offset: null`` or ``rate_limited``)."""
    attempts: int = 0


@dataclass(eq=False)
class Link:
    """One WebSocket connection and what belongs to it."""

    number: int
    url: str
    ws: aiohttp.ClientWebSocketResponse
    token: str | None
    room: str | None
    """The room of the connection's URL (joined by the handshake)."""
    welcomed: bool = False
    live: bool = False
    pod: str = ""
    expires_at: float | None = None
    max_message_bytes: int | None = None
    rooms: set[str] = field(default_factory=set)
    requests: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    refs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    immediate: bool = False
    """Closed by us to reconnect at once (a token the server cannot refresh)."""

    async def send(self, frame: dict[str, Any] | str, timeout: float) -> None:
        text = frame if isinstance(frame, str) else orjson.dumps(frame).decode()
        async with self.lock, asyncio.timeout(timeout):
            await self.ws.send_str(text)

    async def request(self, frame: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``frame`` with a fresh ``ref``; its answer (``Answer`` for an error)."""
        ref = f"c{next(self.refs)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.requests[ref] = future
        try:
            await self.send({**frame, "ref": ref}, timeout)
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self.requests.pop(ref, None)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection task %s failed", task.get_name(), exc_info=task.exception())
            # A broken helper must not leave a half-working connection: drop
            # it, and the supervisor connects again.
            self.spawn(self._abort(), "chat_api.client abort")

    async def _abort(self) -> None:
        await self.ws.close(code=1011, message=b"client error")


class EventQueue:
    """The caller's event queue. Over ``limit`` events waiting, the reader
    stops reading (the server then holds, or drops us, and we resume)."""

    def __init__(self, limit: int) -> None:
        self._items: deque[Event | None] = deque()
        self._limit = limit
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    async def put(self, event: Event) -> None:
        await self._writable.wait()
        self.put_nowait(event)

    def put_nowait(self, event: Event | None) -> None:
        self._items.append(event)
        self._readable.set()
        if len(self._items) >= self._limit:
            self._writable.clear()

    async def get(self) -> Event | None:
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        item = self._items[0]
        if item is not None:  # the end mark stays, for every later reader
            self._items.popleft()
        if len(self._items) < self._limit // 2 + 1:
            self._writable.set()
        return item
