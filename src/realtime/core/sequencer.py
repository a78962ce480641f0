"""Per-room ordering: a room's messages in offset order, no gap, no duplicate.

Pure: no sockets, no awaits, no clock of its own (callers pass ``now``).
Every room message carries an ``epoch`` (which changes when the room's
stored state is lost) and an ``offset`` that grows by exactly one per
message. A pod feeds a ``RoomSequencer`` with whatever reaches it — its own
publish replies, pub/sub messages from other pods, history reads — in any
order and any number of times, and gets back the entries it may deliver now,
in order. When offset n+2 arrives before n+1 the sequencer holds n+2 and
reports a gap; the caller fills it from history after a bounded wait
(``fill``), and, if history no longer has it either, the sequencer skips it
and counts it as lost.

It also remembers the last ``keep`` delivered entries, so a client joining
or resuming in a busy room is usually served without a history read.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Entry", "RoomSequencer", "SequencerState", "Step"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One room message: its place in the room and its client-ready JSON."""

    epoch: str
    offset: int
    payload: bytes


@dataclass(slots=True)
class Step:
    """What the caller must do after feeding the sequencer."""

    deliver: list[Entry] = field(default_factory=list)
    """Entries to hand to the room's members now, in this order."""
    epoch_changed: bool = False
    """The room's epoch changed: tell members before delivering ``deliver``."""
    lost: int = 0
    """Offsets skipped because nothing could supply them any more."""
    skipped_at: int | None = None
    """Index in ``deliver`` where the skip happened (members should be told
    before the entries from there on); ``skipped_to`` the offset skipped to."""
    skipped_to: int = 0


class SequencerState(enum.Enum):
    NEW = "new"
    """The room's position is not known yet (not ``placed``): everything
    offered is held."""
    LIVE = "live"
    """Delivering in order; nothing is missing."""
    HOLDING = "holding"
    """An offset is missing: later ones are held until it arrives."""


