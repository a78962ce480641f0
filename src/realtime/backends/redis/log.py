"""Room offsets and history in Redis: two Lua scripts and their replies.

Per room, two keys in one hash slot (the ``{room}`` hash tag):

* ``{prefix}:room:{<room>}:seq`` — a hash: ``epoch`` and the last ``offset``;
* ``{prefix}:room:{<room>}:log`` — a stream capped at the history length, one
  entry per message with ID ``<offset>-0`` and field ``m``: the stamped
  client-ready JSON.

Both expire ``history_ttl`` seconds after the room's last message; the next
message then starts a new epoch at offset 1. ``APPEND`` does, atomically and
in one round trip: the idempotency check, the epoch (created if missing), the
offset (``HINCRBY``), the stamped JSON, ``XADD`` with ``MAXLEN``, the TTLs
and the ``PUBLISH`` of the envelope on the room channel. ``READ`` returns the
room's epoch, newest and oldest offsets and a range of entries, atomically.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

from ...core.protocol import MESSAGE_PREFIX, Message
from ...core.sequencer import Entry
from ..base import Slice, Stamp
from ..memory import new_epoch

__all__ = ["APPEND", "READ", "RedisRoomLog", "parse_stamp"]

APPEND: Final = """
local idem = KEYS[3]
if idem then
  local seen = redis.call('GET', idem)
  if seen then
    local sep = string.find(seen, ':', 1, true)
    return {tonumber(string.sub(seen, 1, sep - 1)), string.sub(seen, sep + 1), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local payload = ARGV[7] .. '"offset":' .. offset .. ',"epoch":"' .. epoch .. '",' .. ARGV[5]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'm', payload)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], ARGV[6] .. payload)
if idem then
  redis.call('SET', idem, offset .. ':' .. epoch, 'PX', ARGV[4])
end
return {offset, epoch, 0}
"""
"""KEYS: seq hash, log stream[, idempotency key]. ARGV: channel, epoch to
use if the room has none, history length, TTL in ms, message body (the JSON
after ``{"type":"message",``), envelope head (pod id + newline), message
prefix. Returns ``{offset, epoch, duplicate}``."""

READ: Final = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {false, 0, 1, {}}
end
local newest = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local after = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if ARGV[3] ~= '' and ARGV[3] ~= epoch then
  after = 0
end
local first = newest + 1
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #oldest > 0 then
  first = tonumber(string.match(oldest[1][1], '^(%d+)'))
end
local entries = {}
if limit > 0 then
  if after < 0 then
    entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], '(' .. after .. '-0', '+', 'COUNT', limit)
  end
end
return {epoch, newest, first, entries}
"""
"""KEYS: seq hash, log stream. ARGV: after (-1: newest), limit, epoch or
''. Returns ``{epoch or nil, newest, first, [[id, [field, value]], ...]}``."""


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def parse_stamp(payload: bytes) -> tuple[str, int] | None:
    """``(epoch, offset)`` of a stamped message payload, read from its fixed
    prefix without decoding the JSON; None if it is not stamped."""
    head = MESSAGE_PREFIX + b'"offset":'
    if not payload.startswith(head):
        return None
    start = len(head)
    comma = payload.find(b",", start, start + 20)
    if comma < 0 or not payload.startswith(b'"epoch":"', comma + 1):
        return None
    epoch_start = comma + 10
    quote = payload.find(b'"', epoch_start, epoch_start + 70)
    if quote < 0:
        return None
    try:
        offset = int(payload[start:comma])
    except ValueError:
        return None
    return payload[epoch_start:quote].decode(), offset


class RedisRoomLog:
    """Keys, script arguments and reply parsing for one channel prefix."""

    append_sha: Final = _sha(APPEND)
    read_sha: Final = _sha(READ)

    def __init__(
        self, prefix: str, *, pod_id: str, history_length: int, history_ttl: float
    ) -> None:
        self.prefix = prefix
        self.history_length = history_length
        self.ttl_ms = max(1, int(history_ttl * 1000))
        self._envelope = pod_id.encode() + b"\n"

    def keys(self, room: str) -> tuple[str, str]:
        base = f"{self.prefix}:room:{{{room}}}"
        return f"{base}:seq", f"{base}:log"

    def idempotency_key(self, room: str, key: str) -> str:
        return f"{self.prefix}:room:{{{room}}}:idem:{key}"

    def append_command(
        self,
        message: Message,
        channel: bytes,
        idempotency_key: str | None,
        body: bytes | None = None,
    ) -> list[Any]:
        """``EVALSHA`` arguments that append ``message`` (a room message)."""
        assert message.room is not None
        keys: list[str] = list(self.keys(message.room))
        if idempotency_key is not None:
            keys.append(self.idempotency_key(message.room, idempotency_key))
        return [
            "EVALSHA",
            self.append_sha,
            len(keys),
            *keys,
            channel,
            new_epoch(),
            self.history_length,
            self.ttl_ms,
            message.body() if body is None else body,
            self._envelope,
            MESSAGE_PREFIX,
        ]

    @staticmethod
    def parse_append(reply: Any) -> Stamp:
        offset, epoch, duplicate = reply
        return Stamp(_text(epoch), int(offset), duplicate=bool(duplicate))

    def read_command(self, room: str, after: int, limit: int, epoch: str | None) -> list[Any]:
        seq, log = self.keys(room)
        return ["EVALSHA", self.read_sha, 2, seq, log, after, limit, epoch or ""]

    @staticmethod
    def parse_read(reply: Any, after: int) -> Slice:
        epoch_raw, newest, first, raw_entries = reply
        if epoch_raw is None:
            return Slice(None, 0, 1, ())
        epoch = _text(epoch_raw)
        entries = [
            Entry(epoch, int(bytes(entry_id).split(b"-", 1)[0]), bytes(fields[1]))
            for entry_id, fields in raw_entries
        ]
        if after < 0:
            entries.reverse()
        return Slice(epoch, int(newest), int(first), tuple(entries))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
