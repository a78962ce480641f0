"""Where the client is in each room, and what of the server's frames the
caller gets to see: pure, no I/O (fed decoded frames, hands back events).

A :class:`Cursor` keeps a room's ``(epoch, offset)`` — the last message the
caller was given — and decides for each incoming room message whether it is
new (deliver it), a copy (an offset already given, in this epoch or an
epoch the room has moved on from: drop it), or new after a hole nobody
announced (deliver it, with an :class:`~.events.Unrecoverable` first).
``sync`` frames move the cursor: a catch-up starts at ``first - 1``, a
live ``window_exceeded`` skips to ``offset``, an epoch change restarts at
0 in the new epoch. On (re)connect the cursor says what to ask for:
``since``/``epoch`` once it has a position, else ``history``.

:class:`SeenIds` catches the copies offsets cannot: a keyed message
delivered unstamped (its pod could not reach Redis) and later stored under
the same id.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from .events import EpochChanged, Event, Message, Unrecoverable, User

__all__ = ["Cursor", "SeenIds", "parse_message"]

UNSOLICITED_LOSS = frozenset({"window_exceeded", "unknown_offset", "unavailable"})
"""Reasons of a ``complete: false`` sync that mean messages are gone for good
(``epoch_changed`` is reported as :class:`EpochChanged`, with an
:class:`Unrecoverable` only when the client asked to resume)."""


class SeenIds:
    """The ids of the last ``size`` messages given to the caller."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, message_id: str) -> bool:
        """Remember ``message_id``; False if it was already there."""
        if message_id in self._ids:
            self._ids.move_to_end(message_id)
            return False
        self._ids[message_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


class Cursor:
    """One joined room's position, and what to ask for on (re)connect."""

    def __init__(self, room: str, history: int | None = None) -> None:
        self.room = room
        self.epoch: str | None = None
        self.offset = 0
        self.placed = False
        """Has a position (a ``sync`` or a stamped message was seen): a
        reconnect resumes from it instead of asking for history."""
        self._history = history
        self._past: set[str] = set()
        self._resuming = False
        self._replay_left = 0

    def replaying(self) -> bool:
        """Call once per room message, in order: True while it is one of the
        messages the last ``sync`` announced (a catch-up, not live)."""
        if self._replay_left > 0:
            self._replay_left -= 1
            return True
        return False

    def catchup(self) -> dict[str, Any]:
        """The ``since``/``epoch`` or ``history`` fields of a join (always a
        catch-up, so the server answers with a ``sync`` that places us)."""
        if self.placed:
            self._resuming = True
            fields: dict[str, Any] = {"since": self.offset}
            if self.epoch is not None:
                fields["epoch"] = self.epoch
            return fields
        self._resuming = False
        return {"history": self._history or 0}

    def sync(self, frame: Mapping[str, Any]) -> list[Event]:
        """A ``sync`` frame for this room: move the cursor, say what was lost."""
        events: list[Event] = []
        epoch = _str_or_none(frame.get("epoch"))
        offset = _int(frame.get("offset"))
        first = _int(frame.get("first"))
        replayed = _int(frame.get("replayed")) or 0
        complete = frame.get("complete") is not False
        reason = frame.get("reason") if isinstance(frame.get("reason"), str) else None
        resuming, self._resuming = self._resuming, False
        after, old_epoch = self.offset, self.epoch
        if epoch != old_epoch and epoch is not None and old_epoch is not None:
            events.append(EpochChanged(self.room, old_epoch, epoch))
            if old_epoch is not None:
                self._past.add(old_epoch)
        if not complete and reason is not None:
            lost = _int(frame.get("lost"))
            if reason == "window_exceeded" and lost is None and resuming and epoch == old_epoch:
                start = first if first is not None and replayed else (offset or 0) + 1
                lost = max(0, start - after - 1)
            if reason in UNSOLICITED_LOSS or (reason == "epoch_changed" and resuming):
                events.append(Unrecoverable(self.room, reason, lost, old_epoch, after))
        self.epoch = epoch
        if replayed and first is not None:
            self.offset = first - 1
        else:
            self.offset = offset or 0
        self.placed = True
        self._replay_left = replayed
        return events

    def message(self, message: Message) -> tuple[bool, list[Event]]:
        """A room message: ``(deliver, events before it)``. Messages without
        an offset (not stored) are always new as far as offsets go."""
        offset, epoch = message.offset, message.epoch
        if offset is None:
            return True, []
        if epoch is not None and epoch in self._past:
            return False, []  # a straggler of an epoch the room has left
        events: list[Event] = []
        if epoch != self.epoch:
            if self.epoch is not None:
                events.append(EpochChanged(self.room, self.epoch, epoch))
                self._past.add(self.epoch)
            self.epoch, self.offset = epoch, 0
        elif offset <= self.offset:
            return False, []  # seen already: a replay overlapping live delivery
        if self.placed and offset > self.offset + 1:
            missing = offset - self.offset - 1
            events.append(Unrecoverable(self.room, "gap", missing, epoch, self.offset))
        self.offset = offset
        self.placed = True
        return True, events


def parse_message(frame: Mapping[str, Any], *, replayed: bool = False) -> Message | None:
    """A ``message`` frame as a :class:`Message`; None if it is malformed."""
    sender = frame.get("from")
    message_id = frame.get("id")
    if not isinstance(message_id, str) or not isinstance(sender, Mapping):
        return None
    room = frame.get("room")
    return Message(
        room=room if isinstance(room, str) else None,
        id=message_id,
        sender=User(str(sender.get("id", "")), str(sender.get("name", ""))),
        ts=_int(frame.get("ts")) or 0,
        data=frame.get("data"),
        offset=_int(frame.get("offset")),
        epoch=_str_or_none(frame.get("epoch")),
        to=_str_or_none(frame.get("to")),
        replayed=replayed,
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