class RoomSequencer:
    """Ordering buffer and recent-message memory of one room on one pod."""

    __slots__ = (
        "_keep",
        "_max_bytes",
        "_pending",
        "_recent",
        "duplicates",
        "epoch",
        "gap_since",
        "last",
        "lost",
        "max_pending",
        "recent_bytes",
        "state",
    )

    def __init__(self, keep: int, *, max_bytes: int = 1 << 62, max_pending: int = 10_000) -> None:
        self.state = SequencerState.NEW
        self.epoch: str | None = None
        """The room's epoch as far as this pod knows (None: no message yet)."""
        self.last = 0
        """Offset of the last entry delivered (or of the baseline)."""
        self.gap_since: float | None = None
        """When the current gap was first seen (None: no gap)."""
        self.max_pending = max_pending
        self.duplicates = 0
        self.lost = 0
        self._pending: dict[int, Entry] = {}
        # The payloads of the last delivered entries, whose offsets run
        # without a hole up to ``last``. Bytes, not ``Entry`` objects: a
        # busy pod keeps tens of thousands of them, and bytes are invisible
        # to the garbage collector (whose full passes would otherwise walk
        # them all, tens of milliseconds at a time).
        self._recent: deque[bytes] = deque()
        self._keep = max(keep, 1)
        self._max_bytes = max_bytes
        self.recent_bytes = 0
        """Bytes of the payloads remembered: at most ``max_bytes``."""

    # -- feeding ----------------------------------------------------------

    def start(
        self, epoch: str | None, last: int, tail: Iterable[Entry] = (), *, now: float = 0.0
    ) -> Step:
        """Set where the room stands (from the store): its epoch, the last
        offset assigned, and the stored tail (oldest first, up to ``last``).

        Called once the pod is sure to receive every later entry. Entries
        held before it reached the pod after it subscribed: they are news
        for members already in the room and are delivered, with any stored
        entry between them and the baseline.
        """
        step = Step()
        if self.state is not SequencerState.NEW:
            # A resync after the link came back: treat it as a fill.
            return self.fill(epoch, tail, newest=last, now=now)
        tail = [e for e in tail if e.epoch == epoch and e.offset <= last]
        held = sorted(
            (e for e in self._pending.values() if e.epoch == epoch), key=lambda e: e.offset
        )
        self._pending.clear()
        self.epoch = epoch
        self.last = min(last, held[0].offset - 1) if held else last
        self._forget()
        expected = None
        for entry in tail:
            if entry.offset > self.last:
                break
            if entry.offset != expected:
                self._forget()  # a hole in the stored tail: keep what follows it
            self._remember(entry.payload)
            expected = entry.offset + 1
        if expected != self.last + 1:
            self._forget()
        self.state = SequencerState.LIVE
        for entry in [*tail, *held]:
            if entry.offset > self.last:
                self._offer(entry, now, step)
        return step

    def offer(self, entry: Entry, now: float) -> Step:
        """A room entry reached this pod, from any source."""
        step = Step()
        if self.state is SequencerState.NEW:
            if len(self._pending) < self.max_pending:
                self._pending.setdefault(entry.offset, entry)
            return step
        self._offer(entry, now, step)
        return step

    def fill(
        self,
        epoch: str | None,
        entries: Iterable[Entry],
        *,
        newest: int,
        now: float,
        first: int | None = None,
        limit: int | None = None,
    ) -> Step:
        """Entries read from the store after a gap (oldest first).

        ``newest`` is the last offset the store had assigned when it was
        read, ``first`` (if given) the oldest it still had, and ``limit`` (if
        given) the most entries the read could return: one that returned
        that many says nothing of the offsets after its last. Offsets the
        read covers but did not return are gone from the store (evicted,
        expired or flushed): they are skipped and counted in ``Step.lost``.
        Held offsets past what it covers stay held (they were stored after
        the read, or past its limit): the gap before them is repaired later.
        A store in another epoch starts this room's numbering again: what it
        has before ``first`` never was in that epoch, so nothing is counted
        lost for it.
        """
        step = Step()
        if self.state is SequencerState.NEW:
            return self.start(epoch, newest, entries, now=now)
        if epoch is not None and epoch != self.epoch and first is not None:
            step.epoch_changed = self.epoch is not None
            self.epoch = epoch
            self.last = max(0, first - 1)
            self._forget()
            self._pending = {o: e for o, e in self._pending.items() if e.epoch == epoch}
        covered = newest
        for returned, entry in enumerate(entries, 1):
            if returned == limit:  # the read's last: nothing is known past it
                covered = min(covered, entry.offset)
            if entry.epoch == epoch:
                self._offer(entry, now, step)
        if self._pending:
            # The store writes an offset before any later one is published,
            # so what the read covers and did not return is gone for good:
            # skip it rather than hold the room forever. Not past what it
            # covers: an entry held there may have been stored after the read
            # (a read that was waiting for the link while more came in).
            self._skip_to(min(min(self._pending) - 1, covered), now, step)
        return step

    def skip_gap(self, now: float) -> Step:
        """Give up on the current gap: deliver what is held after it."""
        step = Step()
        if self._pending:
            self._skip_to(min(self._pending) - 1, now, step)
        return step

    def _offer(self, entry: Entry, now: float, step: Step) -> None:
        if entry.epoch != self.epoch:
            if self.epoch is not None:
                step.epoch_changed = True
            # A new epoch starts at offset 1: every entry of it is news.
            self.epoch = entry.epoch
            self.last = 0
            self._forget()
            self._pending = {o: e for o, e in self._pending.items() if e.epoch == entry.epoch}
        if entry.offset <= self.last or entry.offset in self._pending:
            self.duplicates += 1
            return
        self._pending[entry.offset] = entry
        self._drain(now, step)
        if len(self._pending) > self.max_pending:
            self._skip_to(min(self._pending) - 1, now, step)

    def _skip_to(self, offset: int, now: float, step: Step) -> None:
        missed = offset - self.last
        if missed > 0:
            self.lost += missed
            step.lost += missed
            if step.skipped_at is None:
                step.skipped_at = len(step.deliver)
            step.skipped_to = offset
            self.last = offset
            self._forget()  # remembered entries run without a hole
        self._drain(now, step)

    def _drain(self, now: float, step: Step) -> None:
        while (entry := self._pending.pop(self.last + 1, None)) is not None:
            self.last = entry.offset
            self._remember(entry.payload)
            step.deliver.append(entry)
        if self._pending:
            self.state = SequencerState.HOLDING
            if self.gap_since is None:
                self.gap_since = now
        else:
            self.state = SequencerState.LIVE
            self.gap_since = None

    def _remember(self, payload: bytes) -> None:
        recent = self._recent
        recent.append(payload)
        size = self.recent_bytes + len(payload)
        while len(recent) > self._keep or (size > self._max_bytes and len(recent) > 1):
            size -= len(recent.popleft())
        self.recent_bytes = size

    def _forget(self) -> None:
        self._recent.clear()
        self.recent_bytes = 0

    def forget(self) -> None:
        """Drop the remembered entries (memory is short): catch-ups read the
        store instead."""
        self._forget()

    # -- queries ------------------------------------------------------------

    @property
    def placed(self) -> bool:
        """Whether the room's position is known (``start`` was called)."""
        return self.state is not SequencerState.NEW

    @property
    def held(self) -> int:
        return len(self._pending)

    def gap(self) -> tuple[int, int] | None:
        """``(last delivered, highest held)`` while holding, else None."""
        if not self._pending:
            return None
        return self.last, max(self._pending)

    def since(self, after: int) -> list[Entry] | None:
        """Delivered entries with offset > ``after``, oldest first, from
        memory; None if memory does not reach back that far."""
        if after >= self.last:
            return []
        recent = self._recent
        first = self.last - len(recent) + 1
        if not recent or first > after + 1 or self.epoch is None:
            return None
        skip = after + 1 - first
        epoch = self.epoch
        return [Entry(epoch, first + i, payload) for i, payload in enumerate(recent) if i >= skip]
