"""The local-only backend: one pod, no Redis.

Offsets, epochs, history and presence live in this process's memory, with the
same limits (length, time to live, idempotency keys) and the same frames as
the Redis backend, so everything above it works the same in both modes. A
restart loses them: the next message starts a new epoch.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..core.exceptions import StateError
from ..core.protocol import Message, encode_member_event, encode_presence, entry_payload
from ..core.sequencer import Entry
from .base import (
    PRESENCE_BURST,
    BackendHandler,
    LinkState,
    Member,
    OnAppended,
    Slice,
    Stamp,
    new_epoch,
)

__all__ = ["MAX_IDEMPOTENCY_KEYS", "MemoryBackend", "MemoryPresence"]

MAX_IDEMPOTENCY_KEYS = 100_000


@dataclass(slots=True)
class _RoomLog:
    epoch: str
    newest: int
    entries: deque[Entry]
    expires: float


class MemoryBackend:
    """Every message reaches this pod's members and nowhere else."""

    def __init__(
        self,
        *,
        history_length: int = 100,
        history_ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handler: BackendHandler | None = None
        self._state = LinkState.LOCAL_ONLY
        self._published = 0
        self._appended = 0
        self._rooms: set[str] = set()
        self._history_length = history_length
        self._history_ttl = history_ttl
        self._clock = clock
        self._log: dict[str, _RoomLog] = {}
        self._idempotency: OrderedDict[tuple[str, str], tuple[Stamp, float]] = OrderedDict()

    @property
    def state(self) -> LinkState:
        return self._state

    def _running(self) -> BackendHandler:
        if self._handler is None:
            raise StateError("the backend is not running")
        return self._handler

    async def start(self, handler: BackendHandler) -> None:
        if self._handler is not None or self._state is LinkState.STOPPED:
            raise StateError("the backend was started already")
        self._handler = handler

    async def stop(self) -> None:
        self._state = LinkState.STOPPED
        self._handler = None

    def subscribe(self, room: str) -> None:
        self._rooms.add(room)
        if self._handler is not None:
            self._handler.on_ready(room)

    def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)

    def publish(self, room: str | None, payload: bytes) -> None:
        handler = self._running()
        self._published += 1
        handler.on_message(room, payload)

    # -- room log -----------------------------------------------------------

    def _room(self, room: str, now: float) -> _RoomLog | None:
        state = self._log.get(room)
        if state is not None and state.expires <= now:
            del self._log[room]
            return None
        return state

    def append(self, message: Message, done: OnAppended, *, key: str | None = None) -> None:
        if message.room is None:
            raise ValueError("only room messages are appended to a room log")
        handler = self._running()
        room = message.room
        now = self._clock()
        if self._appended % 1024 == 1023:
            self._sweep(now)
        seen_key = None if key is None else (room, key)
        if seen_key is not None:
            seen = self._idempotency.get(seen_key)
            if seen is not None and seen[1] > now:
                done(Stamp(seen[0].epoch, seen[0].offset, duplicate=True))
                return
        state = self._room(room, now)
        if state is None:
            state = self._log[room] = _RoomLog(
                new_epoch(), 0, deque(maxlen=self._history_length), 0.0
            )
        state.newest += 1
        state.expires = now + self._history_ttl
        payload = entry_payload(message.body(), state.epoch, state.newest)
        entry = Entry(state.epoch, state.newest, payload)
        state.entries.append(entry)
        self._appended += 1
        stamp = Stamp(entry.epoch, entry.offset)
        if seen_key is not None:
            self._idempotency[seen_key] = (stamp, now + self._history_ttl)
            self._idempotency.move_to_end(seen_key)
            while len(self._idempotency) > MAX_IDEMPOTENCY_KEYS:
                self._idempotency.popitem(last=False)
        handler.on_entry(room, entry)
        done(stamp)

    def _sweep(self, now: float) -> None:
        """Forget expired rooms and idempotency keys nobody asked about."""
        for name in [r for r, s in self._log.items() if s.expires <= now]:
            del self._log[name]
        while self._idempotency:
            key, (_, expires) = next(iter(self._idempotency.items()))
            if expires > now:
                break
            del self._idempotency[key]

    async def read(self, room: str, after: int, limit: int, *, epoch: str | None = None) -> Slice:
        state = self._room(room, self._clock())
        if state is None:
            return Slice(None, 0, 1, ())
        if epoch is not None and epoch != state.epoch:
            after = 0
        first = state.entries[0].offset if state.entries else state.newest + 1
        if after < 0:  # the newest ``limit`` entries
            tail = tuple(state.entries)[-limit:] if limit > 0 else ()
            return Slice(state.epoch, state.newest, first, tail)
        picked: list[Entry] = []
        for entry in state.entries:
            if entry.offset > after:
                picked.append(entry)
                if len(picked) >= limit:
                    break
        return Slice(state.epoch, state.newest, first, tuple(picked))

    def presence(self, ttl: float) -> MemoryPresence:
        return MemoryPresence()

    def stats(self) -> Mapping[str, object]:
        return {
            "kind": "memory",
            "state": self._state.value,
            "published": self._published,
            "appended": self._appended,
            "subscribed_rooms": len(self._rooms),
        }


class MemoryPresence:
    """Local-only presence: this pod is the whole world."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._rooms: dict[str, dict[str, Member]] = {}
        self._clock = clock

    async def update(self, room: str, joins: list[Member], leaves: list[str]) -> list[bytes]:
        members = self._rooms.setdefault(room, {})
        now = int(self._clock() * 1000)
        events = []
        for member in joins:
            if member.id not in members:
                members[member.id] = member
                events.append(
                    encode_member_event("member_joined", room, member.id, member.name, now)
                )
        for user_id in leaves:
            gone = members.pop(user_id, None)
            if gone is not None:
                events.append(encode_member_event("member_left", room, user_id, gone.name, now))
        if len(events) > PRESENCE_BURST:
            events = [encode_presence(room, [m.as_json() for m in await self.members(room)])]
        if not members:
            del self._rooms[room]
        return events

    async def refresh(self, rooms: list[str]) -> list[tuple[str, bytes]]:
        return []

    async def members(self, room: str) -> list[Member]:
        return sorted(self._rooms.get(room, {}).values(), key=lambda m: (m.since, m.id))
