"""One primary's link: the connection a pod keeps to one Redis node.

A ``ShardLink`` owns the ``Link`` (``link.py``) to one primary and the
``Publisher`` that drains this pod's outbox onto it. One supervised task
connects it, subscribes every channel wanted on this node in a batch,
publishes the pod's heartbeat on a channel of its own and watches it come
back, and on any failure tears the connection down and reconnects with
capped exponential backoff plus jitter.

A standalone Redis or a Sentinel set has one (the backend replaces it when
Sentinel names another primary); a Cluster has one per primary, each with
the channels whose slots that primary serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ...core.histogram import Histogram
from ...core.sequencer import Entry
from ..base import LinkState
from .link import STALLED, Link, open_link
from .log import RedisRoomLog
from .publisher import Outgoing, Publisher
from .resp import LINK_ERRORS, RedisAddress, describe

__all__ = ["ShardCounters", "ShardLink", "ShardOwner"]

log = logging.getLogger("realtime.redis")


class ShardOwner(Protocol):
    """What a shard link reports to (the backend)."""

    def on_pubsub(self, channel: bytes, data: bytes) -> None:
        """A pub/sub message on one of the pod's channels."""

    def on_subscribed(self, channel: bytes) -> None:
        """Redis confirmed a subscription."""

    def on_dropped(self, channel: bytes, why: str) -> None:
        """Redis refused or dropped a subscription (a Cluster slot moved)."""

    def on_link(self, shard: ShardLink, up: bool) -> None:
        """The link came up, or went down."""

    def on_own_entry(self, room: str, entry: Entry, link: Link | None) -> None:
        """This pod's append, stamped, delivered from the reply (see ``OnEntry``)."""

    async def load_scripts(self, shard: ShardLink) -> None:
        """Load the Lua scripts on this shard's node."""


@dataclass(slots=True)
class ShardCounters:
    reconnects: int = 0
    """subscriptions rebuilt after a loss"""
    connect_failures: int = 0
    heartbeat_timeouts: int = 0


