"""The publishing half of ``RedisBackend``: a bounded outbox and its drain task.

Everything a pod writes to Redis pub/sub goes through one ``Publisher``:
plain publishes (``PUBLISH`` of an envelope), room-log appends (``EVALSHA``
of ``lua/append.lua``, which stamps, stores and publishes at once) and the
pod's own heartbeats. They wait in one bounded outbox, so one pod's messages
keep their order; one task (``run``) drains it, pipelining a batch of commands
at a time on a ``CommandPipe`` (``pipe.py``), one batch in flight at a time
(``_send`` is the only place that publishes). A lost or stalled pipe is
replaced with the next batch, without touching the subscriber.

Publishing never raises and never blocks the sender: a message that cannot be
published has reached local clients anyway (the backend delivers before it
queues), and is counted in ``publish_failures`` and logged once per outage. An
append that cannot be stored is told why (its ``done`` gets ``Unstored.FAILED``
if it never reached Redis, ``Unstored.UNKNOWN`` if the connection went before
the answer came); one that is stored gets its stamp from the script's reply,
which goes to ``on_entry`` (the node) first, then to its ``done``, in outbox order. If
Redis lost its script cache, the scripts are loaded again and what did not
run is run again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from ...core.histogram import ROUNDTRIP_BUCKETS, Histogram
from ...core.protocol import Message, entry_payload
from ...core.sequencer import Entry
from ..base import OnAppended, Stamp, Unstored
from .log import RedisRoomLog
from .pipe import CommandPipe, open_pipe
from .resp import LINK_ERRORS, InFlightLost, RedisAddress, describe, encode_arg, pack_command

__all__ = ["OnEntry", "Publisher", "PublisherCounters"]

log = logging.getLogger("realtime.redis")

OnEntry = Callable[[str, Entry], None]
"""Told ``(room, entry)`` for each new message this pod appended to a room log."""

_HEARTBEAT = b"hb"


@dataclass(slots=True)
class _Append:
    """A room message waiting in the outbox to be stamped and published."""

    message: Message
    channel: bytes
    done: OnAppended
    idempotency_key: str | None
    body: bytes
    """``message.body()``, encoded once for the script and the stamped copy."""


_Outgoing = tuple[bytes, bytes] | _Append


@dataclass(slots=True)
class PublisherCounters:
    published: int = 0
    """messages this pod published to Redis"""
    publish_failures: int = 0
    """messages that reached local members only"""
    appended: int = 0
    """room messages stamped, stored and published by the room log script"""
    append_failures: int = 0
    """room messages that could not be stored (delivered locally, unstamped)"""


class Publisher:
    """Publishes one pod's messages to Redis in order, a pipelined batch at a time."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        pod_id: str,
        client_name: str,
        room_log: RedisRoomLog,
        heartbeat_channel: bytes,
        timeout: float,
        queue: int,
        batch: int,
        on_entry: OnEntry,
        load_scripts: Callable[[], Awaitable[None]],
    ) -> None:
        self._address = address
        self._pod_id = pod_id
        self._client_name = client_name
        self._log = room_log
        self._heartbeat_channel = heartbeat_channel
        self._timeout = timeout
        self._queue = queue
        self._batch = batch
        self.counters = PublisherCounters()
        self.roundtrip = Histogram(ROUNDTRIP_BUCKETS)  # seconds per batch: write to last reply
        self._on_entry = on_entry
        self._load_scripts = load_scripts

        self._outbox: deque[_Outgoing] = deque()
        self._outbox_ready = asyncio.Event()
        self._pipe: CommandPipe | None = None
        self._outage = False

    @property
    def queued(self) -> int:
        """Messages waiting in the outbox."""
        return len(self._outbox)

    def publish(self, channel: bytes, data: bytes) -> None:
        """Queue ``data`` for ``channel``; counted as a failure if the outbox is full."""
        if len(self._outbox) >= self._queue:
            self._publish_failed(1, "the publish queue is full")
            return
        self._push((channel, data))

    def heartbeat(self) -> None:
        """Queue a heartbeat on the pod's own channel, even if the outbox is full."""
        self._push((self._heartbeat_channel, _HEARTBEAT))

    def append(
        self, message: Message, channel: bytes, done: OnAppended, idempotency_key: str | None
    ) -> None:
        """Queue a room message for the room log script; ``done`` gets its stamp."""
        if len(self._outbox) >= self._queue:
            self._publish_failed(1, "the publish queue is full")
            self.counters.append_failures += 1
            done(Unstored.FAILED)
            return
        self._push(_Append(message, channel, done, idempotency_key, message.body()))

    def close(self) -> None:
        """Drop the connection and whatever is still queued (once ``run`` is cancelled)."""
        if self._pipe is not None:
            self._pipe.abort()
            self._pipe = None
        self._outbox.clear()

    def _push(self, item: _Outgoing) -> None:
        self._outbox.append(item)
        if not self._outbox_ready.is_set():
            self._outbox_ready.set()

    async def run(self) -> None:
        """Publish the outbox in order, a pipelined batch at a time, until cancelled."""
        outbox = self._outbox
        task = asyncio.current_task()
        while True:
            if not outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            count = min(len(outbox), self._batch)
            batch = [outbox.popleft() for _ in range(count)]
            await self._send(batch)
            if task is not None and task.cancelling():
                # redis-py (loading scripts) can turn a cancellation into a connection error
                raise asyncio.CancelledError

    async def _open(self) -> CommandPipe:
        pipe = self._pipe
        if pipe is None or not pipe.open:
            pipe = self._pipe = await open_pipe(
                self._address,
                client_name=self._client_name,
                timeout=self._timeout,
            )
        return pipe

    async def _send(self, batch: list[_Outgoing]) -> None:
        """The one place that writes messages to Redis: ``PUBLISH`` and
        ``EVALSHA`` commands in one write, then their replies; each append's
        stamp goes to ``on_entry``, then to its ``done``, in outbox order."""
        replies = await self._replies(batch)
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again:
            # Redis lost its script cache (restart, SCRIPT FLUSH): load the
            # scripts and run again what did not run.
            try:
                await self._load_scripts()
            except LINK_ERRORS as exc:
                retried: list[Any] = [exc] * len(again)
            else:
                retried = await self._replies([batch[i] for i in again])
            for i, reply in zip(again, retried, strict=True):
                replies[i] = reply
        failed = 0
        reason = ""
        for item, reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                reason = describe(reply)
                if isinstance(item, _Append) or item[0] != self._heartbeat_channel:
                    failed += 1
                if isinstance(item, _Append):
                    self.counters.append_failures += 1
                    lost = isinstance(reply, InFlightLost)
                    item.done(Unstored.UNKNOWN if lost else Unstored.FAILED)
                continue
            if not isinstance(item, _Append):
                if item[0] != self._heartbeat_channel:
                    self.counters.published += 1
                continue
            stamp = self._log.parse_append(reply)
            if isinstance(stamp, Stamp) and not stamp.duplicate:
                self.counters.appended += 1
                self.counters.published += 1
                room = item.message.room
                assert room is not None
                payload = entry_payload(item.body, stamp.epoch, stamp.offset)
                self._on_entry(room, Entry(stamp.epoch, stamp.offset, payload))
            item.done(stamp)
        if failed:
            self._publish_failed(failed, reason)
        elif self._outage:
            self._outage = False
            log.info("publishing to redis works again (pod=%s)", self._pod_id)

    async def _replies(self, batch: list[_Outgoing]) -> list[Any]:
        """``_roundtrip``, with a failure of the whole batch in every place."""
        try:
            return await self._roundtrip(batch)
        except LINK_ERRORS as exc:
            return [exc] * len(batch)
        except Exception as exc:  # a bug: count and log it, keep the publisher alive
            log.exception("publishing to redis failed unexpectedly")
            return [exc] * len(batch)

    async def _roundtrip(self, batch: list[_Outgoing]) -> list[Any]:
        """Write every command of ``batch`` at once; read one reply each
        (a refused command's ``ResponseError`` in its place)."""
        commands = []
        for item in batch:
            if isinstance(item, _Append):
                args = self._log.append_command(
                    item.message, item.channel, item.idempotency_key, item.body
                )
                commands.append(pack_command(*(encode_arg(a) for a in args)))
            else:
                commands.append(pack_command(b"PUBLISH", *item))
        pipe = await self._open()
        try:
            async with asyncio.timeout(self._timeout), self.roundtrip.time():
                return await pipe.call(b"".join(commands), len(batch))
        except TimeoutError:
            # Redis stalls: give up on what is in flight (the outcome is
            # unknown) and start afresh with the next batch.
            pipe.abort("no reply in time")
            raise InFlightLost("no reply in time") from None

    def _publish_failed(self, count: int, reason: str) -> None:
        self.counters.publish_failures += count
        if not self._outage:
            self._outage = True
            log.warning(
                "publishing to redis failed (%s); messages reach local clients only "
                "until it recovers (pod=%s)",
                reason,
                self._pod_id,
            )
