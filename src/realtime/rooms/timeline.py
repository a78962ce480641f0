"""Timeline: each hosted room's messages on this pod in offset order, and catch-up.

The node opens a ``Room`` here when a room gets its first local member and
closes it after the last one leaves. Every entry that reaches the pod for
the room (``offer``), its own and other pods', goes through the room's
``RoomSequencer``, which hands back what may be delivered, in order; a gap is
repaired from the backend's history after ``gap_wait``. ``attach`` joins a
member with a catch-up (resume from an offset, or recent history): it waits
outside live delivery while the catch-up is gathered, then gets the ``sync``
frame, the missed messages and live ones in one synchronous step, so nothing
can fall between.

A room's ``state`` says what the pod knows of it and which read is under way
(one at a time)::

    SUBSCRIBING ──ready──▶ READING ──read──▶ LIVE ──gap due──▶ REPAIRING
                            │    ▲           ▲  │                │
                      failed│    │again      │  └──ready─▶ READING ◀──ready
                            ▼    │           └────────repaired────┘
                           RETRYING
    (any) ──close──▶ CLOSED

``ready`` comes from the backend after each (re)subscription, and after an
append whose answer was lost (``reread``): the room is read again from where
this pod stands, whatever it was doing. The sequencers are pure; this module
owns the few tasks and timers (the reads) and cancels them on close.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import Backend, LinkState
from ..core.connection import Connection
from ..core.exceptions import BroadcastError, StateError
from ..core.histogram import LAG_BUCKETS, Histogram
from ..core.hub import LocalHub
from ..core.protocol import Catchup, encode_event
from ..core.sequencer import Entry, RoomSequencer, Step

__all__ = ["Room", "RoomState", "Timeline", "TimelineSettings"]

log = logging.getLogger("realtime.timeline")

MAX_REPAIR_TRIES = 3
MAX_RETRY_DELAY = 5.0


@dataclass(frozen=True, slots=True)
class TimelineSettings:
    keep: int = 100
    """Messages kept per room (history length): the most a catch-up sends."""
    gap_wait: float = 0.25
    """Seconds a missing offset is waited for before it is read from history."""
    sync_timeout: float = 5.0
    """Seconds a join waits for the room's position before going live without."""
    max_bytes: int = 1 << 20
    """Bytes of recent messages remembered per room (besides ``keep``)."""
    memory_bytes: int = 64 << 20
    """Bytes of recent messages remembered by the pod, all rooms together;
    past it, the least recently used rooms forget theirs (their catch-ups
    then read the backend's history)."""


@dataclass(slots=True)
class TimelineCounters:
    entries: int = 0
    delivered: int = 0
    gap_repairs: int = 0
    lost: int = 0
    epoch_changes: int = 0
    replayed: int = 0
    history_reads: int = 0
    recovered: int = 0
    unstamped: int = 0
    unknown: int = 0
    shed: int = 0
    """Rooms whose remembered messages were dropped (the memory budget)."""
    catchups: dict[str, int] = field(default_factory=dict)
    """Catch-ups (``sync`` frames to a joining member) by result: ``complete`` or the reason."""


class RoomState(enum.Enum):
    SUBSCRIBING = "subscribing"
    """Subscribed, not confirmed: entries are held, nothing is read yet."""
    READING = "reading"
    """Reading where the room stands (first), or what this pod missed."""
    RETRYING = "retrying"
    """A read failed: waiting to try again (``ready`` cuts the wait short)."""
    LIVE = "live"
    """Delivering in offset order; no read under way."""
    REPAIRING = "repairing"
    """Delivering, and reading the offsets of a gap from history."""
    CLOSED = "closed"
    """No local member any more (or the timeline stopped)."""


_MOVES = {
    RoomState.SUBSCRIBING: {RoomState.READING, RoomState.CLOSED},
    RoomState.READING: {RoomState.LIVE, RoomState.RETRYING, RoomState.CLOSED},
    RoomState.RETRYING: {RoomState.READING, RoomState.CLOSED},
    RoomState.LIVE: {RoomState.READING, RoomState.REPAIRING, RoomState.CLOSED},
    RoomState.REPAIRING: {RoomState.LIVE, RoomState.READING, RoomState.CLOSED},
    RoomState.CLOSED: set(),
}


