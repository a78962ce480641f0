"""Timeline: each room's messages on this pod in offset order, and catch-up.

The timeline sits between the room log (offsets and history, in memory or
in Redis), the hub and the handler:

- it is the hub's ``RoomWatcher``: when a room gets its first local member it
  creates the room's ``RoomSequencer`` and subscribes; once the log says the
  room is ``ready`` (subscribed for sure), it reads where the room stands;
- it is the log's ``LogSink``: every entry that reaches the pod, its own
  included, goes through the room's sequencer, which hands back what may be
  delivered, in order. A gap is repaired from history after ``gap_wait``;
- ``attach`` joins a connection to a room with a catch-up (resume from an
  offset, or recent history): the member waits outside live delivery while
  the catch-up is gathered, and then gets the ``sync`` frame, the missed
  messages and live ones in one synchronous step, so nothing can fall between.

The sequencers are pure; this module owns the few tasks and timers (store
reads) and cancels them on ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import Broadcaster, LinkState, RoomLog, Stamp, Unstored
from ..core.connection import Connection
from ..core.exceptions import BroadcastError
from ..core.hub import LocalHub
from ..core.protocol import Catchup, Message, encode_event
from ..core.sequencer import Entry, RoomSequencer, Step

__all__ = ["Timeline", "TimelineSettings"]

log = logging.getLogger("realtime.timeline")

MAX_REPAIR_TRIES = 3


@dataclass(frozen=True, slots=True)
class TimelineSettings:
    keep: int = 100
    """Messages kept per room (history length): the most a catch-up sends."""
    gap_wait: float = 0.25
    """Seconds a missing offset is waited for before it is read from history."""
    sync_timeout: float = 5.0
    """Seconds a join waits for the room's position before going live without."""


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


@dataclass(slots=True)
class _Room:
    seq: RoomSequencer
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    tried: asyncio.Event = field(default_factory=asyncio.Event)
    """Set after the first attempt to read the room's state, even a failed one."""
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    gap_timer: asyncio.TimerHandle | None = None
    repair_tries: int = 0
    syncing: bool = False
    repairing: bool = False
    again: bool = False
    """A resubscription came while a read was in flight: read once more."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Cuts a failed read's backoff short when the subscription is confirmed."""


