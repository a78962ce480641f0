"""The asyncio client: one connection at a time, kept up by itself.

:class:`Client` owns one supervisor task (``_run``) that connects, reads
frames until the connection ends, and connects again with capped, jittered
backoff, rotating through its URLs. Each connection (a ``Link``) has up to
three tasks of its own, all cancelled with it: the resume (rejoin every room
with ``since``/``epoch``, then go live), the outbox pump (send, and resend
with the same key, whatever is not acknowledged yet) and the token refresh.
What the caller sees is decided by the pure :class:`~.cursor.Cursor` of each
room and one :class:`~.cursor.SeenIds`: each message once, in offset order.

The wire protocol is docs/protocol.md; what this client promises is
docs/client.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeAlias

import aiohttp
import orjson
from yarl import URL

from .cursor import Cursor, SeenIds, parse_message
from .errors import ClientClosed, ClientError, ConnectError, JoinError, Refused, SendError
from .events import (
    Ack,
    Closed,
    Disconnected,
    Event,
    Joined,
    Left,
    MemberJoined,
    MemberLeft,
    Presence,
    PresenceMember,
    Reconnected,
    ServerError,
    User,
)
from .link import (
    NO_REFRESH,
    REFUSED_STATUSES,
    RETRY_LATER,
    Answer,
    EventQueue,
    Link,
    LinkLost,
    Outgoing,
    backoff_delay,
    is_terminal_close,
    split_endpoint,
    token_expiry,
)

__all__ = ["Client", "TokenSource", "backoff_delay", "split_endpoint"]

log = logging.getLogger("chat_api.client")

TokenSource: TypeAlias = str | Callable[[], Awaitable[str]] | None
"""A fixed token, or a coroutine function asked for a fresh one at every
(re)connect and before the current one expires."""


class Client:
    """A chat-api client that reconnects and resumes by itself.

    ``url``: ``ws://host:port/api/chat-api/ws`` (messages to everyone, rooms
    by :meth:`join`) or ``…/ws/{room}`` (in that room from the start), or a
    list of such URLs of several pods, tried in turn. ``token``: see
    :data:`TokenSource`. ``name``: a display name when the pod runs without
    auth. ``history``: how many recent messages of the URL's room to get on
    the first connect. Use it as ``async with Client(...) as client:``.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: TokenSource = None,
        name: str | None = None,
        history: int | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 15.0,
        max_attempts: int | None = None,
        heartbeat: float | None = 20.0,
        timeout: float = 10.0,
        max_pending_events: int = 10_000,
        refresh_before: float = 30.0,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("Client needs at least one URL")
        endpoints = [split_endpoint(u) for u in urls]
        rooms = {room for _, room in endpoints}
        if len(rooms) > 1:
            raise ValueError(f"the URLs name different rooms: {sorted(map(str, rooms))}")
        if backoff_base <= 0 or backoff_cap < backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_cap")
        if max_pending_events < 2:
            raise ValueError("max_pending_events must be at least 2")
        self._urls = [str(u) for u in urls]
        self._bases = [base for base, _ in endpoints]
        self._url_room = endpoints[0][1]
        self._token_source = token
        self._name = name
        self._backoff = (backoff_base, backoff_cap)
        self._max_attempts = max_attempts
        self._heartbeat = heartbeat
        self._timeout = timeout
        self._refresh_before = refresh_before
        self._rooms: dict[str, Cursor] = {}
        self._first_join: dict[str, asyncio.Future[None]] = {}
        if self._url_room is not None:
            self._rooms[self._url_room] = Cursor(self._url_room, history)
        self._seen = SeenIds()
        self._outbox: dict[int, Outgoing] = {}
        self._refs = itertools.count(1)
        self._links = itertools.count(1)
        self._index = 0
        self._link: Link | None = None
        self._events = EventQueue(max_pending_events)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._wake: asyncio.Event | None = None
        self._user: User | None = None
        self._failures = 0
        self._ever_live = False
        self._closing = False
        self._failure: ClientError | None = None
        self.closed: Closed | None = None
        """The final event once the client is closed, else None."""

    # -- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (trying each URL once) and return once live: in the URL's
        room, if any. Raises :class:`Refused` or :class:`ConnectError`."""
        if self._task is not None:
            raise RuntimeError("Client.connect() was called already")
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession()
        if self._url_room is not None:
            self._first_join[self._url_room] = loop.create_future()
        self._task = loop.create_task(self._run(), name="chat_api.client")
        try:
            await asyncio.shield(self._started)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection and stop; pending sends raise ClientClosed."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._finish(Closed(1000, "closed by the client"), ClientClosed("the client was closed"))
        if self._session is not None:
            await self._session.close()

    # -- the caller's side --------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    @property
    def rooms(self) -> list[str]:
        """The rooms this client is in (or will rejoin on reconnect)."""
        return list(self._rooms)

    @property
    def user(self) -> User | None:
        """Who the server says this client is (from the last welcome)."""
        return self._user

    async def join(self, room: str, *, history: int | None = None) -> None:
        """Enter ``room`` (with its last ``history`` messages as replayed
        events). Returns once the server took it; raises :class:`JoinError`.
        Reconnects rejoin it by themselves, resuming where the caller is."""
        self._check_open()
        if room not in self._rooms:
            self._rooms[room] = Cursor(room, history)
            self._first_join[room] = asyncio.get_running_loop().create_future()
            link = self._link
            if link is not None and link.welcomed:
                await self._join_on(link, room)
        future = self._first_join.get(room)
        if future is not None:
            await asyncio.shield(future)

    async def leave(self, room: str) -> None:
        """Leave ``room``: no more of its events, no rejoin on reconnect."""
        self._check_open()
        if self._rooms.pop(room, None) is None:
            return
        self._drop_room(room, SendError("not_in_room", f"left room {room!r}", room))
        link = self._link
        if link is not None and room in link.rooms:
            link.rooms.discard(room)
            with contextlib.suppress(LinkLost, Answer, TimeoutError, aiohttp.ClientError):
                await link.request({"type": "leave", "room": room}, self._timeout)
        await self._events.put(Left(room))

    async def send(self, room: str | None, data: Any, *, key: str | None = None) -> Ack:
        """Send ``data`` to ``room`` (None: to everyone, on a ``/ws`` client).
        Returns the :class:`Ack` once the server stored it; until then it is
        sent again with the same ``key`` (a random UUID unless given) after a
        reconnect, or when the server could not confirm it: the server
        stores a key once. Raises :class:`SendError` when the server refuses
        it, :class:`ClientClosed` when the client closes first. Cancelling
        the call stops the resending (a copy may already be stored)."""
        self._check_open()
        if room is not None and room not in self._rooms:
            raise SendError("not_in_room", f"join room {room!r} before sending to it", room)
        key = key or str(uuid.uuid4())
        ref = next(self._refs)
        frame: dict[str, Any] = {"type": "message", "data": data, "ref": ref, "key": key}
        if room is not None:
            frame["room"] = room
        text = orjson.dumps(frame).decode()
        link = self._link
        limit = link.max_message_bytes if link is not None else None
        if limit is not None and len(text.encode()) > limit:
            raise SendError("too_large", f"the message is over the server's {limit} bytes", room)
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._outbox[ref] = Outgoing(ref, key, room, text, future)
        self._poke()
        try:
            return await future
        finally:
            self._outbox.pop(ref, None)

    async def presence(self, room: str) -> Presence:
        """Who is in ``room`` now, on every pod (the client must be in it)."""
        self._check_open()
        link = self._link
        if link is None or not link.live:
            raise ClientClosed("not connected right now; try again after Reconnected")
        try:
            frame = await link.request({"type": "presence", "room": room}, self._timeout)
        except Answer as exc:
            raise JoinError(exc.code, exc.message, room) from None
        except LinkLost:
            raise ClientClosed("the connection was lost meanwhile") from None
        return _presence(frame)

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._task is None:
            raise ClientClosed("the client is not connected (use 'async with Client(...)')")

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- the supervisor -------------------------------------------------------------

    async def _run(self) -> None:
        failures = self._failures = 0
        try:
            while True:
                url = self._urls[self._index]
                closed, link = await self._connect_once(url)
                if self._closing:
                    return
                if link is not None and link.welcomed:
                    failures = self._failures = 0
                if closed.error is not None and (
                    closed.status is not None or is_terminal_close(closed.code or 0)
                ):
                    self._terminate(url, closed)
                    return
                immediate = link is not None and link.immediate
                if not immediate:
                    failures += 1
                self._failures = failures
                if not self._ever_live and failures >= len(self._urls):
                    self._terminate(
                        url, Closed(closed.code, closed.reason, error=closed.error), connect=True
                    )
                    return
                if self._max_attempts is not None and failures > self._max_attempts:
                    self._terminate(
                        url,
                        Closed(
                            closed.code,
                            closed.reason,
                            error=f"gave up after {self._max_attempts} reconnect attempts "
                            f"({closed.error or closed.reason})",
                        ),
                    )
                    return
                delay = 0.0 if immediate else backoff_delay(failures - 1, *self._backoff)
                if not immediate:
                    self._index = (self._index + 1) % len(self._urls)
                if self._ever_live:
                    await self._events.put(
                        Disconnected(url, closed.code or 1006, closed.reason, delay)
                    )
                log.info("reconnecting to %s in %.2f s", self._urls[self._index], delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("chat_api.client: internal error")
            self._finish(
                Closed(None, "internal error", error=f"client error: {exc!r}"),
                ClientClosed(f"client error: {exc!r}"),
            )

    def _terminate(self, url: str, closed: Closed, *, connect: bool = False) -> None:
        """Stop for good: the server refused us, closed with a code that means
        "do not come back", or no URL answered."""
        error = closed.error or closed.reason
        exc: ClientError
        if closed.status is not None:
            exc = Refused(url, closed.status, closed.reason)
        elif connect:
            exc = ConnectError(f"cannot connect to {', '.join(self._urls)}: {error}")
        else:
            exc = ClientClosed(error, closed.code, closed.reason)
        if self._ever_live and closed.status is None and closed.code is not None:
            self._events.put_nowait(Disconnected(url, closed.code, closed.reason, None))
        self._finish(closed, exc)

    def _finish(self, closed: Closed, exc: ClientError) -> None:
        if self._failure is not None:
            return
        self._failure = exc
        self.closed = closed
        for outgoing in self._outbox.values():
            if not outgoing.future.done():
                outgoing.future.set_exception(exc)
        for future in self._first_join.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: nobody may be waiting on it
        if self._started is not None and not self._started.done():
            self._started.set_exception(exc)
        self._events.put_nowait(closed)
        self._events.put_nowait(None)

    async def _connect_once(self, url: str) -> tuple[Closed, Link | None]:
        """One connection, from the handshake to its end: how it ended (a
        ``Closed`` with ``error`` set when it was a failure) and the link."""
        assert self._session is not None
        base = self._bases[self._index]
        # A room URL connects through one of the rooms the client is in (its
        # token may allow no other), the URL's own if it is in none.
        room = next(iter(self._rooms), self._url_room) if self._url_room is not None else None
        query = dict(base.query)
        if self._name is not None:
            query["name"] = self._name
        cursor = self._rooms.get(room) if room is not None else None
        if cursor is not None:
            query.update({k: str(v) for k, v in cursor.catchup().items()})
        target = (base / room if room is not None else base).with_query(query)
        headers: dict[str, str] = {}
        try:
            token = await self._fresh_token()
        except Exception as exc:  # noqa: BLE001 -- the caller's token source, whatever it raises
            log.warning("token source failed: %r", exc)
            return Closed(None, f"token source failed: {exc!r}", error=repr(exc)), None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with asyncio.timeout(self._timeout):
                ws = await self._session.ws_connect(
                    target, headers=headers, heartbeat=self._heartbeat, max_msg_size=0
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in REFUSED_STATUSES:
                detail = await self._why_refused(target, headers)
                return Closed(None, detail, status=exc.status, error=detail), None
            return Closed(None, f"HTTP {exc.status}", error=f"HTTP {exc.status}"), None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            return Closed(None, why, error=why), None
        link = Link(next(self._links), url, ws, token, room)
        self._link = link
        try:
            return await self._read(link), link
        finally:
            self._link = None
            for task in list(link.tasks):
                task.cancel()
            for task in list(link.tasks):
                with contextlib.suppress(BaseException):
                    await task
            for future in link.requests.values():
                if not future.done():
                    future.set_exception(LinkLost())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), self._timeout)

    async def _why_refused(self, target: URL, headers: dict[str, str]) -> str:
        """The server's one-line reason for refusing the upgrade (a plain
        GET of the same URL gets the same answer, with a readable body)."""
        assert self._session is not None
        http = target.with_scheme("https" if target.scheme == "wss" else "http")
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session.get(http, headers=headers) as resp,
            ):
                return (await resp.text()).strip()[:300]
        except (aiohttp.ClientError, OSError, TimeoutError):
            return ""

    async def _fresh_token(self) -> str | None:
        source = self._token_source
        if source is None or isinstance(source, str):
            return source
        return await source()

    # -- one connection -------------------------------------------------------------

    async def _read(self, link: Link) -> Closed:
        ws = link.ws
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                try:
                    frame = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
                    log.warning("a frame that is not JSON: %.80r", msg.data)
                    continue
                if isinstance(frame, dict):
                    await self._on_frame(link, frame)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                code = int(msg.data) if msg.data is not None else 1005
                reason = msg.extra or ""
                return Closed(code, reason, error=f"closed with {code} {reason}".strip())
            elif msg.type in (
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                code = ws.close_code or 1006
                why = repr(ws.exception()) if ws.exception() else "connection lost"
                return Closed(code, why, error=why)

    async def _on_frame(self, link: Link, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        ref = frame.get("ref")
        if isinstance(ref, str) and ref in link.requests and kind != "message":
            future = link.requests[ref]
            if not future.done():
                if kind == "error":
                    future.set_exception(
                        Answer(str(frame.get("code")), str(frame.get("message", "")))
                    )
                else:
                    future.set_result(frame)
            if kind in ("error", "presence", "refreshed", "left"):
                return  # answered; "joined" also moves state (below)
        if kind == "message":
            await self._on_message(frame)
        elif kind == "ack":
            self._on_ack(frame)
        elif kind == "welcome":
            await self._on_welcome(link, frame)
        elif kind == "joined":
            room = frame.get("room")
            if isinstance(room, str) and room in self._rooms:
                link.rooms.add(room)
                self._joined(room)
                self._poke()  # sends waiting for this room may go
                await self._events.put(Joined(room, resumed=self._rooms[room].placed))
        elif kind == "sync":
            cursor = self._rooms.get(str(frame.get("room")))
            if cursor is not None:
                for event in cursor.sync(frame):
                    await self._events.put(event)
        elif kind == "left":
            await self._on_left(link, frame)
        elif kind == "error":
            await self._on_error(frame)
        elif kind in ("member_joined", "member_left"):
            room, user = frame.get("room"), frame.get("user")
            if isinstance(room, str) and room in self._rooms and isinstance(user, dict):
                who = User(str(user.get("id", "")), str(user.get("name", "")))
                ts = frame.get("ts") if isinstance(frame.get("ts"), int) else 0
                cls = MemberJoined if kind == "member_joined" else MemberLeft
                await self._events.put(cls(room, who, int(ts or 0)))
        elif kind == "presence" and frame.get("room") in self._rooms:
            await self._events.put(_presence(frame))
        # pong, refreshed and types added later: nothing to do

    async def _on_welcome(self, link: Link, frame: dict[str, Any]) -> None:
        link.welcomed = True
        link.pod = str(frame.get("pod", ""))
        user = frame.get("user")
        if isinstance(user, dict):
            self._user = User(str(user.get("id", "")), str(user.get("name", "")))
        limits = frame.get("limits")
        if isinstance(limits, dict) and isinstance(limits.get("max_message_bytes"), int):
            link.max_message_bytes = limits["max_message_bytes"]
        expires = frame.get("expires_at", ...)
        if isinstance(expires, int | float):
            link.expires_at = float(expires)
        elif expires is ... and link.token:
            link.expires_at = token_expiry(link.token)
        if self._ever_live:
            await self._events.put(Reconnected(link.url, link.pod, self._failures))
        if link.room is not None and link.room in self._rooms:
            link.rooms.add(link.room)
            self._joined(link.room)
            await self._events.put(Joined(link.room, resumed=self._rooms[link.room].placed))
        link.spawn(self._resume(link), f"chat_api.client resume #{link.number}")

    def _joined(self, room: str) -> None:
        future = self._first_join.get(room)
        if future is not None and not future.done():
            future.set_result(None)

    async def _resume(self, link: Link) -> None:
        """Rejoin every room this client is in (each from its position), then
        go live: the pump (re)sends what is not acknowledged."""
        rooms = [room for room in self._rooms if room not in link.rooms]
        await asyncio.gather(*(self._join_on(link, room) for room in rooms))
        if link.room is not None and link.room not in self._rooms:
            # The URL's room, left by the caller: only there to connect.
            with contextlib.suppress(Answer, TimeoutError):
                await link.request({"type": "leave", "room": link.room}, self._timeout)
        link.live = True
        self._ever_live = True
        if self._started is not None and not self._started.done():
            self._started.set_result(None)
        link.spawn(self._pump(link), f"chat_api.client pump #{link.number}")
        if callable(self._token_source):
            link.spawn(self._refresh(link), f"chat_api.client refresh #{link.number}")

    async def _join_on(self, link: Link, room: str) -> None:
        cursor = self._rooms.get(room)
        if cursor is None:
            return
        try:
            await link.request({"type": "join", "room": room, **cursor.catchup()}, self._timeout)
        except Answer as exc:
            if self._rooms.get(room) is not cursor:
                return
            del self._rooms[room]
            error = JoinError(exc.code, exc.message, room)
            future = self._first_join.pop(room, None)
            if future is not None and not future.done():
                future.set_exception(error)  # join() raises it
            else:
                await self._events.put(Left(room, exc.code))
            self._drop_room(room, SendError(exc.code, exc.message, room))
        except (LinkLost, TimeoutError, aiohttp.ClientError, ConnectionError):
            return  # the next connection rejoins it

    async def _on_left(self, link: Link, frame: dict[str, Any]) -> None:
        room = frame.get("room")
        if not isinstance(room, str):
            return
        link.rooms.discard(room)
        if frame.get("ref") is None and self._rooms.pop(room, None) is not None:
            # Not asked for: the server removed us (e.g. a refreshed token
            # that may not be in this room).
            reason = str(frame.get("reason") or "removed")
            self._drop_room(room, SendError(reason, f"removed from room {room!r}", room))
            await self._events.put(Left(room, reason))

    def _drop_room(self, room: str, exc: SendError) -> None:
        self._first_join.pop(room, None)
        for outgoing in self._outbox.values():
            if outgoing.room == room and not outgoing.future.done():
                outgoing.future.set_exception(exc)

    async def _on_message(self, frame: dict[str, Any]) -> None:
        room = frame.get("room")
        cursor = self._rooms.get(room) if isinstance(room, str) else None
        if isinstance(room, str) and cursor is None:
            return  # a room we left: its stragglers
        message = parse_message(frame, replayed=cursor.replaying() if cursor else False)
        if message is None:
            log.warning("a malformed message frame: %.200r", frame)
            return
        events: list[Event] = []
        deliver = True
        if cursor is not None:
            deliver, events = cursor.message(message)
        for event in events:
            await self._events.put(event)
        # An id seen before: a keyed message shown unstamped, now stored.
        if deliver and self._seen.add(message.id):
            await self._events.put(message)

    def _on_ack(self, frame: dict[str, Any]) -> None:
        ref = frame.get("ref")
        outgoing = self._outbox.get(ref) if isinstance(ref, int) else None
        if outgoing is None or outgoing.future.done():
            return
        offset = frame.get("offset")
        if outgoing.room is not None and not isinstance(offset, int):
            # Not confirmed stored (Redis unreachable, or its answer lost):
            # send it again later, same key; a stored copy is acked duplicate.
            self._retry_later(outgoing)
            return
        epoch = frame.get("epoch")
        outgoing.future.set_result(
            Ack(
                id=str(frame.get("id", "")),
                room=outgoing.room,
                key=outgoing.key,
                offset=offset if isinstance(offset, int) else None,
                epoch=epoch if isinstance(epoch, str) else None,
                duplicate=frame.get("duplicate") is True,
                replicated=frame.get("replicated") is not False,
            )
        )

    def _retry_later(self, outgoing: Outgoing) -> None:
        delay = backoff_delay(outgoing.attempts - 1, *self._backoff)
        outgoing.due = asyncio.get_running_loop().time() + delay
        self._poke()

    async def _on_error(self, frame: dict[str, Any]) -> None:
        code = str(frame.get("code", ""))
        message = str(frame.get("message", ""))
        ref = frame.get("ref")
        outgoing = self._outbox.get(ref) if isinstance(ref, int) else None
        if outgoing is None:
            await self._events.put(ServerError(code, message))
        elif not outgoing.future.done():
            if code in RETRY_LATER:
                self._retry_later(outgoing)
            else:
                outgoing.future.set_exception(SendError(code, message, outgoing.room))

    async def _pump(self, link: Link) -> None:
        """Write every message not written on this connection yet, and those
        due for a resend, in the order they were sent; then wait for more."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            next_due: float | None = None
            for outgoing in list(self._outbox.values()):
                if outgoing.future.done():
                    continue
                now = loop.time()
                resend = outgoing.due is not None and outgoing.due <= now
                if outgoing.link == link.number and not resend:
                    if outgoing.due is not None:
                        next_due = outgoing.due if next_due is None else min(next_due, outgoing.due)
                    continue
                if outgoing.room is not None and outgoing.room not in link.rooms:
                    continue  # its join is under way: woken when it is in
                outgoing.link, outgoing.due = link.number, None
                outgoing.attempts += 1
                try:
                    await link.send(outgoing.frame, self._timeout)
                except (aiohttp.ClientError, ConnectionError, TimeoutError):
                    return  # the reader sees the connection end; the next one resends
            wait = None if next_due is None else max(0.0, next_due - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _refresh(self, link: Link) -> None:
        """Replace the connection's token before it expires (``refresh``
        frame). A server without the frame: reconnect at once with a fresh
        token (the resume makes that lossless)."""
        source = self._token_source
        assert callable(source)
        while link.expires_at is not None:
            left = link.expires_at - time.time()
            await asyncio.sleep(max(0.0, left - min(self._refresh_before, left / 5)))
            try:
                token = await source()
                answer = await link.request({"type": "refresh", "token": token}, self._timeout)
            except Answer as exc:
                if exc.code in NO_REFRESH:
                    log.info("the server cannot refresh tokens: reconnecting with a fresh one")
                    link.immediate = True
                    await link.ws.close(code=1000, message=b"token refresh")
                    return
                await self._events.put(ServerError(exc.code, exc.message))
                if link.expires_at <= time.time():
                    return  # the server closes us (1008); nothing more to try
                await asyncio.sleep(min(5.0, max(0.5, (link.expires_at - time.time()) / 4)))
                continue
            except (LinkLost, aiohttp.ClientError, ConnectionError):
                return
            except TimeoutError:
                continue
            except Exception as exc:  # noqa: BLE001 -- the caller's token source
                log.warning("token source failed: %r", exc)
                await asyncio.sleep(min(5.0, max(0.5, (link.expires_at - time.time()) / 4)))
                continue
            link.token = token
            expires = answer.get("expires_at", ...)
            link.expires_at = (
                float(expires) if isinstance(expires, int | float) else token_expiry(token)
            )


def _presence(frame: dict[str, Any]) -> Presence:
    members = frame.get("members")
    return Presence(
        str(frame.get("room", "")),
        tuple(
            PresenceMember(str(m.get("id", "")), str(m.get("name", "")), int(m.get("since") or 0))
            for m in (members if isinstance(members, list) else [])
            if isinstance(m, dict)
        ),
    )