class Room:
    """One hosted room: its sequencer, state and the read under way."""

    __slots__ = (
        "_changed",
        "counted",
        "gap_timer",
        "name",
        "read_again",
        "reader",
        "repair_tries",
        "seq",
        "state",
    )

    def __init__(self, name: str, keep: int, max_bytes: int = 1 << 62) -> None:
        self.name = name
        self.seq = RoomSequencer(keep, max_bytes=max_bytes)
        self.counted = 0
        """The sequencer's remembered bytes, as counted in the pod's total."""
        self.state = RoomState.SUBSCRIBING
        self.reader: asyncio.Task[None] | None = None
        """The read under way (READING, RETRYING, REPAIRING), at most one."""
        self.read_again = False
        """``ready`` came while reading: what is being read may predate it."""
        self.gap_timer: asyncio.TimerHandle | None = None
        self.repair_tries = 0
        self._changed: asyncio.Event | None = None
        """Set (and dropped) whenever the room moves on: a state change or
        delivered entries. Made only when a join waits on it (``changed``):
        most deliveries have no one waiting."""

    def move(self, new: RoomState) -> None:
        if new not in _MOVES[self.state]:
            raise StateError(f"room {self.name}: {self.state.value} -> {new.value}")
        self.state = new
        self.notify()

    @property
    def changed(self) -> asyncio.Event:
        """Set when the room next moves on (for a join waiting on it)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def notify(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    @property
    def closed(self) -> bool:
        return self.state is RoomState.CLOSED


class Timeline:
    """Ordered room delivery and catch-up for one pod."""

    def __init__(
        self,
        hub: LocalHub,
        backend: Backend,
        settings: TimelineSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        lag: Histogram | None = None,
    ) -> None:
        self.lag = lag or Histogram(LAG_BUCKETS)
        """Delivery lag of each message delivered live (see ``Histogram.observe_lag``)."""
        self._hub = hub
        self._backend = backend
        self.settings = settings or TimelineSettings()
        self._clock = clock
        self._rooms: dict[str, Room] = {}
        self._recency: dict[str, Room] = {}
        """The rooms by last delivery, least recent first."""
        self._remembered = 0
        """Bytes the rooms' sequencers remember, all together."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.counters = TimelineCounters()

    # -- rooms (from the node) --------------------------------------------------

    def open(self, name: str) -> None:
        """``name`` has its first local member (the node subscribes next)."""
        if not self._stopped:
            room = self._rooms[name] = Room(name, self.settings.keep, self.settings.max_bytes)
            self._recency[name] = room

    def close(self, name: str) -> None:
        """``name`` has no local member any more: stop its reads and timers."""
        room = self._rooms.pop(name, None)
        if room is not None:
            self._close(room)

    def _close(self, room: Room) -> None:
        self._recency.pop(room.name, None)
        self._remembered -= room.counted
        room.counted = 0
        if room.gap_timer is not None:
            room.gap_timer.cancel()
            room.gap_timer = None
        if room.reader is not None:
            room.reader.cancel()
            room.reader = None
        room.move(RoomState.CLOSED)

    def offer(self, name: str, entry: Entry) -> None:
        """A room entry reached this pod, from any source."""
        room = self._rooms.get(name)
        if room is None:
            return
        self.counters.entries += 1
        self._apply(room, room.seq.offer(entry, self._clock()))

    def ready(self, name: str) -> None:
        """Every later entry of ``name`` will be offered: read where the room
        stands (the first time) or what this pod missed (after that)."""
        room = self._rooms.get(name)
        if room is None:
            return
        state = room.state
        if state is RoomState.READING:
            room.read_again = True
        elif state is not RoomState.CLOSED:
            if room.reader is not None:  # retrying or repairing: read now instead
                room.reader.cancel()
            room.move(RoomState.READING)
            self._start_read(room)

    reread = ready
    """An append's answer was lost: read what the room has after this pod's
    last offset, so the message appears once, in order, if it was stored."""

    # -- catch-up ----------------------------------------------------------------

    async def attach(
        self,
        conn: Connection,
        name: str,
        catchup: Catchup,
        greet: Callable[[], object] | None = None,
    ) -> None:
        """Take ``conn``, a waiting member of ``name`` (``hub.join(...,
        live=False)``), live: ``greet()`` (the caller's welcome or joined
        frame), a ``sync`` frame if a catch-up was asked for, what it missed,
        then live messages, with no gap and no duplicate. Once greeted, the
        member gets every message with a later offset."""
        room = self._rooms.get(name)
        if room is None:
            return
        entries, complete, reason = await self._gather(conn, room, catchup)
        if room.closed or not self._hub.is_waiting(conn, name):
            return  # it left, or closed, meanwhile
        if greet is not None:
            greet()
        seq = room.seq
        if catchup.asked or not complete:
            frame: dict[str, Any] = {
                "room": name,
                "epoch": seq.epoch,
                "offset": seq.last if seq.placed else None,
                "replayed": len(entries),
                "complete": complete,
            }
            if reason is not None:
                frame["reason"] = reason
            result = reason or "complete"
            self.counters.catchups[result] = self.counters.catchups.get(result, 0) + 1
            if entries:
                frame["first"] = entries[0].offset
            self._hub.send_to(conn, encode_event("sync", **frame))
        for entry in entries:
            if not self._hub.send_to(conn, entry.payload):
                return
        self.counters.replayed += len(entries)
        self._hub.go_live(conn, name)

    async def _until(self, room: Room, done: Callable[[], bool], timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until ``done()`` or the room closes."""
        deadline = self._clock() + timeout
        while not done():
            left = deadline - self._clock()
            if room.closed or left <= 0:
                return False
            try:
                async with asyncio.timeout(left):
                    await room.changed.wait()
            except TimeoutError:
                return done()
        return True

    async def _gather(
        self, conn: Connection, room: Room, catchup: Catchup
    ) -> tuple[list[Entry], bool, str | None]:
        """``(entries, complete, reason)``: what ``conn`` missed, from memory
        or history, ending at the room's last delivered offset."""
        settings = self.settings
        seq = room.seq
        if not seq.placed:
            if self._backend.state not in (LinkState.LOCAL_ONLY, LinkState.CONNECTED):
                return [], False, "unavailable"  # no waiting while the link is down
            tried = await self._until(
                room,
                lambda: seq.placed or room.state is RoomState.RETRYING,
                settings.sync_timeout,
            )
            if not tried or not seq.placed:
                return [], False, "unavailable"
        since = catchup.since
        if since is not None and catchup.epoch in (None, seq.epoch):
            # The client saw an offset this pod has not delivered yet (it was
            # on a faster pod): wait for it, briefly, rather than resend it.
            wait = min(settings.sync_timeout, 4 * settings.gap_wait + 1.0)
            await self._until(room, lambda: seq.last >= since, wait)
        for _ in range(3):
            if room.closed or not self._hub.is_waiting(conn, room.name):
                return [], False, "unavailable"
            complete, reason, after = _plan(catchup, seq.epoch, seq.last, settings.keep)
            entries = seq.since(after)
            if entries is not None:
                return entries, complete, reason
            self.counters.history_reads += 1
            try:
                got = await self._backend.read(room.name, after, settings.keep, epoch=seq.epoch)
            except BroadcastError as exc:
                log.warning("history read for %s failed: %s", room.name, exc)
                return [], False, "unavailable"
            if got.epoch != seq.epoch:
                continue
            if got.first > after + 1 and reason is None:
                complete, reason = False, "window_exceeded"
            head = [e for e in got.entries if e.offset <= seq.last]
            upto = head[-1].offset if head else max(after, got.first - 1)
            rest = seq.since(upto)
            if rest is not None:
                return head + rest, complete, reason
        return [], False, "unavailable"

    # -- reading the store ------------------------------------------------------------

    def _start_read(self, room: Room) -> None:
        room.read_again = False
        room.reader = self._spawn(self._read(room))

    async def _read(self, room: Room) -> None:
        """READING: where the room stands (the first time) or what was missed
        after this pod's last offset; retried with backoff until it works or
        the room closes (``ready`` restarts it at once)."""
        delay = self.settings.gap_wait
        keep = self.settings.keep
        seq = room.seq
        this = asyncio.current_task()
        while True:
            try:
                if seq.placed:
                    got = await self._backend.read(room.name, seq.last, keep, epoch=seq.epoch)
                else:
                    got = await self._backend.read(room.name, -1, keep)
            except BroadcastError as exc:
                if room.reader is not this:
                    return
                log.warning("reading the state of room %s failed: %s", room.name, exc)
                room.move(RoomState.RETRYING)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                room.move(RoomState.READING)
                continue
            if room.reader is not this:
                # Closed while the answer was on its way, or another read
                # took over (``ready``) and the cancellation did not reach
                # this one: that read moves the room on, not this one.
                return
            now = self._clock()
            if seq.placed:
                step = seq.fill(
                    got.epoch, got.entries, newest=got.newest, now=now, first=got.first, limit=keep
                )
                self.counters.recovered += len(step.deliver)
            else:
                step = seq.start(got.epoch, got.newest, got.entries, now=now)
            self._apply(room, step)
            if not room.read_again:
                break
            room.read_again = False  # what was read may predate a resubscription
        room.reader = None
        room.move(RoomState.LIVE)

    def _gap_due(self, room: Room) -> None:
        room.gap_timer = None
        if room.seq.gap() is None:
            return
        if room.state is not RoomState.LIVE:  # one read at a time; look again after it
            self._schedule_gap(room, self.settings.gap_wait)
            return
        room.move(RoomState.REPAIRING)
        room.reader = self._spawn(self._repair(room))

    async def _repair(self, room: Room) -> None:
        gap = room.seq.gap()
        assert gap is not None  # only started for a gap, and nothing ran since
        after, highest = gap
        self.counters.gap_repairs += 1
        this = asyncio.current_task()
        try:
            got = await self._backend.read(room.name, after, highest - after, epoch=room.seq.epoch)
        except BroadcastError as exc:
            if room.reader is not this:
                return
            room.reader = None
            room.move(RoomState.LIVE)
            room.repair_tries += 1
            if room.repair_tries < MAX_REPAIR_TRIES:
                log.warning("room %s: repairing a gap failed (%s); will retry", room.name, exc)
                self._schedule_gap(room, self.settings.gap_wait)
            else:
                tries = room.repair_tries
                log.warning("room %s: giving up on a gap after %d tries", room.name, tries)
                self._apply(room, room.seq.skip_gap(self._clock()))
            return
        if room.reader is not this:  # closed, or a read took over (see ``_read``)
            return
        room.reader = None
        room.move(RoomState.LIVE)
        step = room.seq.fill(
            got.epoch,
            got.entries,
            newest=got.newest,
            now=self._clock(),
            first=got.first,
            limit=highest - after,
        )
        self.counters.recovered += len(step.deliver)
        self._apply(room, step)

    def _schedule_gap(self, room: Room, wait: float) -> None:
        if room.gap_timer is None and not room.closed:
            loop = asyncio.get_running_loop()
            room.gap_timer = loop.call_later(wait, self._gap_due, room)

    # -- delivering ----------------------------------------------------------------

    def _apply(self, room: Room, step: Step) -> None:
        """Hand a sequencer step's entries to the room's members, in order,
        with the ``sync`` frames that must come before them."""
        seq = room.seq
        name = room.name
        if step.epoch_changed:
            self.counters.epoch_changes += 1
            log.warning("room %s: epoch changed to %s (its stored state was lost)", name, seq.epoch)
            self._tell(name, seq.epoch, 0, "epoch_changed")
        for index, entry in enumerate(step.deliver):
            if index == step.skipped_at:
                self._tell(name, seq.epoch, step.skipped_to, "window_exceeded", lost=step.lost)
            self._hub.broadcast(name, entry.payload)
            self.lag.observe_lag(entry.payload)
        if step.skipped_at is not None and step.skipped_at >= len(step.deliver):
            self._tell(name, seq.epoch, step.skipped_to, "window_exceeded", lost=step.lost)
        if step.deliver:
            self.counters.delivered += len(step.deliver)
            room.notify()
            recency = self._recency
            if recency.pop(name, None) is not None:
                recency[name] = room
        if seq.recent_bytes != room.counted:
            self._remembered += seq.recent_bytes - room.counted
            room.counted = seq.recent_bytes
            if self._remembered > self.settings.memory_bytes:
                self._shed(room)
        if step.lost:
            self.counters.lost += step.lost
            log.warning("room %s: %d message(s) skipped: no longer in history", name, step.lost)
        if seq.gap_since is None:
            room.repair_tries = 0
            if room.gap_timer is not None:
                room.gap_timer.cancel()
                room.gap_timer = None
        else:
            self._schedule_gap(
                room, max(0.0, seq.gap_since + self.settings.gap_wait - self._clock())
            )

    def _shed(self, keep: Room) -> None:
        """Over the pod's memory budget: the least recently used rooms forget
        what they remember (down to 90 % of the budget, so that shedding is
        rare), the room just delivered to last."""
        target = self.settings.memory_bytes * 9 // 10
        for room in list(self._recency.values()):
            if self._remembered <= target:
                break
            if room is keep or not room.counted:
                continue
            room.seq.forget()
            self._remembered -= room.counted
            room.counted = 0
            self.counters.shed += 1
        if self._remembered > target and keep.counted:  # one room alone is over
            keep.seq.forget()
            self._remembered -= keep.counted
            keep.counted = 0
            self.counters.shed += 1

    def _tell(self, name: str, epoch: str | None, offset: int, reason: str, **extra: int) -> None:
        """A ``sync`` frame to the room's members: the epoch changed, or some
        offsets could not be delivered (no longer in history)."""
        self._hub.broadcast(
            name,
            encode_event(
                "sync",
                room=name,
                epoch=epoch,
                offset=offset,
                replayed=0,
                complete=False,
                reason=reason,
                **extra,
            ),
        )

    # -- lifecycle ----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("timeline task failed", exc_info=exc)

    async def stop(self) -> None:
        """Close every room: cancel its timers and reads; idempotent."""
        self._stopped = True
        rooms, self._rooms = self._rooms, {}
        for room in rooms.values():
            self._close(room)
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        rooms = self._rooms.values()
        return {
            "rooms": len(self._rooms),
            "rooms_holding": sum(1 for r in rooms if r.seq.gap() is not None),
            "held": sum(r.seq.held for r in rooms),
            "entries": c.entries,
            "delivered": c.delivered,
            "duplicates_dropped": sum(r.seq.duplicates for r in rooms),
            "gap_repairs": c.gap_repairs,
            "lost": c.lost,
            "epoch_changes": c.epoch_changes,
            "replayed": c.replayed,
            "history_reads": c.history_reads,
            "recovered": c.recovered,
            "unstamped": c.unstamped,
            "unknown": c.unknown,
            "memory_bytes": self._remembered,
            "memory_shed": c.shed,
        }


def _plan(
    catchup: Catchup, epoch: str | None, last: int, keep: int
) -> tuple[bool, str | None, int]:
    """``(complete, reason, after)``: replay every offset after ``after``."""
    if catchup.since is not None:
        if catchup.epoch is not None and catchup.epoch != epoch:
            # Offsets of another epoch mean nothing here: send what this
            # epoch has kept, and say so.
            return False, "epoch_changed", 0
        if catchup.since > last:
            return False, "unknown_offset", last
        return True, None, catchup.since
    if catchup.history:
        return True, None, max(0, last - min(catchup.history, keep))
    return True, None, last