class Timeline:
    """Ordered room delivery and catch-up for one pod."""

    def __init__(
        self,
        hub: LocalHub,
        broadcaster: Broadcaster,
        room_log: RoomLog,
        settings: TimelineSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hub = hub
        self._broadcaster = broadcaster
        self._log = room_log
        self.settings = settings or TimelineSettings()
        self._clock = clock
        self._rooms: dict[str, _Room] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.counters = TimelineCounters()
        room_log.attach(self)

    # -- RoomWatcher (from the hub) ------------------------------------------

    def subscribe(self, room: str) -> None:
        self._rooms[room] = _Room(RoomSequencer(self.settings.keep))
        self._broadcaster.subscribe(room)

    def unsubscribe(self, room: str) -> None:
        state = self._rooms.pop(room, None)
        if state is not None and state.gap_timer is not None:
            state.gap_timer.cancel()
        self._broadcaster.unsubscribe(room)

    # -- LogSink (from the room log) ---------------------------------------

    def entry(self, room: str, entry: Entry) -> None:
        state = self._rooms.get(room)
        if state is None:
            return
        self.counters.entries += 1
        self._apply(room, state, state.seq.offer(entry, self._clock()))

    def ready(self, room: str) -> None:
        state = self._rooms.get(room)
        if state is None or self._stopped:
            return
        if state.syncing:
            state.again = True  # what it reads may predate the resubscription
            state.wake.set()  # and if it is backing off, the link is back: read now
            return
        state.syncing = True
        self._spawn(self._sync(room, state))

    # -- publishing ------------------------------------------------------------

    def publish(
        self,
        message: Message,
        done: Callable[[Stamp | None], None] | None = None,
        *,
        idempotency_key: str | None = None,
        local_fallback: bool = True,
    ) -> None:
        """Send a room message: stamped, stored and published by the room
        log, delivered here in offset order; ``done`` gets the stamp, or None.

        If it cannot be stored (link down), it is delivered to this pod's
        members only, without offset (unless ``local_fallback`` is false).
        If the answer was lost on the way (it may or may not have been
        stored), it is not delivered here unstamped: the room is read again
        from where this pod stands, so it arrives once, in order, if it was
        stored."""
        room = message.room
        if room is None:
            raise ValueError("Timeline.publish takes room messages")

        def stamped(outcome: Stamp | Unstored) -> None:
            if isinstance(outcome, Stamp):
                if done is not None:
                    done(outcome)
                return
            if outcome is Unstored.UNKNOWN:
                self.counters.unknown += 1
                self.ready(room)  # reads what the room has after our last offset
            elif local_fallback:
                self.counters.unstamped += 1
                self._hub.broadcast(room, message.encode())
            if done is not None:
                done(None)

        self._log.append(message, stamped, idempotency_key=idempotency_key)

    # -- catch-up ----------------------------------------------------------------

    async def attach(
        self,
        conn: Connection,
        room: str,
        catchup: Catchup,
        greet: Callable[[], object] | None = None,
    ) -> None:
        """Join ``conn`` to ``room``: ``greet()`` (the caller's welcome or
        joined frame), a ``sync`` frame if a catch-up was asked for, what it
        missed, then live messages, with no gap and no duplicate. Once
        greeted, the member gets every message with a later offset."""
        self._hub.join(conn, room, live=False)
        state = self._rooms[room]
        entries, complete, reason = await self._gather(conn, room, state, catchup)
        if not self._hub.is_waiting(conn, room) or self._rooms.get(room) is not state:
            return  # it left, or closed, meanwhile
        if greet is not None:
            greet()
        seq = state.seq
        if catchup.asked or not complete:
            frame: dict[str, Any] = {
                "room": room,
                "epoch": seq.epoch,
                "offset": seq.last if seq.synced else None,
                "replayed": len(entries),
                "complete": complete,
            }
            if reason is not None:
                frame["reason"] = reason
            if entries:
                frame["first"] = entries[0].offset
            self._hub.send_to(conn, encode_event("sync", **frame))
        for entry in entries:
            if not self._hub.send_to(conn, entry.payload):
                return
        self.counters.replayed += len(entries)
        self._hub.go_live(conn, room)

    async def _gather(
        self, conn: Connection, room: str, state: _Room, catchup: Catchup
    ) -> tuple[list[Entry], bool, str | None]:
        """``(entries, complete, reason)``: what ``conn`` missed, from memory
        or history, ending at the room's last delivered offset."""
        deadline = self._clock() + self.settings.sync_timeout
        if not state.seq.synced:
            if self._broadcaster.state not in (LinkState.LOCAL_ONLY, LinkState.CONNECTED):
                return [], False, "unavailable"  # no waiting while the link is down
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.tried.wait(), self.settings.sync_timeout)
            if not state.seq.synced:
                return [], False, "unavailable"
        since = catchup.since
        if since is not None and catchup.epoch in (None, state.seq.epoch):
            # The client saw an offset this pod has not delivered yet (it was
            # on a faster pod): wait for it, briefly, rather than resend it.
            limit = min(deadline, self._clock() + 4 * self.settings.gap_wait + 1.0)
            while state.seq.last < since and (left := limit - self._clock()) > 0:
                try:
                    await asyncio.wait_for(state.progress.wait(), left)
                except TimeoutError:
                    break
        for _ in range(3):
            if not self._hub.is_waiting(conn, room) or self._rooms.get(room) is not state:
                return [], False, "unavailable"
            seq = state.seq
            complete, reason, after = _plan(catchup, seq.epoch, seq.last, self.settings.keep)
            entries = seq.since(after)
            if entries is not None:
                return entries, complete, reason
            self.counters.history_reads += 1
            try:
                got = await self._log.read(room, after, self.settings.keep, epoch=seq.epoch)
            except BroadcastError as exc:
                log.warning("history read for %s failed: %s", room, exc)
                return [], False, "unavailable"
            if got.epoch != state.seq.epoch:
                continue
            if got.first > after + 1 and reason is None:
                complete, reason = False, "window_exceeded"
            head = [e for e in got.entries if e.offset <= state.seq.last]
            upto = head[-1].offset if head else max(after, got.first - 1)
            rest = state.seq.since(upto)
            if rest is not None:
                return head + rest, complete, reason
        return [], False, "unavailable"

    # -- room state ----------------------------------------------------------

    async def _sync(self, room: str, state: _Room) -> None:
        """Read where ``room`` stands (first time) or what was missed (after
        a resubscription), retrying while the room is hosted here."""
        delay = self.settings.gap_wait
        try:
            while self._rooms.get(room) is state:
                seq = state.seq
                try:
                    if seq.synced:
                        got = await self._log.read(
                            room, seq.last, self.settings.keep, epoch=seq.epoch
                        )
                    else:
                        got = await self._log.read(room, -1, self.settings.keep)
                except BroadcastError as exc:
                    log.warning("reading the state of room %s failed: %s", room, exc)
                    state.tried.set()
                    state.wake.clear()
                    # Back off before retrying, unless the link comes back first.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(state.wake.wait(), delay)
                    delay = min(delay * 2, 5.0)
                    continue
                if self._rooms.get(room) is not state:
                    return
                now = self._clock()
                if seq.synced:
                    step = seq.fill(got.epoch, got.entries, newest=got.newest, now=now)
                    self.counters.recovered += len(step.deliver)
                else:
                    step = seq.start(got.epoch, got.newest, got.entries, now=now)
                state.synced.set()
                state.tried.set()
                self._apply(room, state, step)
                return
        finally:
            state.syncing = False
            if state.again and self._rooms.get(room) is state and not self._stopped:
                state.again = False
                self.ready(room)

    def _apply(self, room: str, state: _Room, step: Step) -> None:
        seq = state.seq
        if step.epoch_changed:
            self.counters.epoch_changes += 1
            log.warning("room %s: epoch changed to %s (its stored state was lost)", room, seq.epoch)
            self._hub.broadcast(
                room,
                encode_event(
                    "sync",
                    room=room,
                    epoch=seq.epoch,
                    offset=0,
                    replayed=0,
                    complete=False,
                    reason="epoch_changed",
                ),
            )
        for index, entry in enumerate(step.deliver):
            if index == step.skipped_at:
                self._tell_lost(room, seq.epoch, step)
            self._hub.broadcast(room, entry.payload)
        if step.skipped_at is not None and step.skipped_at >= len(step.deliver):
            self._tell_lost(room, seq.epoch, step)
        if step.deliver:
            self.counters.delivered += len(step.deliver)
            state.progress.set()
            state.progress = asyncio.Event()
        if step.lost:
            self.counters.lost += step.lost
            log.warning("room %s: %d message(s) skipped: no longer in history", room, step.lost)
        if seq.gap_since is None:
            state.repair_tries = 0
            if state.gap_timer is not None:
                state.gap_timer.cancel()
                state.gap_timer = None
        elif state.gap_timer is None and not self._stopped:
            wait = max(0.0, seq.gap_since + self.settings.gap_wait - self._clock())
            state.gap_timer = asyncio.get_running_loop().call_later(
                wait, self._gap_due, room, state
            )

    def _tell_lost(self, room: str, epoch: str | None, step: Step) -> None:
        """Members are told, before the messages that follow, that some
        offsets could not be delivered (no longer in history)."""
        self._hub.broadcast(
            room,
            encode_event(
                "sync",
                room=room,
                epoch=epoch,
                offset=step.skipped_to,
                replayed=0,
                complete=False,
                reason="window_exceeded",
                lost=step.lost,
            ),
        )

    def _gap_due(self, room: str, state: _Room) -> None:
        state.gap_timer = None
        if self._rooms.get(room) is not state or state.seq.gap() is None:
            return
        if state.repairing:  # one read at a time; look again after it
            state.gap_timer = asyncio.get_running_loop().call_later(
                self.settings.gap_wait, self._gap_due, room, state
            )
            return
        self._spawn(self._repair(room, state))

    async def _repair(self, room: str, state: _Room) -> None:
        gap = state.seq.gap()
        if gap is None:
            return
        after, highest = gap
        self.counters.gap_repairs += 1
        state.repairing = True
        try:
            got = await self._log.read(room, after, highest - after, epoch=state.seq.epoch)
        except BroadcastError as exc:
            state.repair_tries += 1
            if self._rooms.get(room) is not state:
                return
            if state.repair_tries < MAX_REPAIR_TRIES:
                log.warning("room %s: repairing a gap failed (%s); will retry", room, exc)
                if state.gap_timer is None and not self._stopped:
                    state.gap_timer = asyncio.get_running_loop().call_later(
                        self.settings.gap_wait, self._gap_due, room, state
                    )
                return
            log.warning("room %s: giving up on a gap after %d tries", room, state.repair_tries)
            self._apply(room, state, state.seq.skip_gap(self._clock()))
            return
        finally:
            state.repairing = False
        if self._rooms.get(room) is state:
            step = state.seq.fill(got.epoch, got.entries, newest=got.newest, now=self._clock())
            self.counters.recovered += len(step.deliver)
            self._apply(room, state, step)

    # -- lifecycle ----------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("timeline task failed", exc_info=exc)

    async def stop(self) -> None:
        """Cancel timers and reads; idempotent."""
        self._stopped = True
        for state in self._rooms.values():
            if state.gap_timer is not None:
                state.gap_timer.cancel()
                state.gap_timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "rooms": len(self._rooms),
            "rooms_holding": sum(1 for s in self._rooms.values() if s.seq.gap() is not None),
            "held": sum(s.seq.held for s in self._rooms.values()),
            "entries": c.entries,
            "delivered": c.delivered,
            "duplicates_dropped": sum(s.seq.duplicates for s in self._rooms.values()),
            "gap_repairs": c.gap_repairs,
            "lost": c.lost,
            "epoch_changes": c.epoch_changes,
            "replayed": c.replayed,
            "history_reads": c.history_reads,
            "recovered": c.recovered,
            "unstamped": c.unstamped,
            "unknown": c.unknown,
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
