"""Room offsets and history in Redis: two Lua scripts and their replies.

Per room, in one hash slot (the ``{room}`` hash tag):

* ``{prefix}:room:{<room>}:seq`` — a hash: ``epoch``, the room's epoch;
* ``{prefix}:room:{<room>}:hist:<epoch>`` — that epoch's history: a stream,
  one entry per message with ID ``0-<offset>`` and field ``b``: the message's
  body (``Message.body``; ``entry_payload`` makes the frame of it). The
  stream gives the offsets itself (``XADD ... 0-*``), and is capped at the
  history length approximately (Redis trims whole nodes of entries, so it may
  hold up to a node more, ``stream-node-max-entries``; reads never reach
  further back).

Both expire ``history_ttl`` seconds after the room's last message (the hash
a second later: a stream never outlives the hash that names its epoch); the
next message then starts a new epoch at offset 1. ``APPEND`` does,
atomically and in one round trip: the idempotency check, the offset and the
store (one ``XADD`` to the stream of the epoch the pod saw last; the room's
own epoch read, or a new one made, only when that stream is not there), the
TTLs (when this pod last refreshed them an eighth of the TTL ago or more) and
the ``PUBLISH`` of the envelope (``names.py``) on the room channel. ``READ``
returns the room's epoch, newest and oldest offsets and a range of entries,
atomically. Rooms stored by earlier versions are converted by whichever
script touches them first (``lua/room_common.lua``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ...core.protocol import Message, entry_payload
from ...core.sequencer import Entry
from ..base import Slice, Stamp, Unstored, content_digest, key_field, new_epoch
from .names import Names
from .resp import pack_command
from .scripts import APPEND, READ, REBASE, SEQ_MARGIN_MS, quiet, sharded

__all__ = ["RedisRoomLog"]


class RedisRoomLog:
    """Script arguments and reply parsing of the room log."""

    def __init__(
        self,
        names: Names,
        *,
        history_length: int,
        history_ttl: float,
        history_max_bytes: int = 1 << 20,
        idempotency_keys: int = 1000,
        publish: bool = True,
    ) -> None:
        self.names = names
        script = APPEND if publish else quiet(APPEND)
        self.append_script = sharded(script) if names.sharded else script
        """``append.lua``; on a Cluster its publishes sharded; without them
        when the pod publishes once replicas have the message (``publish``)."""
        self.history_length = history_length
        self.ttl_ms = max(1, int(history_ttl * 1000))
        self.max_bytes = history_max_bytes
        self.max_keys = idempotency_keys
        self._refresh_after = history_ttl / 8
        self._refreshed: dict[str, float] = {}
        """When this pod last had each room's TTLs refreshed (monotonic s)."""
        self._refreshed_pruned = 0

    def _refresh(self, room: str, now: float) -> bool:
        """Whether this append should refresh ``room``'s TTLs (and note it)."""
        last = self._refreshed.get(room)
        if last is not None and now - last < self._refresh_after:
            return False
        self._refreshed[room] = now
        if len(self._refreshed) > 2 * self._refreshed_pruned + 1024:
            stale = now - self._refresh_after
            self._refreshed = {r: t for r, t in self._refreshed.items() if t > stale}
            self._refreshed_pruned = len(self._refreshed)
        return True

    def plain(self, body: bytes) -> bool:
        """Whether a message may be appended with a plain ``XADD``
        (``xadd_commands``): its body is not big enough to need the history
        trimmed by bytes (the script's work)."""
        return len(body) * self.history_length <= self.max_bytes

    def forget_refreshes(self) -> None:
        """After a batch whose outcome is unknown: refresh every room's TTLs
        with its next message."""
        self._refreshed.clear()

    def append_command(
        self, batch: Sequence[tuple[Message, str | None, bytes, tuple[str, int] | None]]
    ) -> bytes:
        """One ``EVALSHA`` that appends every ``(message, key, body, seen)``
        of ``batch`` (room messages: the body is ``message.body()``; ``seen``
        the newest entry of the room the pod has seen, ``(epoch, offset)``,
        or None), packed. On a Cluster, the rooms of a batch share one slot."""
        keys: list[str] = []
        args: list[bytes | str | int] = [
            self.ttl_ms,
            self.history_length,
            self.max_bytes,
            self.max_keys,
            self.names.envelope,
            new_epoch(),  # for any room of the batch that needs a new epoch
        ]
        now = time.monotonic()
        for message, key, body, seen in batch:
            room = message.room
            assert room is not None  # only room messages are appended
            seq, hist, keyed, order = self.names.log_keys(room)
            epoch, offset = seen or ("", "")
            keys += (seq, f"{hist}:{epoch}", keyed, order)
            mode = int(self._refresh(room, now))
            if key is None:
                args += [self.names.channel(room), body, offset, epoch, mode]
            else:
                args += [self.names.channel(room), body, offset, epoch, 2 + mode]
                args += [key_field(message, key), content_digest(message)]
        return pack_command(b"EVALSHA", self.append_script.sha, len(keys), *keys, *args)

    def xadd_commands(self, room: str, epoch: str, body: bytes, now: float) -> list[bytes]:
        """The script's common case without the script: store ``body`` in
        ``room``'s history of ``epoch``, trimmed approximately, the offset
        given by the stream (``0-*``); nothing if that stream is not there
        (``NOMKSTREAM``: the room's epoch changed or its history expired).
        The first reply is the entry's id, ``0-<offset>``, or nil. When this
        pod last had the room's TTLs refreshed an eighth of them ago or more,
        two ``PEXPIRE``s follow (their replies are of no interest)."""
        seq, hist, _, _ = self.names.log_keys(room)
        stream = f"{hist}:{epoch}"
        commands = [
            pack_command(
                b"XADD", stream, b"NOMKSTREAM", b"MAXLEN", b"~", self.history_length,
                b"0-*", b"b", body,
            )
        ]  # fmt: skip
        if self._refresh(room, now):
            commands.append(pack_command(b"PEXPIRE", seq, self.ttl_ms + SEQ_MARGIN_MS))
            commands.append(pack_command(b"PEXPIRE", stream, self.ttl_ms))
        return commands

    @staticmethod
    def parse_append(reply: Any) -> list[Stamp | Unstored]:
        """The outcome of each message of an ``append_command``, in order."""
        outcomes: list[Stamp | Unstored] = []
        for i in range(0, len(reply), 3):
            offset, epoch, flag = reply[i : i + 3]
            if flag == 2:
                outcomes.append(Unstored.CONFLICT)
            else:
                outcomes.append(Stamp(_text(epoch), int(offset), duplicate=flag == 1))
        return outcomes

    def read_command(self, room: str, after: int, limit: int, epoch: str | None) -> bytes:
        seq, history, _, _ = self.names.log_keys(room)
        return pack_command(
            b"EVALSHA", READ.sha, 2, seq, history, after, limit, epoch or "", self.history_length
        )

    def rebase_command(self, room: str, epoch: str, offset: int) -> bytes:
        """Move ``room`` to a new epoch if it is behind ``offset`` in ``epoch``."""
        seq, history, _, _ = self.names.log_keys(room)
        return pack_command(b"EVALSHA", REBASE.sha, 2, seq, history, epoch, offset, new_epoch())

    @staticmethod
    def parse_read(reply: Any, after: int) -> Slice:
        epoch_raw, newest, first, raw_entries = reply
        if epoch_raw is None or epoch_raw is False:
            return Slice(None, 0, 1, ())
        epoch = _text(epoch_raw)
        entries = []
        for entry_id, fields in raw_entries:
            offset = int(bytes(entry_id)[2:])  # `0-<offset>`
            entries.append(Entry(epoch, offset, entry_payload(bytes(fields[1]), epoch, offset)))
        if after < 0:
            entries.reverse()
        return Slice(epoch, int(newest), int(first), tuple(entries))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
