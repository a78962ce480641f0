"""The publishing half of ``RedisBackend``: a bounded outbox and its drain task.

Everything a pod writes to Redis pub/sub goes through one ``Publisher``:
plain publishes (``PUBLISH`` of an envelope), room-log appends (one
``EVALSHA`` of ``lua/append.lua`` for every append of a batch, which stamps,
stores and publishes each at once; or, for a room whose last append on this
connection went through the script, a plain ``XADD`` that stamps and stores
it, its ``PUBLISH`` written as soon as the reply gives the offset: half
Redis's work) and the pod's own heartbeats. They wait in
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
A script's own copy of a room message comes back as a push on the same
link, ahead of the reply, and is delivered from there, like every pod's; for
a room whose subscription is not confirmed (no push will come), and for a
plain append (its push comes only after its ``PUBLISH``, a round trip
later), the reply goes to ``on_entry``. Then ``done``, in outbox order: the
sender's copy and its ack are written together. If Redis lost its script
cache, the scripts are loaded again and what did not run is run again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import NoScriptError, ResponseError

from ...core.connection import holding_writes
from ...core.histogram import ROUNDTRIP_BUCKETS, Histogram
from ...core.protocol import Message, entry_payload
from ...core.sequencer import Entry
from ..base import OnAppended, Stamp, Unstored
from .link import STALLED, Link
from .log import RedisRoomLog
from .resp import LINK_ERRORS, InFlightLost, describe, pack_command
from .scripts import PLAIN_TAIL

__all__ = ["OnEntry", "Outgoing", "Publisher", "PublisherCounters", "is_redirect"]

log = logging.getLogger("realtime.redis")

OnEntry = Callable[[str, Entry, Link | None], None]
"""Told ``(room, entry, link)`` for each new message this pod appended to a
room log and delivers from the reply; ``link`` is the connection a plain
append's reply came on (Redis there is known to have the entry), else None."""

_HEARTBEAT = b"hb"
SETTLE_TRIES = 3
"""Links an append whose connection went is looked up on (``_settle``)
before its outcome is given up as unknown."""


@dataclass(slots=True)
class _Append:
    """A room message waiting in the outbox to be stamped and published."""

    message: Message
    channel: bytes
    done: OnAppended
    idempotency_key: str | None
    body: bytes
    """``message.body()``, encoded once for the script and the stamped copy."""
    slot: int = 0
    """The Cluster slot of the room's keys (0 elsewhere)."""
    seen: tuple[str, int] | None = None
    """The newest entry of the room the pod had seen when it was queued,
    ``(epoch, offset)`` (None if none): the script appends in that epoch and
    checks Redis is not behind it."""
    seen_on: Link | None = None
    """The link whose push brought ``seen``, if one did: that Redis is not
    behind it."""
    queued_at: float = 0.0
    """When it was first queued (a Cluster may send it back: see ``requeue``)."""
    plain: bool = False
    """Sent (this time) as a plain ``XADD``, its ``PUBLISH`` to follow once
    the offset is known, instead of through the script (see ``_plainly``)."""


Outgoing = tuple[bytes, bytes] | _Append
_Result = list[Stamp | Unstored] | BaseException
"""One script call's outcomes, or why there are none."""

_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "LOADING", "MASTERDOWN")


def _unreplicated(outcome: Stamp | Unstored) -> Stamp | Unstored:
    if isinstance(outcome, Stamp):
        return Stamp(outcome.epoch, outcome.offset, outcome.duplicate, replicated=False)
    return outcome