class ShardLink:
    """The pod's link to one primary, kept up for as long as it runs."""

    def __init__(
        self,
        address: RedisAddress,
        owner: ShardOwner,
        *,
        pod_id: str,
        client_name: str,
        heartbeat_channel: bytes,
        room_log: RedisRoomLog,
        sharded: bool,
        primary_only: bool,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        reconnect_min_delay: float,
        reconnect_max_delay: float,
        publish_queue: int,
        publish_batch: int,
        wait_replicas: int = 0,
        wait_timeout: float = 0.0,
        on_redirect: Callable[[list[Outgoing], str], None] | None = None,
        roundtrip: Histogram | None = None,
        flush_delay: float = 0.0,
    ) -> None:
        self.address = address
        self.label = address.label
        self.pod_id = pod_id
        self._owner = owner
        self._client_name = client_name
        self.heartbeat_channel = heartbeat_channel
        self._sharded = sharded
        self._primary_only = primary_only
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._min_delay = reconnect_min_delay
        self._max_delay = reconnect_max_delay

        self.channels: set[bytes] = set()
        """Channels the pod wants on this node (rooms, the global channel);
        the heartbeat channel comes on top."""
        self.state = LinkState.CONNECTING
        self.counters = ShardCounters()
        self.link: Link | None = None
        self.bytes_in = 0
        """Bytes read on the links that are gone (``received_bytes`` adds the current one's)."""
        self.last_heartbeat: float | None = None
        self.down_since: float | None = None
        self.up_since: float | None = None
        self.first_attempt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._up = asyncio.Event()
        self._unreachable = False
        """The last attempt to connect failed: publishing fails at once."""
        self._tasks: list[asyncio.Task[None]] = []
        self.publisher = Publisher(
            self.ready_link,
            pod_id=pod_id,
            room_log=room_log,
            heartbeat_channel=heartbeat_channel,
            timeout=heartbeat_timeout,
            queue=publish_queue,
            batch=publish_batch,
            on_entry=owner.on_own_entry,
            load_scripts=self._load_scripts,
            sharded=sharded,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
            on_redirect=on_redirect,
            roundtrip=roundtrip,
            flush_delay=flush_delay,
        )

    @property
    def where(self) -> str:
        """For log lines: which node, where a pod may have several."""
        return f", node={self.label}"

    @property
    def started(self) -> bool:
        return bool(self._tasks) or self.state is LinkState.STOPPED

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._supervise(), name=f"redis-link-{self.pod_id}-{self.label}"),
            loop.create_task(
                self.publisher.run(), name=f"redis-publisher-{self.pod_id}-{self.label}"
            ),
        ]
        for task in self._tasks:
            task.add_done_callback(_task_done)

    async def stop(self, timeout: float) -> None:
        """Unsubscribe, stop both tasks and close the connection."""
        self.state = LinkState.STOPPED
        link = self.link
        if link is not None and link.open:
            link.unsubscribe()
            link.close()
        for task in self._tasks:
            task.cancel()
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            log.error("redis backend task %s ignored its cancellation", task.get_name())
        self._tasks = []
        if link is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link.closed), 1.0)
            link.abort()
        if not self.first_attempt.done():
            self.first_attempt.set_result(None)

    # -- subscriptions -------------------------------------------------------

    def subscribe(self, channel: bytes) -> None:
        if channel in self.channels:
            return
        self.channels.add(channel)
        if self.link is not None:
            self.link.subscribe((channel,))

    def unsubscribe(self, channel: bytes) -> None:
        if channel not in self.channels:
            return
        self.channels.discard(channel)
        if self.link is not None:
            self.link.unsubscribe((channel,))

    @property
    def received_bytes(self) -> int:
        """Bytes read from this primary, over every connection to it."""
        return self.bytes_in + (0 if self.link is None else self.link.bytes_in)

    @property
    def subscribed(self) -> int:
        """Channels Redis has confirmed on this link, the heartbeat's included."""
        return 0 if self.link is None else len(self.link.channels)

    # -- the link ------------------------------------------------------------

    async def ready_link(self) -> Link | None:
        """The link, once it is up: at once if it is; while it reconnects
        after a loss, waiting for it (at most the heartbeat timeout), so a
        blip costs a delay and not the message; None while Redis cannot be
        reached."""
        link = self.link
        if link is not None and link.open:
            return link
        if self._unreachable or self.state is LinkState.STOPPED:
            return None
        if link is not None:  # gone; the supervisor will notice in a moment
            self._up.clear()
        # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a
        # cancellation that comes as the link comes up (a room's read that
        # another has replaced would carry on).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._heartbeat_timeout):
                await self._up.wait()
        link = self.link
        return link if link is not None and link.open else None

    async def _load_scripts(self) -> None:
        await self._owner.load_scripts(self)

    async def _supervise(self) -> None:
        """Keep the link connected for as long as the shard runs."""
        attempt = 0
        while True:
            try:
                link = await open_link(
                    self.address,
                    self._owner.on_pubsub,
                    on_subscribe=self._owner.on_subscribed,
                    on_dropped=self._owner.on_dropped,
                    client_name=self._client_name,
                    timeout=self._heartbeat_timeout,
                    sharded=self._sharded,
                    primary_only=self._primary_only,
                )
            except LINK_ERRORS as exc:
                self._connect_failed(exc, attempt)
                await self._backoff(attempt)
                attempt += 1
                continue
            connected_at = time.monotonic()
            # From here on subscribe() and unsubscribe() write to this link;
            # what is wanted now is subscribed in one go.
            self.link = link
            link.subscribe([self.heartbeat_channel, *self.channels])
            try:
                self._connected()
                reason = await self._watch(link)
            except Exception as exc:  # a bug: log it, rebuild the link, keep serving
                log.exception("redis link failed unexpectedly")
                reason = describe(exc)
            finally:
                self.bytes_in += link.bytes_in
                self.link = None
                if link.open:  # not already closing gracefully (stop)
                    link.abort()
            self._lost(reason)
            if time.monotonic() - connected_at > self._heartbeat_timeout:
                attempt = 0  # it worked for a while: try again at once
            else:  # a link that drops as soon as it is up: do not hammer Redis
                await self._backoff(attempt)
                attempt += 1

    async def _backoff(self, attempt: int) -> None:
        """Exponential backoff capped at the maximum, with jitter (half to full delay)."""
        delay = min(self._max_delay, self._min_delay * 2**attempt)
        await asyncio.sleep(random.uniform(delay / 2, delay))

    async def _watch(self, link: Link) -> str:
        """Publish heartbeats to this pod's own channel until the connection
        closes or a heartbeat fails to come back in time; return why it ended."""
        self.last_heartbeat = time.monotonic()
        while True:
            self.publisher.heartbeat()
            await asyncio.wait({link.closed}, timeout=self._heartbeat_interval)
            if link.closed.done():
                if link.lost_reason is STALLED:  # a reply did not come back in time
                    self.counters.heartbeat_timeouts += 1
                return link.lost_reason
            age = time.monotonic() - (self.last_heartbeat or 0.0)
            if age > self._heartbeat_timeout:
                self.counters.heartbeat_timeouts += 1
                return f"no heartbeat came back for {age:.1f}s: {STALLED}"

    def heard_heartbeat(self) -> None:
        self.last_heartbeat = time.monotonic()

    def _connected(self) -> None:
        self._unreachable = False
        self._up.set()
        if not self.first_attempt.done():
            self.first_attempt.set_result(None)
        first = self.state is LinkState.CONNECTING
        self.state = LinkState.CONNECTED
        self.up_since = time.time()
        if not first:
            self.counters.reconnects += 1
        self._owner.on_link(self, True)

    def _lost(self, reason: str) -> None:
        self._up.clear()
        self.state = LinkState.RECONNECTING
        self.down_since = time.monotonic()
        self._owner.on_link(self, False)
        log.warning(
            "redis link lost (%s); serving local clients only, reconnecting (pod=%s%s)",
            reason,
            self.pod_id,
            self.where,
        )

    def _connect_failed(self, exc: BaseException, attempt: int) -> None:
        self._unreachable = True
        self.counters.connect_failures += 1
        if not self.first_attempt.done():
            self.first_attempt.set_result(None)
        if self.down_since is None:
            self.down_since = time.monotonic()
        if attempt == 0:
            log.warning(
                "redis unreachable (%s); serving local clients only, "
                "reconnecting with backoff up to %.1fs (pod=%s%s)",
                describe(exc),
                self._max_delay,
                self.pod_id,
                self.where,
            )
        else:
            log.debug("redis reconnect attempt %d failed: %s", attempt + 1, describe(exc))


def _task_done(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("redis backend task %s crashed", task.get_name(), exc_info=exc)
