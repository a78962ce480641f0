"""A chat-api client that survives faults: it reconnects, resumes and resends.

What a well-behaved client does (docs/protocol.md, "Order, history and
resume" and "Resending safely"), kept in one module so the soak test
(``bench/soak.py``) can check the service against it:

- one WebSocket connection in a few rooms: the first through the URL, the
  others with ``join`` frames;
- after a drop, it reconnects (to whichever pod ``pick_url`` names, with a
  capped, jittered backoff) and resumes every room from the last offset it
  saw, ``since`` + ``epoch`` (``since=0`` before its first message);
- a message sent with a ``key`` that got no ack with an offset (the
  connection dropped, the ack said ``offset: null``, or it said
  ``replicated: false``) is sent again with the same key once the room is
  live again; one sent without a key (``keyed=False``: the pod may append it
  with a plain ``XADD``) is never sent again: without an ack its outcome is
  unknown, and it is recorded as ``unconfirmed`` (the checks then want it
  delivered to every member of the room or to none).

It keeps a record of everything the checks need: each room's frames in
arrival order (messages with their offset, epoch and key; ``sync`` frames)
and each key's last ack. It does not hide what it receives: a duplicate or
an out-of-order offset is recorded as it came, for the checks to count.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

RESEND_AFTER = 10.0
"""Seconds without an ack before a message is sent again on a live connection."""
RETRY_DELAY = 0.5
"""Seconds before a message the server could not confirm is sent again."""
MAX_CONNECTS = 10_000
"""Connections one client opens at most in a run."""
MAX_ATTEMPTS = 50
"""Sends of one message at most (then it is given up, and counted)."""


@dataclass(frozen=True)
class Delivery:
    """A ``message`` frame of a room, as received."""

    t: float
    epoch: str | None  # None: delivered without an offset (not stored)
    offset: int | None
    key: str


@dataclass(frozen=True)
class Sync:
    """A ``sync`` frame, as received."""

    t: float
    frame: dict[str, Any]


@dataclass(frozen=True)
class Ack:
    room: str
    epoch: str
    offset: int
    t: float
    duplicate: bool
    replicated: bool


@dataclass
class Pending:
    room: str
    data: dict[str, Any]
    first_sent: float
    attempts: int = 0
    last_sent: float = 0.0
    resend_unreplicated: bool = True
    keyed: bool = True


def _retry_soon(item: Pending) -> None:
    """Make ``item`` due for a resend in about half a second (not at once: the
    cause, an unreachable Redis say, may last a while)."""
    item.last_sent = time.monotonic() - RESEND_AFTER + RETRY_DELAY


@dataclass
class RoomState:
    epoch: str | None = None
    offset: int = 0
    live: bool = False
    events: list[Delivery | Sync] = field(default_factory=list)


class ResumingClient:
    """One resuming connection in ``rooms`` (the first joined by the URL)."""

    def __init__(
        self,
        name: str,
        rooms: list[str],
        pick_url: Callable[[], str],
        session: aiohttp.ClientSession,
        rng: random.Random,
    ) -> None:
        self.name = name
        self.rooms = {room: RoomState() for room in rooms}
        self.url_room = rooms[0]
        self._pick_url = pick_url
        self._session = session
        self._rng = rng
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._refs: dict[int, str] = {}
        self._next_ref = 0
        self.pending: dict[str, Pending] = {}
        self.acks: dict[str, Ack] = {}
        self.first_sent: dict[str, float] = {}
        self.connects = 0
        self.sends = 0
        self.drops = 0
        self.errors: dict[str, int] = {}
        self.given_up: list[str] = []
        self.unconfirmed: list[str] = []
        self._rooms_of: dict[str, str] = {}
        """Messages sent without a key that got no ack with an offset."""

    def unconfirmed_rooms(self) -> list[tuple[str, str]]:
        """``(key, room)`` of each message sent without a key and never acked."""
        return [(key, self._rooms_of[key]) for key in self.unconfirmed]

    # -- sending ----------------------------------------------------------------

    async def submit(
        self, room: str, key: str, data: dict[str, Any], *, keyed: bool = True
    ) -> None:
        """Send a new message (now if the room is live, else after the
        reconnect); with ``keyed``, ``key`` goes in the frame too."""
        now = time.monotonic()
        self.pending[key] = Pending(room, data, now, keyed=keyed, resend_unreplicated=keyed)
        self._rooms_of[key] = room
        self.first_sent[key] = now
        if self.rooms[room].live:
            await self._send(key)

    async def _send(self, key: str) -> None:
        item = self.pending[key]
        if item.attempts and not item.keyed:  # no ack: sent again, it could be stored twice
            del self.pending[key]
            self.unconfirmed.append(key)
            return
        if item.attempts >= MAX_ATTEMPTS:
            del self.pending[key]
            self.given_up.append(key)
            return
        ws = self._ws
        if ws is None or ws.closed:
            return
        self._next_ref += 1
        self._refs[self._next_ref] = key
        item.attempts += 1
        self.sends += 1
        item.last_sent = time.monotonic()
        frame = {"type": "message", "room": item.room, "data": item.data, "ref": self._next_ref}
        if item.keyed:
            frame["key"] = key
        with contextlib.suppress(ConnectionError, RuntimeError):
            async with asyncio.timeout(5):
                await ws.send_str(orjson.dumps(frame).decode())

    async def resend_due(self) -> None:
        """Send again what has waited too long for an ack on a live room."""
        now = time.monotonic()
        for key, item in list(self.pending.items()):
            if self.rooms[item.room].live and now - item.last_sent > RESEND_AFTER:
                await self._send(key)

    # -- the connection -----------------------------------------------------------

    def _url(self) -> str:
        state = self.rooms[self.url_room]
        query = f"?name={self.name}&since={state.offset}"
        if state.epoch is not None:
            query += f"&epoch={state.epoch}"
        return f"{self._pick_url()}/api/chat-api/ws/{self.url_room}{query}"

    async def run(self, stop: asyncio.Event, deadline: float) -> None:
        """Stay connected until ``stop`` is set (or ``deadline``, monotonic)."""
        backoff = 0.1
        for _ in range(MAX_CONNECTS):
            if stop.is_set() or time.monotonic() >= deadline:
                return
            try:
                async with asyncio.timeout(10):
                    ws = await self._session.ws_connect(self._url(), heartbeat=5.0)
            except (aiohttp.ClientError, OSError, TimeoutError):
                await self._backoff(stop, backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self.connects += 1
            backoff = 0.1
            self._ws = ws
            try:
                await self._read(ws, stop)
            finally:
                self._ws = None
                for state in self.rooms.values():
                    state.live = False
                await ws.close()
            if not stop.is_set():
                self.drops += 1
                await self._backoff(stop, backoff)

    async def _backoff(self, stop: asyncio.Event, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay * (1 + self._rng.random()))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                receiving = asyncio.ensure_future(ws.receive())
                done, _ = await asyncio.wait(
                    {receiving, stopping}, return_when=asyncio.FIRST_COMPLETED
                )
                if receiving not in done:
                    receiving.cancel()
                    return
                msg = receiving.result()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    return
                await self._on_frame(orjson.loads(msg.data))
        finally:
            stopping.cancel()

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        now = time.monotonic()
        if kind == "message":
            state = self.rooms.get(frame.get("room") or "")
            if state is None:
                return
            data = frame.get("data")
            key = data.get("k", "?") if isinstance(data, dict) else "?"
            epoch, offset = frame.get("epoch"), frame.get("offset")
            state.events.append(Delivery(now, epoch, offset, key))
            if (
                epoch is not None
                and offset is not None
                and (epoch != state.epoch or offset > state.offset)
            ):
                state.epoch, state.offset = epoch, offset
        elif kind == "sync":
            state = self.rooms.get(frame.get("room") or "")
            if state is not None:
                state.events.append(Sync(now, frame))
                if frame.get("reason") == "epoch_changed" and frame.get("epoch"):
                    state.epoch, state.offset = frame["epoch"], int(frame.get("offset") or 0)
        elif kind == "ack":
            self._on_ack(frame, now)
        elif kind == "welcome":
            await self._live(self.url_room)
            for room in self.rooms:
                if room != self.url_room:
                    await self._join(room)
        elif kind == "joined":
            await self._live(frame["room"])
        elif kind == "error":
            code = str(frame.get("code"))
            self.errors[code] = self.errors.get(code, 0) + 1
            key = self._refs.pop(frame["ref"], None) if "ref" in frame else None
            if key in self.pending:
                _retry_soon(self.pending[key])

    def _on_ack(self, frame: dict[str, Any], now: float) -> None:
        key = self._refs.pop(frame.get("ref", -1), None)
        if key is None or key not in self.first_sent:
            return
        item = self.pending.get(key)
        if frame.get("offset") is None:  # not confirmed: send again
            if item is not None:
                _retry_soon(item)
            return
        replicated = frame.get("replicated", True) is not False
        self.acks[key] = Ack(
            frame["room"],
            frame["epoch"],
            frame["offset"],
            now,
            bool(frame.get("duplicate")),
            replicated,
        )
        if item is None:
            return
        if not replicated and item.resend_unreplicated:
            item.resend_unreplicated = False  # once, "to be sure" (docs/protocol.md)
            _retry_soon(item)
        else:
            del self.pending[key]

    async def _join(self, room: str) -> None:
        state = self.rooms[room]
        frame: dict[str, Any] = {"type": "join", "room": room, "since": state.offset}
        if state.epoch is not None:
            frame["epoch"] = state.epoch
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(orjson.dumps(frame).decode())

    async def _live(self, room: str) -> None:
        state = self.rooms.get(room)
        if state is None:
            return
        state.live = True
        for key, item in list(self.pending.items()):
            if item.room == room:
                await self._send(key)
