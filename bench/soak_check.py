"""The soak test's end-of-run checks, on what the clients recorded (no I/O).

For every client and each of its rooms (it was in them for the whole run,
resuming after every drop), walking its frames in arrival order:

- **order**: within one (room, epoch), offsets strictly increase; an epoch
  once left never comes back;
- **duplicates**: no message (its key) twice in one epoch; a message seen
  again in a *later* epoch is counted apart (``redelivered_in_new_epoch``:
  what a resend after a failover's ``epoch_changed`` may legitimately do);
- **gaps**: consecutive offsets of an epoch differ by one, and the first is 1
  in the run's first epoch; a skip is *reported* when a ``sync`` with
  ``complete: false`` (``window_exceeded``, ``epoch_changed``,
  ``unavailable``, ``unknown_offset``) came between, else it is an
  unreported gap (a failure); a move to another epoch must be announced the
  same way;
- **losses**: every acked message (its key's last ack with an offset) is
  received by every member of its room, unless it falls in a reported gap
  (then it is counted as ``reported_missing``, not lost);
- **conflicts**: no (room, epoch, offset) names two messages, across every
  client's deliveries and every ack;
- **partial**: a message sent without a key and never acked (its outcome
  unknown to its sender) reached every member of its room or none (a
  member's reported gap excuses it there).

Recovery per fault: for each room, the time from the fault's start until
every member of the room received a message first sent after that start;
the fault's recovery is the slowest room's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .soak_client import Ack, Delivery, Sync

EXAMPLES = 10
"""Examples kept per kind of failure in the report."""


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str
    t_start: float
    t_end: float
    detail: str = ""


@dataclass
class Walk:
    """One client's view of one room, after the walk."""

    keys: dict[str, set[str]] = field(default_factory=dict)
    """key -> epochs it was delivered in"""
    excused: list[tuple[str, int, float]] = field(default_factory=list)
    """(epoch, low, high): offsets strictly between were reported missing"""
    reported: dict[str, int] = field(default_factory=dict)
    """reason -> sync frames with complete: false"""
    lost_counted: int = 0
    unstamped: int = 0


@dataclass
class Outcome:
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    reported: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append(example)


FAILURES = (
    "losses",
    "duplicates",
    "order",
    "unreported_gaps",
    "conflicts",
    "partial",
    "unrecovered",
)
"""The kinds of finding that fail a run."""


def walk(
    who: str,
    events: Iterable[Delivery | Sync],
    outcome: Outcome,
    at: dict[tuple[str, int], set[str]],
) -> Walk:
    """Check one client's frames of one room in arrival order; fill ``at``
    ((epoch, offset) -> keys) for the conflict check."""
    w = Walk()
    epoch: str | None = None
    last = 0
    left: set[str] = set()
    reported = False
    for ev in events:
        if isinstance(ev, Sync):
            if ev.frame.get("complete") is False:
                reason = str(ev.frame.get("reason"))
                w.reported[reason] = w.reported.get(reason, 0) + 1
                w.lost_counted += int(ev.frame.get("lost") or 0)
                reported = True
                if epoch is not None and ev.frame.get("epoch") not in (None, epoch):
                    w.excused.append((epoch, last, math.inf))
            continue
        if ev.epoch is None or ev.offset is None:
            w.unstamped += 1
            continue
        at.setdefault((ev.epoch, ev.offset), set()).add(ev.key)
        epochs = w.keys.setdefault(ev.key, set())
        if ev.epoch in epochs:
            outcome.add("duplicates", f"{who}: {ev.key} again at {ev.epoch}:{ev.offset}")
            continue
        if epochs:
            outcome.add("redelivered_in_new_epoch", f"{who}: {ev.key} in {ev.epoch}")
        epochs.add(ev.epoch)
        if epoch is None:
            if ev.offset != 1:
                _gap(outcome, w, who, ev.epoch, 0, ev.offset, reported)
        elif ev.epoch == epoch:
            if ev.offset <= last:
                outcome.add("order", f"{who}: {ev.epoch}:{ev.offset} after {last}")
                continue
            if ev.offset > last + 1:
                _gap(outcome, w, who, ev.epoch, last, ev.offset, reported)
        else:
            if ev.epoch in left:
                outcome.add("order", f"{who}: back to epoch {ev.epoch} from {epoch}")
            if reported:
                w.excused.append((epoch, last, math.inf))
            else:
                outcome.add("unreported_gaps", f"{who}: epoch {epoch} -> {ev.epoch} without a sync")
            left.add(epoch)
        epoch, last, reported = ev.epoch, ev.offset, False
    return w


def _gap(
    outcome: Outcome, w: Walk, who: str, epoch: str, low: int, high: int, reported: bool
) -> None:
    if reported:
        w.excused.append((epoch, low, high))
        outcome.add("reported_gaps", f"{who}: {epoch} {low} -> {high}")
    else:
        outcome.add("unreported_gaps", f"{who}: {epoch} {low} -> {high}")