def is_redirect(error: BaseException) -> bool:
    """An error reply that says "not here, not now": the command did not run;
    the backend finds where it goes and sends it again."""
    return isinstance(error, ResponseError) and str(error).startswith(_REDIRECTS)


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
    unreplicated: int = 0
    """room messages stored on the primary that no replica confirmed in time"""
    redirected: int = 0
    """messages a Cluster node sent elsewhere (``MOVED``, ``ASK``, …) and sent again"""
    resent: int = 0
    """room messages in flight when a connection went, found not stored and
    sent again, or stored and their ``PUBLISH`` lost with it and published again"""
    plain_appends: int = 0
    """room messages appended with a plain ``XADD`` (then ``PUBLISH``), not the script"""
    batches: int = 0
    """batches written (each one write, one script call per slot for its appends)"""
    flush_waits: int = 0
    """batches that waited ``flush_delay`` for more to join them"""


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
        on_redirect: Callable[[list[Outgoing], str], None] | None = None,
        sharded: bool = False,
        wait_replicas: int = 0,
        wait_timeout: float = 0.0,
        roundtrip: Histogram | None = None,
        flush_delay: float = 0.0,
    ) -> None:
        self._link = link
        """The pod's link to Redis (waiting, briefly, while it reconnects),
        or None while Redis cannot be reached."""
        self._pod_id = pod_id
        self._envelope = room_log.names.replied_envelope
        """The head of the late ``PUBLISH``es (delivered here from the reply)."""
        self._log = room_log
        self._heartbeat_channel = heartbeat_channel
        self._timeout = timeout
        self._queue = queue
        self._batch = batch
        self.counters = PublisherCounters()
        self.roundtrip = roundtrip or Histogram(ROUNDTRIP_BUCKETS)
        """Seconds per batch: its write to its last reply."""
        self._on_entry = on_entry
        self._load_scripts = load_scripts
        self._sharded = sharded
        self._publish_command = b"SPUBLISH" if sharded else b"PUBLISH"
        self._wait_replicas = wait_replicas
        self._wait = pack_command(b"WAIT", wait_replicas, max(1, int(wait_timeout * 1000)))
        self._on_redirect = on_redirect or self._redirect_failed

        self._outbox: deque[Outgoing] = deque()
        self._written = False
        """The batch being sent has been written (its outcome is Redis's)."""
        self._outbox_ready = asyncio.Event()
        self._outage = False
        self._flush_delay = flush_delay
        self._last_write = float("-inf")
        """When the last batch was taken out (loop time)."""
        self._verified: set[bytes] = set()
        """Room channels whose last append went through the script on
        ``_verified_link``: that script checked Redis was not behind what
        the pod had seen, so, on that same connection (one Redis process,
        which cannot lose writes without dropping it), the room's next
        appends may be plain ``XADD``s."""
        self._verified_link: Link | None = None

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
        self,
        message: Message,
        channel: bytes,
        done: OnAppended,
        idempotency_key: str | None,
        slot: int = 0,
        seen: tuple[str, int] | None = None,
        seen_on: Link | None = None,
    ) -> None:
        """Queue a room message for the room log script; ``done`` gets its stamp."""
        if len(self._outbox) >= self._queue:
            self._publish_failed(1, "the publish queue is full")
            self.counters.append_failures += 1
            done(Unstored.FAILED)
            return
        item = _Append(message, channel, done, idempotency_key, message.body(), slot, seen, seen_on)
        item.queued_at = time.monotonic()
        self._push(item)

    def requeue(self, items: list[Outgoing]) -> None:
        """Queue again, ahead of everything, what a Cluster node sent back
        (they go before anything queued later for the same room)."""
        self.counters.redirected += len(items)
        self._outbox.extendleft(reversed(items))
        if items and not self._outbox_ready.is_set():
            self._outbox_ready.set()

    def take(self) -> list[Outgoing]:
        """Everything queued, taken out (a shard that is gone hands it over)."""
        items = list(self._outbox)
        self._outbox.clear()
        return [i for i in items if not (isinstance(i, tuple) and i[0] == self._heartbeat_channel)]

    def fail(self, items: list[Outgoing], reason: str) -> None:
        """Give up on ``items``: count them, tell each append."""
        appends = [i for i in items if isinstance(i, _Append)]
        self.counters.append_failures += len(appends)
        for item in appends:
            item.done(Unstored.FAILED)
        if items:
            self._publish_failed(len(items), reason)

    def _redirect_failed(self, items: list[Outgoing], reason: str) -> None:
        self.fail(items, reason)

    def _interrupted(self, batch: list[Outgoing]) -> None:
        """``run`` was cancelled in the middle of ``batch``: what was not
        written yet goes back to the outbox (for ``take``); what was is
        unknown."""
        if not self._written:
            self._outbox.extendleft(reversed(batch))
            return
        for item in batch:
            if isinstance(item, _Append):
                self.counters.append_failures += 1
                item.done(Unstored.UNKNOWN)

    def close(self) -> None:
        """Drop whatever is still queued (once ``run`` is cancelled): each
        append is told it was not stored."""
        items = list(self._outbox)
        self._outbox.clear()
        for item in items:
            if isinstance(item, _Append):
                item.done(Unstored.FAILED)

    def _push(self, item: Outgoing) -> None:
        self._outbox.append(item)
        if not self._outbox_ready.is_set():
            self._outbox_ready.set()

    async def run(self) -> None:
        """Publish the outbox in order, a pipelined batch at a time, until cancelled."""
        outbox = self._outbox
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        delay = self._flush_delay
        while True:
            if not outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                if delay > 0 and loop.time() - self._last_write < delay:
                    # Idle, but traffic is dense (the last write was less than
                    # the delay ago): let what comes next join this batch (one script
                    # call, one write, one reply for all of it). Sparse
                    # traffic does not wait (nothing would join).
                    self.counters.flush_waits += 1
                    await asyncio.sleep(delay)
            elif delay > 0 and len(outbox) < self._batch:
                # What queued while a batch was in flight: it goes once the
                # delay has passed since that batch's write (more may join
                # it meanwhile), not at once with its reply; a full batch
                # goes at once.
                wait = self._last_write + delay - loop.time()
                if wait > 0:
                    self.counters.flush_waits += 1
                    await asyncio.sleep(wait)
            count = min(len(outbox), self._batch)
            batch = [outbox.popleft() for _ in range(count)]
            self._last_write = loop.time()
            self.counters.batches += 1
            self._written = False
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                self._interrupted(batch)
                raise
            if task is not None and task.cancelling():
                # redis-py (loading scripts) can turn a cancellation into a connection error
                raise asyncio.CancelledError

    async def _send(self, batch: list[Outgoing]) -> None:
        """The one place that writes messages to Redis: the batch's appends
        (in one ``EVALSHA``, one per slot on a Cluster; the rooms verified on
        this connection as plain ``XADD``s) and its publishes, in one write,
        then their replies and the plain appends' ``PUBLISH``es; each
        append's outcome goes to its ``done``, in outbox order."""
        appends = [item for item in batch if isinstance(item, _Append)]
        publishes = [item for item in batch if not isinstance(item, _Append)]
        link = await self._link()
        plain = self._plainly(appends, link)
        groups = self._groups([item for item in appends if not item.plain] if plain else appends)
        link, results, added, published = await self._scripted(link, groups, plain, publishes)
        outcomes: dict[int, Stamp | Unstored | BaseException] = {}
        behind = self._behind(plain, added)
        redo: list[_Append] = []
        for item, reply in zip(plain, added, strict=True):
            if isinstance(reply, BaseException):
                outcomes[id(item)] = reply
            elif reply is None or item.channel in behind:
                # no stream of that epoch, or Redis behind the pod: the
                # script finds the room's epoch, or moves it to a new one
                item.plain = False
                redo.append(item)
            else:
                assert item.seen is not None  # only a room seen is appended plainly
                outcomes[id(item)] = Stamp(item.seen[0], int(reply[2:]))
        if redo:
            more = self._groups(redo)
            link, again, _, _ = await self._scripted(await self._link(), more, [], [])
            groups, results = groups + more, results + again
        failed = 0
        reason = ""
        bounced: list[Outgoing] = []
        for sent, reply in zip(publishes, published, strict=True):
            channel = sent[0]
            if isinstance(reply, BaseException):
                if channel == self._heartbeat_channel:
                    continue
                if is_redirect(reply):
                    bounced.append(sent)
                    continue
                reason = describe(reply)
                failed += 1
            elif channel != self._heartbeat_channel:
                self.counters.published += 1
        # each append's outcome, then every ``done`` in outbox order
        verified = self._verified if link is not None and link is self._verified_link else None
        for group, result in zip(groups, results, strict=True):
            for index, item in enumerate(group):
                outcome = result if isinstance(result, BaseException) else result[index]
                outcomes[id(item)] = outcome
                if verified is not None and isinstance(outcome, Stamp) and not outcome.duplicate:
                    verified.add(item.channel)  # the script checked the offset
        lost = [item for item in appends if isinstance(outcomes[id(item)], InFlightLost)]
        unstored: list[_Append] = []
        if lost:  # the link went with them: were they stored? ask the history
            found, unstored = await self._settle(lost)
            outcomes.update(found)
        resend = {id(item) for item in unstored}
        stamped: list[tuple[_Append, Stamp | Unstored]] = []
        for item in appends:
            outcome = outcomes[id(item)]
            if id(item) in resend:
                continue  # not stored: sent again, first of the outbox
            if not isinstance(outcome, BaseException):
                stamped.append((item, outcome))
                continue
            if stamped:
                self._appended(stamped, link)
                stamped = []
            reason = describe(outcome)
            if is_redirect(outcome):
                bounced.append(item)
                continue
            failed += 1
            self.counters.append_failures += 1
            item.done(Unstored.UNKNOWN if isinstance(outcome, InFlightLost) else Unstored.FAILED)
        if stamped:
            self._appended(stamped, link)
        if unstored:
            self.counters.resent += len(unstored)
            self._outbox.extendleft(reversed(unstored))
        if bounced:
            self._on_redirect(bounced, reason)
        if failed:
            self._publish_failed(failed, reason)
        elif self._outage and not bounced:
            self._outage = False
            log.info("publishing to redis works again (pod=%s)", self._pod_id)

    async def _scripted(
        self,
        link: Link | None,
        groups: list[list[_Append]],
        plain: list[_Append],
        publishes: list[tuple[bytes, bytes]],
    ) -> tuple[Link | None, list[_Result], list[Any], list[Any]]:
        """``_replies``, and once more for the script calls Redis refused
        because it lost its script cache (restart, ``SCRIPT FLUSH``, a
        promoted replica): the scripts are loaded and what did not run is run
        again. Returns the link last used with ``_replies``'s outcomes."""
        results, added, published = await self._replies(link, groups, plain, publishes)
        if any(isinstance(r, NoScriptError) for r in results):
            redo = [g for g, r in zip(groups, results, strict=True) if isinstance(r, NoScriptError)]
            try:
                await self._load_scripts()
            except LINK_ERRORS as exc:
                again: list[_Result] = [exc] * len(redo)
            else:
                link = await self._link()
                again, _, _ = await self._replies(link, redo, [], [])
            it = iter(again)
            results = [next(it) if isinstance(r, NoScriptError) else r for r in results]
        return link, results, added, published

    def _plainly(self, appends: list[_Append], link: Link | None) -> list[_Append]:
        """The appends of a batch that go as plain ``XADD``s, not through the
        script (it costs Redis about twice as much): those of rooms this
        connection's Redis is known not to be behind on (the room's last
        append on it went through the script, which checked: ``_verified``;
        or the newest offset the pod saw came in a push on it: ``seen_on``),
        that this pod is subscribed to (its presence in the room is what lets
        another pod publish the room's tail should this one die before its
        ``PUBLISH``, and the push is what delivers here), with no key and no
        body big enough to trim the history by bytes (a TTL refresh due goes
        along as two ``PEXPIRE``s), at
        most ``PLAIN_TAIL`` of them (what the presence refresh publishes again
        if this pod dies before their ``PUBLISH``). A room with any other
        append in the batch goes through the script whole, so its appends
        keep their order. Never on a Cluster or with
        replicas awaited (there the script does it all)."""
        for item in appends:
            item.plain = False
        if not appends or self._sharded or self._wait_replicas or link is None or not link.open:
            return []
        if link is not self._verified_link:
            self._verified_link, self._verified = link, set()
        subscribed = link.channels
        if len(self._verified) > 2 * len(subscribed) + 1024:
            self._verified &= subscribed
        verified = self._verified
        refused: set[bytes] = set()
        per_room: dict[bytes, int] = {}
        for item in appends:
            room = item.message.room
            assert room is not None  # only room messages are appended
            count = per_room[item.channel] = per_room.get(item.channel, 0) + 1
            if not (
                count <= PLAIN_TAIL
                and item.idempotency_key is None
                and item.seen is not None
                and (item.channel in verified or item.seen_on is link)
                and item.channel in subscribed
                and self._log.plain(item.body)
            ):
                refused.add(item.channel)
        plain = [item for item in appends if item.channel not in refused]
        for item in plain:
            item.plain = True
        self.counters.plain_appends += len(plain)
        return plain

    def _behind(self, plain: list[_Append], added: list[Any]) -> set[bytes]:
        """The rooms where a plain ``XADD`` gave an offset at or below what
        the pod had seen. Cannot happen on a verified connection (Redis
        would have lost writes without dropping it), but if it does, the
        room's appends of the batch go through the script, which finds the
        room behind (the entry just stored at ``seen`` included: then behind
        one past it), moves it to a new epoch and deletes the history that
        holds the ones just stored; and every room is verified again."""
        behind: set[bytes] = set()
        for item, reply in zip(plain, added, strict=True):
            if not isinstance(reply, bytes) or item.seen is None:
                continue
            epoch, seen = item.seen
            offset = int(reply[2:])
            if offset <= seen:
                log.error(
                    "redis is behind this pod in room %r (offset %d, seen %d); "
                    "appending through the script (pod=%s)",
                    item.message.room,
                    offset,
                    seen,
                    self._pod_id,
                )
                behind.add(item.channel)
                item.seen = (epoch, seen + (offset == seen))
        if behind:
            self._verified.clear()
        return behind

    async def _settle(self, lost: list[_Append]) -> tuple[dict[int, Stamp], list[_Append]]:
        """The connection went with ``lost`` in flight. Once a link is up
        (the next one, if that goes too: ``_read_back``), read each room's
        history after what the pod had seen: a message found there (by its
        id) was stored, and gets its stamp; one the history shows was not
        stored is sent again; any other stays unknown."""
        found: dict[int, Stamp] = {}
        again: list[_Append] = []
        rooms: dict[str, list[_Append]] = {}
        for item in lost:
            assert item.message.room is not None  # only room messages are appended
            rooms.setdefault(item.message.room, []).append(item)
        limit = self._log.history_length
        reads: list[tuple[list[_Append], int, str]] = []
        commands = []
        for room, items in rooms.items():
            epoch, after = items[0].seen or ("", -1)
            reads.append((items, after, epoch))
            commands.append(self._log.read_command(room, after, limit, epoch or None))
        replies = await self._read_back(b"".join(commands), len(commands))
        if replies is None:
            return found, again
        for (items, after, epoch), reply in zip(reads, replies, strict=True):
            if isinstance(reply, BaseException):
                continue
            got = self._log.parse_read(reply, after)
            # Everything the room stored since then is in this read: the
            # same epoch, history kept from there, fewer than the limit.
            whole = (
                after >= 0
                and got.epoch == epoch
                and got.first <= after + 1
                and len(got.entries) < limit
            )
            for item in items:
                marker = b'"id":' + orjson.dumps(item.message.id)
                entry = next((e for e in got.entries if marker in e.payload), None)
                if entry is not None:
                    stamp = Stamp(entry.epoch, entry.offset, replicated=not self._wait_replicas)
                    found[id(item)] = stamp
                elif whole:
                    again.append(item)
        return found, again

    async def _read_back(self, commands: bytes, count: int) -> list[Any] | None:
        """``_settle``'s reads, on the link once it is up; on the next one
        if that goes too (a second fault right after the first), up to
        ``SETTLE_TRIES`` links. None if Redis cannot be reached."""
        for _ in range(SETTLE_TRIES):
            link = await self._link()
            if link is None or not link.open:
                return None
            try:
                async with asyncio.timeout(self._timeout):
                    return await link.call(commands, count)
            except TimeoutError:
                link.abort(STALLED)
            except LINK_ERRORS:
                pass
        return None

    def _groups(self, appends: list[_Append]) -> list[list[_Append]]:
        """The appends of a batch by script call: all in one, or, on a
        Cluster, one per slot (a script's keys must share one), in order."""
        if not appends:
            return []
        if not self._sharded:
            return [appends]
        by_slot: dict[int, list[_Append]] = {}
        for item in appends:
            by_slot.setdefault(item.slot, []).append(item)
        return list(by_slot.values())

    def _appended(self, stamped: list[tuple[_Append, Stamp | Unstored]], link: Link | None) -> None:
        with holding_writes:  # a sender's own message and its ack: one write
            self._stamped(stamped, link)

    def _stamped(self, stamped: list[tuple[_Append, Stamp | Unstored]], link: Link | None) -> None:
        pushed = link.channels if link is not None and not self._wait_replicas else set()
        late: list[tuple[bytes, bytes]] = []
        for item, outcome in stamped:
            if isinstance(outcome, Stamp) and not outcome.duplicate:
                self.counters.appended += 1
                self.counters.published += 1
                if self._wait_replicas or item.plain:
                    # published now: the replicas have it, or the plain
                    # append has its offset
                    envelope = b"%s%d:%s\n%s" % (
                        self._envelope,
                        outcome.offset,
                        outcome.epoch.encode(),
                        item.body,
                    )
                    late.append((item.channel, envelope))
                if item.plain or item.channel not in pushed:
                    # Deliver from here: no push brings it, or (a plain
                    # append) its push comes a round trip later, and the
                    # sender's copy and ack go in one write now (this pod
                    # skips that push unread: ``replied_envelope``).
                    room = item.message.room
                    assert room is not None  # only room messages are appended
                    payload = entry_payload(item.body, outcome.epoch, outcome.offset)
                    entry = Entry(outcome.epoch, outcome.offset, payload)
                    self._on_entry(room, entry, link if item.plain else None)
            if isinstance(outcome, Stamp) and not outcome.replicated:
                self.counters.unreplicated += 1
            item.done(outcome)
        if late:
            self._publish_late(link, late)

    def _publish_late(self, link: Link | None, items: list[tuple[bytes, bytes]]) -> None:
        """Publish stored messages, not awaited (the next batch goes
        meanwhile). If the connection goes before Redis answers, they are
        queued again, first of the outbox: published twice is harmless
        (pods drop an offset they have), lost is not (a quiet room would not
        see them until the next message). If this pod dies first, the pod
        that prunes it from the room's presence publishes the room's tail."""
        commands = b"".join(pack_command(self._publish_command, *item) for item in items)
        if link is None:
            future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            future.set_exception(ConnectionError("the link to Redis is down"))
        else:
            future = link.call(commands, len(items))

        def settled(future: asyncio.Future[list[Any]]) -> None:
            if future.cancelled() or future.exception() is None:
                return
            self.counters.resent += len(items)
            self._outbox.extendleft(reversed(items))
            if not self._outbox_ready.is_set():
                self._outbox_ready.set()

        future.add_done_callback(settled)

    async def _replies(
        self,
        link: Link | None,
        groups: list[list[_Append]],
        plain: list[_Append],
        publishes: list[tuple[bytes, bytes]],
    ) -> tuple[list[_Result], list[Any], list[Any]]:
        """``_roundtrip``, with a failure of the whole batch in every place:
        each script call's outcomes (or why there are none), each plain
        append's reply and each publish's reply."""
        now = time.monotonic()
        xadds = [
            self._log.xadd_commands(
                item.message.room or "", (item.seen or ("", 0))[0], item.body, now
            )
            for item in plain
        ]
        try:
            replies = await self._roundtrip(link, groups, xadds, publishes)
        except Exception as exc:
            if not isinstance(exc, LINK_ERRORS):  # a bug: log it, keep the publisher alive
                log.exception("publishing to redis failed unexpectedly")
            self._log.forget_refreshes()  # whether they ran is not known
            return [exc] * len(groups), [exc] * len(plain), [exc] * len(publishes)
        count = len(groups)
        waited = count > 0 and self._wait_replicas > 0
        results: list[_Result] = [
            reply if isinstance(reply, BaseException) else self._log.parse_append(reply)
            for reply in replies[:count]
        ]
        if waited:
            acks = replies[count]
            if isinstance(acks, BaseException) or int(acks) < self._wait_replicas:
                # Stored on the primary, but not (yet) on enough replicas (a
                # primary without one, after a failover): delivered all the
                # same, its sender told that a failover may lose it.
                results = [
                    r if isinstance(r, BaseException) else [_unreplicated(o) for o in r]
                    for r in results
                ]
        start = count + waited
        added = []
        for commands in xadds:  # an XADD's reply (and any PEXPIRE's, skipped)
            added.append(replies[start])
            start += len(commands)
        return results, added, replies[start:]

    async def _roundtrip(
        self,
        link: Link | None,
        groups: list[list[_Append]],
        xadds: list[list[bytes]],
        publishes: list[tuple[bytes, bytes]],
    ) -> list[Any]:
        """Write the batch at once; read one reply per command (a refused
        command's ``ResponseError`` in its place)."""
        commands = [
            self._log.append_command(
                [(a.message, a.idempotency_key, a.body, a.seen) for a in group]
            )
            for group in groups
        ]
        if groups and self._wait_replicas > 0:
            commands.append(self._wait)
        for xadd in xadds:
            commands += xadd
        publish = self._publish_command
        commands += [pack_command(publish, *item) for item in publishes]
        if link is None or not link.open:
            raise ConnectionError("the link to Redis is down")
        self._written = True
        # If Redis stalls, give up on what is in flight (the outcome is
        # unknown: the call fails with InFlightLost); the backend rebuilds
        # the link. (A timer, not asyncio.timeout: this is once a batch, and
        # the task-cancelling kind costs several times as much.)
        loop = asyncio.get_running_loop()
        stall = loop.call_at(loop.time() + self._timeout, link.abort, STALLED)
        start = time.perf_counter()
        try:
            replies = await link.call(b"".join(commands), len(commands))
        finally:
            stall.cancel()
        self.roundtrip.observe(time.perf_counter() - start)
        return replies

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
