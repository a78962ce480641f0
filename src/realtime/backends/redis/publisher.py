"""The publishing half of ``RedisBackend``: a bounded outbox and its drain task.

Everything a pod writes to Redis pub/sub goes through one ``Publisher``:
plain publishes (``PUBLISH`` of an envelope), room-log appends (one
``EVALSHA`` of ``lua/append.lua`` for every append of a batch, which stamps,
stores and publishes each at once) and the pod's own heartbeats. They wait in
one bounded outbox, so one pod's messages keep their order; one task
(``run``) drains it, writing a batch at a time on the pod's ``Link``
(``link.py``), one batch in flight at a time (``_send`` is the only place
that publishes). When the link is down, a batch fails at once; when Redis
stalls, the link is dropped (the backend rebuilds it).

Publishing never raises and never blocks the sender: a message that cannot be
published has reached local clients anyway (the backend delivers before it
queues), and is counted in ``publish_failures`` and logged once per outage. An
append that cannot be stored is told why (its ``done`` gets ``Unstored.FAILED``
if it never reached Redis, ``Unstored.UNKNOWN`` if the connection went before
the answer came); one that is stored gets its stamp from the script's reply.
The pod's own copy of a room message comes back as a push on the same link,
ahead of the reply, and is delivered from there, like every pod's; only for a
room whose subscription is not confirmed (no push will come) does the reply
go to ``on_entry``. Then ``done``, in outbox order. If Redis lost its script
cache, the scripts are loaded again and what did not run is run again.
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
from .link import STALLED, Link
from .log import RedisRoomLog
from .resp import LINK_ERRORS, InFlightLost, describe, pack_command

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
        link: Callable[[], Awaitable[Link | None]],
        *,
        pod_id: str,
        room_log: RedisRoomLog,
        heartbeat_channel: bytes,
        timeout: float,
        queue: int,
        batch: int,
        on_entry: OnEntry,
        load_scripts: Callable[[], Awaitable[None]],
    ) -> None:
        self._link = link
        """The pod's link to Redis (waiting, briefly, while it reconnects),
        or None while Redis cannot be reached."""
        self._pod_id = pod_id
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
        """Drop whatever is still queued (once ``run`` is cancelled)."""
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

    async def _send(self, batch: list[_Outgoing]) -> None:
        """The one place that writes messages to Redis: the batch's appends
        in one ``EVALSHA`` and its publishes, in one write, then their
        replies; each append's outcome goes to its ``done``, in outbox order."""
        appends = [item for item in batch if isinstance(item, _Append)]
        publishes = [item for item in batch if not isinstance(item, _Append)]
        link, outcomes, published = await self._replies(appends, publishes)
        if isinstance(outcomes, NoScriptError):
            # Redis lost its script cache (restart, SCRIPT FLUSH): load the
            # scripts and append again (the script did not run).
            try:
                await self._load_scripts()
            except LINK_ERRORS as exc:
                outcomes = exc
            else:
                link, outcomes, _ = await self._replies(appends, [])
        failed = 0
        reason = ""
        for (channel, _), reply in zip(publishes, published, strict=True):
            if isinstance(reply, BaseException):
                reason = describe(reply)
                failed += channel != self._heartbeat_channel
            elif channel != self._heartbeat_channel:
                self.counters.published += 1
        if isinstance(outcomes, BaseException):
            if appends:
                reason = describe(outcomes)
                failed += len(appends)
                self.counters.append_failures += len(appends)
                lost = Unstored.UNKNOWN if isinstance(outcomes, InFlightLost) else Unstored.FAILED
                for append in appends:
                    append.done(lost)
        else:
            self._appended(appends, outcomes, link)
        if failed:
            self._publish_failed(failed, reason)
        elif self._outage:
            self._outage = False
            log.info("publishing to redis works again (pod=%s)", self._pod_id)

    def _appended(
        self, appends: list[_Append], outcomes: list[Stamp | Unstored], link: Link | None
    ) -> None:
        pushed = link.channels if link is not None else set()
        for item, outcome in zip(appends, outcomes, strict=True):
            if isinstance(outcome, Stamp) and not outcome.duplicate:
                self.counters.appended += 1
                self.counters.published += 1
                if item.channel not in pushed:  # no push brings it: deliver from here
                    room = item.message.room
                    assert room is not None  # only room messages are appended
                    payload = entry_payload(item.body, outcome.epoch, outcome.offset)
                    self._on_entry(room, Entry(outcome.epoch, outcome.offset, payload))
            item.done(outcome)

    async def _replies(
        self, appends: list[_Append], publishes: list[tuple[bytes, bytes]]
    ) -> tuple[Link | None, list[Stamp | Unstored] | BaseException, list[Any]]:
        """``_roundtrip``, with a failure of the whole batch in every place:
        the link used, the appends' outcomes (or why there are none) and each
        publish's reply."""
        link = await self._link()
        try:
            replies = await self._roundtrip(link, appends, publishes)
        except LINK_ERRORS as exc:
            return link, exc, [exc] * len(publishes)
        except Exception as exc:  # a bug: count and log it, keep the publisher alive
            log.exception("publishing to redis failed unexpectedly")
            return link, exc, [exc] * len(publishes)
        if not appends:
            return link, [], replies
        reply, published = replies[0], replies[1:]
        if isinstance(reply, BaseException):
            return link, reply, published
        return link, self._log.parse_append(reply), published

    async def _roundtrip(
        self, link: Link | None, appends: list[_Append], publishes: list[tuple[bytes, bytes]]
    ) -> list[Any]:
        """Write the batch at once; read one reply per command (a refused
        command's ``ResponseError`` in its place)."""
        commands = []
        if appends:
            commands.append(
                self._log.append_command([(a.message, a.idempotency_key, a.body) for a in appends])
            )
        commands += [pack_command(b"PUBLISH", *item) for item in publishes]
        if link is None or not link.open:
            raise ConnectionError("the link to Redis is down")
        try:
            async with asyncio.timeout(self._timeout), self.roundtrip.time():
                return await link.call(b"".join(commands), len(commands))
        except TimeoutError:
            # Redis stalls: give up on what is in flight (the outcome is
            # unknown); the backend rebuilds the link.
            link.abort(STALLED)
            raise InFlightLost(STALLED) from None

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