def check(
    members: Mapping[str, list[str]],
    events: Mapping[tuple[str, str], list[Delivery | Sync]],
    acks: Mapping[str, Ack],
    first_sent: Mapping[str, float],
    faults: list[Fault],
    t0: float,
    unconfirmed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Every check over a run's records; ``failures`` in the result lists
    what failed (empty: the run passed). Times are reported from ``t0``."""
    outcome = Outcome()
    walks: dict[tuple[str, str], Walk] = {}
    delivered = 0
    for room, clients in members.items():
        at: dict[tuple[str, int], set[str]] = {}
        for client in clients:
            evs = events[(client, room)]
            walks[(client, room)] = walk(f"{client}/{room}", evs, outcome, at)
            delivered += sum(isinstance(e, Delivery) and e.offset is not None for e in evs)
        for key, ack in acks.items():
            if ack.room == room:
                at.setdefault((ack.epoch, ack.offset), set()).add(key)
        for (epoch, offset), keys in at.items():
            if len(keys) > 1:
                outcome.add("conflicts", f"{room} {epoch}:{offset} names {sorted(keys)[:4]}")
    reported_missing = 0
    for key, ack in acks.items():
        for client in members[ack.room]:
            w = walks[(client, ack.room)]
            if key in w.keys:
                continue
            if any(e == ack.epoch and lo < ack.offset < hi for e, lo, hi in w.excused):
                reported_missing += 1
            else:
                outcome.add(
                    "losses", f"{client}/{ack.room}: {key} acked at {ack.epoch}:{ack.offset}"
                )
    for key, room in (unconfirmed or {}).items():
        placed = {
            (e.epoch, e.offset)
            for client in members[room]
            for e in events[(client, room)]
            if isinstance(e, Delivery) and e.key == key and e.offset is not None
        }
        if not placed:
            continue  # reached no one: not stored
        missing = [
            client
            for client in members[room]
            if key not in walks[(client, room)].keys
            and not any(
                e == epoch and lo < offset < hi
                for epoch, offset in placed
                for e, lo, hi in walks[(client, room)].excused
            )
        ]
        if missing:
            outcome.add("partial", f"{room}: {key} at {sorted(placed)} missed by {missing[:4]}")
    for w in walks.values():
        for reason, n in w.reported.items():
            outcome.reported[reason] = outcome.reported.get(reason, 0) + n
    recoveries = [recovery(f, members, events, first_sent, t0, outcome) for f in faults]
    counts = {kind: outcome.counts.get(kind, 0) for kind in FAILURES}
    return {
        "acked": len(acks),
        "delivered": delivered,
        "expected_deliveries": sum(len(members[a.room]) for a in acks.values()),
        "unstamped_deliveries": sum(w.unstamped for w in walks.values()),
        "reported_missing": reported_missing,
        "reported_syncs": outcome.reported,
        "lost_in_syncs": sum(w.lost_counted for w in walks.values()),
        "reported_gaps": outcome.counts.get("reported_gaps", 0),
        "redelivered_in_new_epoch": outcome.counts.get("redelivered_in_new_epoch", 0),
        **counts,
        "faults": recoveries,
        "examples": outcome.examples,
        "failures": [kind for kind in FAILURES if counts[kind]],
    }


def recovery(
    fault: Fault,
    members: Mapping[str, list[str]],
    events: Mapping[tuple[str, str], list[Delivery | Sync]],
    first_sent: Mapping[str, float],
    t0: float,
    outcome: Outcome,
) -> dict[str, Any]:
    """How long after ``fault`` started every room delivered new messages again."""
    per_room: dict[str, float | None] = {}
    for room, clients in members.items():
        worst: float | None = 0.0
        for client in clients:
            first = next(
                (
                    e.t
                    for e in events[(client, room)]
                    if isinstance(e, Delivery)
                    and e.offset is not None
                    and first_sent.get(e.key, -math.inf) >= fault.t_start
                ),
                None,
            )
            if first is None:
                worst = None
                break
            worst = max(worst or 0.0, first - fault.t_start)
        per_room[room] = worst
    slowest = [v for v in per_room.values() if v is not None]
    never = sorted(room for room, v in per_room.items() if v is None)
    if never:
        outcome.add("unrecovered", f"{fault.kind} {fault.target}: no new delivery in {never}")
    return {
        "kind": fault.kind,
        "target": fault.target,
        "detail": fault.detail,
        "at_s": round(fault.t_start - t0, 2),
        "took_s": round(fault.t_end - fault.t_start, 2),
        "recovery_s": None if never else round(max(slowest, default=0.0), 3),
        "unrecovered_rooms": never,
    }
