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
from dataclasses import dataclass, field

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
    Unstored,
    content_digest,
    key_field,
    new_epoch,
)

__all__ = ["MemoryBackend", "MemoryPresence"]


@dataclass(slots=True)
class _RoomLog:
    epoch: str
    newest: int
    entries: deque[Entry]
    expires: float
    size: int = 0
    """Bytes of the entries' payloads."""
    keys: OrderedDict[str, tuple[Stamp, str]] = field(default_factory=OrderedDict)
    """Message keys stored (scoped by sender), oldest first: their stamp and
    the digest of what they carried."""


_MAX_CLAIMS = 100_000
"""Claims a local-only pod remembers at once."""


class MemoryBackend:
    """Every message reaches this pod's members and nowhere else."""

    def __init__(
        self,
        *,
        history_length: int = 100,
        history_ttl: float = 3600.0,
        history_max_bytes: int = 1 << 20,
        memory_bytes: int = 64 << 20,
        idempotency_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handler: BackendHandler | None = None
        self._state = LinkState.LOCAL_ONLY
        self._published = 0
        self._appended = 0
        self._shed = 0
        self._rooms: set[str] = set()
        self._history_length = history_length
        self._history_ttl = history_ttl
        self._max_bytes = history_max_bytes
        self._memory_bytes = memory_bytes
        self._max_keys = idempotency_keys
        self._clock = clock
        self._log: dict[str, _RoomLog] = {}
        """Rooms' offsets and history, least recently appended to first."""
        self._size = 0
        """Bytes of every room's entries."""
        self._claims: dict[str, tuple[str, float]] = {}
        """Claimed names: their value and when (``clock``) they expire."""

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
            self._drop(room, state)
            return None
        return state

    def _drop(self, room: str, state: _RoomLog) -> None:
        del self._log[room]
        self._size -= state.size

    def append(self, message: Message, done: OnAppended, *, key: str | None = None) -> None:
        if message.room is None:
            raise ValueError("only room messages are appended to a room log")
        handler = self._running()
        room = message.room
        now = self._clock()
        if self._appended % 1024 == 1023:
            self._sweep(now)
        body = message.body()  # first: a message that cannot be encoded takes no offset
        state = self._room(room, now)
        field_name = digest = ""
        if key is not None:
            field_name, digest = key_field(message, key), content_digest(message)
            seen = None if state is None else state.keys.get(field_name)
            if seen is not None:
                stamp, stored = seen
                if stored != digest:
                    done(Unstored.CONFLICT)
                else:
                    done(Stamp(stamp.epoch, stamp.offset, duplicate=True))
                return
        if state is None:
            state = self._log[room] = _RoomLog(new_epoch(), 0, deque(), 0.0)
        else:  # the most recently used last
            del self._log[room]
            self._log[room] = state
        state.newest += 1
        state.expires = now + self._history_ttl
        entry = Entry(state.epoch, state.newest, entry_payload(body, state.epoch, state.newest))
        self._store(state, entry)
        self._appended += 1
        stamp = Stamp(entry.epoch, entry.offset)
        if field_name:
            state.keys[field_name] = (stamp, digest)
            while len(state.keys) > self._max_keys:
                state.keys.popitem(last=False)
        handler.on_entry(room, entry)
        done(stamp)

    def _store(self, state: _RoomLog, entry: Entry) -> None:
        """Keep ``entry`` in its room's history: at most ``history_length``
        entries and ``history_max_bytes`` bytes a room, and at most
        ``memory_bytes`` for every room together (the least recently used
        rooms' entries go first; their offsets and epochs stay)."""
        entries = state.entries
        entries.append(entry)
        size = len(entry.payload)
        state.size += size
        self._size += size
        while len(entries) > 1 and (
            len(entries) > self._history_length or state.size > self._max_bytes
        ):
            gone = len(entries.popleft().payload)
            state.size -= gone
            self._size -= gone
        if self._size > self._memory_bytes:
            for other in self._log.values():
                if self._size <= self._memory_bytes * 9 // 10:
                    break
                if other is state or not other.entries:
                    continue
                self._size -= other.size
                other.size = 0
                other.entries.clear()
                self._shed += 1

    def _sweep(self, now: float) -> None:
        """Forget expired rooms."""
        for name, state in [(r, s) for r, s in self._log.items() if s.expires <= now]:
            self._drop(name, state)

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

    async def claim(self, name: str, value: str, ttl: float) -> str | None:
        now = self._clock()
        claims = self._claims
        held = claims.get(name)
        if held is not None and held[1] > now:
            return held[0]
        if len(claims) >= _MAX_CLAIMS:  # expired ones first, then the oldest
            self._claims = claims = {n: c for n, c in claims.items() if c[1] > now}
            while len(claims) >= _MAX_CLAIMS:
                del claims[next(iter(claims))]
        claims.pop(name, None)
        claims[name] = (value, now + ttl)
        return None

    def presence(self, ttl: float) -> MemoryPresence:
        return MemoryPresence()

    def stats(self) -> Mapping[str, object]:
        return {
            "kind": "memory",
            "state": self._state.value,
            "published": self._published,
            "appended": self._appended,
            "subscribed_rooms": len(self._rooms),
            "history_bytes": self._size,
            "history_shed": self._shed,
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
