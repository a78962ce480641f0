"""Every Redis name the backend uses, built in one place.

For a deployment whose names start with ``prefix`` (``REDIS_CHANNEL_PREFIX``):

=====================================  ============================================
``{prefix}:global``                     channel: messages to everyone
``{prefix}:room:<room>``                channel: a room's messages and presence events
``{prefix}:pod:<pod>``                  channel: a pod's heartbeat to itself
``{prefix}:room:{<room>}:seq``          hash: the room's ``epoch``
``{prefix}:room:{<room>}:hist:<epoch>`` stream: the epoch's history (bodies, IDs ``0-<offset>``)
``{prefix}:room:{<room>}:keys``         hash: message key -> offset, epoch, digest
``{prefix}:room:{<room>}:keyorder``     sorted set: the keys by offset (the oldest go)
``{prefix}:room:{<room>}:pods``         sorted set: pods with presence entries
``{prefix}:room:{<room>}:presence:<pod>``  hash: one pod's users in the room
=====================================  ============================================

A room's keys share the ``{<room>}`` hash tag, so they live in one slot (and
on one shard of a Redis Cluster) and one script may touch them all. On a
Cluster the channels are sharded (``SSUBSCRIBE``): a room's is
``{prefix}:room:{<room>}``, in its keys' slot, so the append script can
``SPUBLISH`` it; a pod's heartbeat channel is one per shard,
``{prefix}:pod:<pod>:{<tag>}``, its tag picked to fall in that shard's slots.

Envelope: what a pod publishes starts with ``<pod id>\\n``, or, for a room
entry it delivered from its append's reply (a plain append's or, waiting for
replicas, every one: published once the reply came), ``<pod id> r\\n`` (a pod
id has no white space); each pod skips what it published itself that it
delivered already: global messages, presence events, the ``r`` entries
(unread). Its script-published entries it delivers from their pushes, like
every pod. Then either an
unordered message's frame (``{...}``: a global message, a presence event),
or a room entry: ``<offset>:<epoch>\\n<body>`` (``entry_payload`` makes the
frame of it, on every pod alike).
"""

from __future__ import annotations

from ...core.protocol import entry_payload
from ...core.sequencer import Entry
from .slots import key_slot

__all__ = ["Names", "read_entry"]


class Names:
    """Channels, keys and the envelope of one deployment, seen from one pod."""

    __slots__ = (
        "envelope",
        "global_channel",
        "pod_channel",
        "prefix",
        "replied_envelope",
        "room_channel_prefix",
        "sharded",
    )

    def __init__(self, prefix: str, pod_id: str, *, sharded: bool = False) -> None:
        self.prefix = prefix
        self.sharded = sharded
        self.global_channel = f"{prefix}:global".encode()
        self.room_channel_prefix = f"{prefix}:room:".encode()
        self.pod_channel = f"{prefix}:pod:{pod_id}".encode()
        if not pod_id or any(c.isspace() for c in pod_id):
            raise ValueError(f"a pod id is not empty and has no white space: {pod_id!r}")
        self.envelope = pod_id.encode() + b"\n"
        """The head of the envelopes this pod publishes."""
        self.replied_envelope = pod_id.encode() + b" r\n"
        """The head of the room entries this pod publishes once their
        append's reply came, having delivered them from it: its own copies
        of them are skipped unread."""

    def channel(self, room: str | None) -> bytes:
        """The channel of ``room`` (None: the global channel)."""
        if room is None:
            return self.global_channel
        if self.sharded:
            return self.room_channel_prefix + b"{" + room.encode() + b"}"
        return self.room_channel_prefix + room.encode()

    def heartbeat_channel(self, slots: tuple[int, int] | None = None) -> bytes:
        """The pod's heartbeat channel; on a Cluster, one whose slot falls in
        ``slots`` (so it is served by that shard)."""
        if slots is None:
            return self.pod_channel
        start, end = slots
        for tag in range(1_000_000):  # about 16384 / (end - start + 1) tries
            channel = self.pod_channel + b":{" + str(tag).encode() + b"}"
            if start <= key_slot(channel) <= end:
                return channel
        raise AssertionError("no tag falls in the slot range")  # pragma: no cover

    def _room(self, room: str) -> str:
        return f"{self.prefix}:room:{{{room}}}"

    def log_keys(self, room: str) -> tuple[str, str, str, str]:
        """The room's sequence hash, history streams' base (an epoch's is
        ``<base>:<epoch>``), message keys and their order."""
        base = self._room(room)
        return f"{base}:seq", f"{base}:hist", f"{base}:keys", f"{base}:keyorder"

    def claim_key(self, name: str) -> bytes:
        """The key of a ``Backend.claim``."""
        return f"{self.prefix}:claim:{name}".encode()

    def presence_keys(self, room: str) -> tuple[str, str]:
        """The room's set of pods, and the base of each pod's presence hash."""
        base = self._room(room)
        return f"{base}:pods", f"{base}:presence:"


def read_entry(data: bytes, start: int) -> Entry | None:
    """The room entry of an envelope whose pod id ends before ``start``; None
    if it carries an unordered message instead (or is not readable)."""
    if data[start : start + 1] == b"{":
        return None
    end = data.find(b"\n", start)
    offset, _, epoch = data[start:end].partition(b":")
    if end < 0 or not epoch or not offset.isdigit():
        return None
    number = int(offset)
    text = epoch.decode()
    return Entry(text, number, entry_payload(data[end + 1 :], text, number))
