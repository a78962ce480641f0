"""The local-only broadcaster: one pod, no Redis.

It is also the local-only room log: offsets, epochs and history live in this
process's memory, with the same limits (length, time to live) and the same
byte-exact stamped frames as the Redis one, so the handler code is the same
in both modes. A restart loses them: the next message starts a new epoch.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..core.exceptions import StateError
from ..core.protocol import Message
from ..core.sequencer import Entry
from .base import Deliver, LinkState, LogSink, Slice, Stamp, Stamped, new_epoch

__all__ = ["MemoryBroadcaster"]

MAX_IDEMPOTENCY_KEYS = 100_000


@dataclass(slots=True)
class _RoomState:
    epoch: str
    newest: int
    entries: deque[Entry]
    expires: float


class MemoryBroadcaster:
    """Delivers every message to this pod's members and nowhere else."""

    def __init__(
        self,
        *,
        history_length: int = 100,
        history_ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deliver: Deliver | None = None
        self._sink: LogSink | None = None
        self._state = LinkState.LOCAL_ONLY
        self._published = 0
        self._appended = 0
        self._rooms: set[str] = set()
        self._history_length = history_length
        self._history_ttl = history_ttl
        self._clock = clock
        self._log: dict[str, _RoomState] = {}
        self._idempotency: OrderedDict[tuple[str, str], tuple[Stamp, float]] = OrderedDict()

    @property
    def state(self) -> LinkState:
        return self._state

    def attach(self, sink: LogSink) -> None:
        self._sink = sink

    async def start(self, deliver: Deliver) -> None:
        if self._deliver is not None:
            raise StateError("broadcaster already started")
        self._deliver = deliver

    async def stop(self) -> None:
        self._state = LinkState.STOPPED
        self._deliver = None

    def publish(self, message: Message) -> None:
        if self._deliver is None:
            raise StateError("broadcaster is not running")
        self._published += 1
        self._deliver(message.room, message.encode())

    def subscribe(self, room: str) -> None:
        self._rooms.add(room)
        if self._sink is not None:
            self._sink.ready(room)

    def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)

    # -- room log -----------------------------------------------------------

    def _room(self, room: str, now: float) -> _RoomState | None:
        state = self._log.get(room)
        if state is not None and state.expires <= now:
            del self._log[room]
            return None
        return state

    def append(
        self, message: Message, done: Stamped, *, idempotency_key: str | None = None
    ) -> None:
        if message.room is None:
            raise ValueError("only room messages are appended to a room log")
        room = message.room
        now = self._clock()
        if self._appended % 1024 == 1023:
            self._sweep(now)
        key = None if idempotency_key is None else (room, idempotency_key)
        if key is not None:
            seen = self._idempotency.get(key)
            if seen is not None and seen[1] > now:
                done(Stamp(seen[0].epoch, seen[0].offset, duplicate=True))
                return
        state = self._room(room, now)
        if state is None:
            state = self._log[room] = _RoomState(
                new_epoch(), 0, deque(maxlen=self._history_length), 0.0
            )
        state.newest += 1
        state.expires = now + self._history_ttl
        entry = Entry(state.epoch, state.newest, message.stamped(state.epoch, state.newest))
        state.entries.append(entry)
        self._appended += 1
        stamp = Stamp(entry.epoch, entry.offset)
        if key is not None:
            self._idempotency[key] = (stamp, now + self._history_ttl)
            self._idempotency.move_to_end(key)
            while len(self._idempotency) > MAX_IDEMPOTENCY_KEYS:
                self._idempotency.popitem(last=False)
        if self._sink is not None:
            self._sink.entry(room, entry)
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

    def stats(self) -> Mapping[str, object]:
        return {
            "kind": "memory",
            "state": self._state.value,
            "published": self._published,
            "appended": self._appended,
            "subscribed_rooms": len(self._rooms),
        }
