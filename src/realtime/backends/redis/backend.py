"""RedisBackend: the pods of one deployment linked through one Redis.

Every name it uses (channels, keys, the envelope) is built in ``names.py``. A
pod subscribes to a room's channel only while it hosts the room (the node
calls ``subscribe`` on the first local member and ``unsubscribe`` after the
last), to the global channel always, and to its own heartbeat channel.

One connection per pod carries the traffic: the ``Link`` (``link.py``), a
hiredis-fed asyncio protocol speaking RESP3, so that commands and pub/sub
share it (a pod's own room messages come back as pushes on the socket that
carried the append, in the same read as its reply). One supervised task
connects it, resubscribes every needed channel in a batch, watches the
heartbeat, and on any failure tears the connection down and reconnects with
capped exponential backoff plus jitter. The ``Publisher`` (``publisher.py``)
drains a bounded outbox onto it: one task, ``EVALSHA`` and ``PUBLISH``
batches in order; publishing never raises and never blocks the sender.

Reads and scripts off the hot path (history, presence) use redis-py.

A room message is appended with one ``EVALSHA`` of ``lua/append.lua``
(``log.py`` builds its arguments) that stamps it with the room's next offset,
stores it in the room's capped stream and publishes it, atomically. What
arrives on a room channel goes to the handler's ``on_entry`` (a room entry:
the appending pod's own included) or ``on_message`` (presence events)
without any JSON decoding; a pod's own unordered messages were delivered
when it published them, so it skips their echo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from ...core.exceptions import BroadcastError, StateError
from ...core.histogram import Histogram
from ...core.protocol import Message
from ...core.sequencer import Entry
from ..base import BackendHandler, LinkState, OnAppended, Slice
from .link import STALLED, Link, open_link
from .log import RedisRoomLog
from .names import Names, read_entry
from .presence import RedisPresence
from .publisher import Publisher
from .resp import LINK_ERRORS, RedisAddress, describe
from .scripts import APPEND, READ, Script

__all__ = ["RedisBackend", "RedisCounters"]

log = logging.getLogger("realtime.redis")

_ALLOWED = {
    LinkState.CONNECTING: {LinkState.CONNECTED, LinkState.STOPPED},
    LinkState.CONNECTED: {LinkState.RECONNECTING, LinkState.STOPPED},
    LinkState.RECONNECTING: {LinkState.CONNECTED, LinkState.STOPPED},
    LinkState.STOPPED: set(),
}

_STOP_TIMEOUT = 5.0


@dataclass(slots=True)
class RedisCounters:
    """What went over the link; shown in stats."""

    received: int = 0
    """messages from other pods handed to local members"""
    skipped_own: int = 0
    """this pod's own messages echoed back by Redis"""
    malformed: int = 0
    """envelopes on our channels not from a chat-api pod"""
    reconnects: int = 0
    """subscriptions rebuilt after a loss"""
    connect_failures: int = 0
    heartbeat_timeouts: int = 0
    history_reads: int = 0


class RedisBackend:
    """Carries every message to every pod through Redis, and keeps rooms' offsets,
    history and presence there."""

    def __init__(
        self,
        url: str,
        *,
        pod_id: str,
        name: str = "realtime",
        channel_prefix: str = "realtime",
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        reconnect_min_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
        publish_queue: int = 10_000,
        publish_batch: int = 256,
        history_length: int = 100,
        history_ttl: float = 3600.0,
        history_max_bytes: int = 1 << 20,
        idempotency_keys: int = 1000,
    ) -> None:
        if not pod_id or any(c.isspace() or not c.isprintable() for c in pod_id):
            raise ValueError("pod_id must be non-empty, printable, without white space")
        if heartbeat_timeout <= heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")
        self._url = url
        self._address = RedisAddress.from_url(url)
        self.pod_id = pod_id
        self._client_name = f"{name}:{pod_id}"
        """Names the Redis connections (``CLIENT LIST``): service and pod."""
        self.channel_prefix = channel_prefix
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._min_delay = reconnect_min_delay
        self._max_delay = reconnect_max_delay

        self.names = Names(channel_prefix, pod_id)
        self._own = self.names.envelope
        self._pod_channel = self.names.pod_channel
        # channel -> room (None: global) for every channel this pod needs
        self._rooms: dict[bytes, str | None] = {self.names.global_channel: None}

        self._state = LinkState.CONNECTING
        self._handler: BackendHandler | None = None
        self._redis: aioredis.Redis | None = None
        self._link: Link | None = None
        self._log = RedisRoomLog(
            self.names,
            history_length=history_length,
            history_ttl=history_ttl,
            history_max_bytes=history_max_bytes,
            idempotency_keys=idempotency_keys,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._first_attempt: asyncio.Future[None] | None = None

        self._last_heartbeat: float | None = None
        self._down_since: float | None = None
        self.counters = RedisCounters()
        self._link_up = asyncio.Event()
        self._unreachable = False
        """The last attempt to connect failed: publishing fails at once."""
        self._publisher = Publisher(
            self._ready_link,
            pod_id=pod_id,
            room_log=self._log,
            heartbeat_channel=self._pod_channel,
            timeout=heartbeat_timeout,
            queue=publish_queue,
            batch=publish_batch,
            on_entry=self._own_entry,
            load_scripts=self._load_scripts,
        )

    # -- Backend ----------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self._state

    def _move(self, new: LinkState) -> None:
        if new not in _ALLOWED[self._state]:
            raise StateError(f"link cannot go from {self._state.value} to {new.value}")
        self._state = new

    async def start(self, handler: BackendHandler) -> None:
        """Start the link and wait (at most the heartbeat timeout) for the
        first connection attempt; serve locally whatever its outcome."""
        if self._handler is not None or self._state is LinkState.STOPPED:
            raise StateError("the backend was started already")
        self._handler = handler
        self._redis = aioredis.Redis.from_url(
            self._url,
            socket_connect_timeout=self._heartbeat_timeout,
            socket_timeout=self._heartbeat_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            client_name=f"{self._client_name}:cmd",
        )
        loop = asyncio.get_running_loop()
        self._first_attempt = loop.create_future()
        self._tasks = [
            loop.create_task(self._supervise(), name=f"redis-link-{self.pod_id}"),
            loop.create_task(self._publisher.run(), name=f"redis-publisher-{self.pod_id}"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        await asyncio.wait({self._first_attempt}, timeout=self._heartbeat_timeout)

    async def stop(self) -> None:
        """Unsubscribe, stop both tasks and close every Redis connection."""
        if self._state is LinkState.STOPPED:
            return
        self._move(LinkState.STOPPED)
        link = self._link
        if link is not None and link.open:
            link.unsubscribe()
            link.close()
        for task in self._tasks:
            task.cancel()
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=_STOP_TIMEOUT)
        for task in pending:
            log.error("redis backend task %s ignored its cancellation", task.get_name())
        self._tasks = []
        if link is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link.closed), 1.0)
            link.abort()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._publisher.close()
        self._handler = None
        log.info("redis link stopped (pod=%s)", self.pod_id)

    async def _ready_link(self) -> Link | None:
        """The link, once it is up: at once if it is; while it reconnects
        after a loss, waiting for it (at most the heartbeat timeout), so a
        blip costs a delay and not the message; None while Redis cannot be
        reached."""
        link = self._link
        if link is not None and link.open:
            return link
        if self._unreachable or self._state is LinkState.STOPPED:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._link_up.wait(), self._heartbeat_timeout)
        return self._link

    def _running(self) -> BackendHandler:
        if self._handler is None:
            raise StateError("the backend is not running")
        return self._handler

    def publish(self, room: str | None, payload: bytes) -> None:
        self._running().on_message(room, payload)
        self._publisher.publish(self.names.channel(room), self._own + payload)

    def append(self, message: Message, done: OnAppended, *, key: str | None = None) -> None:
        room = message.room
        if room is None:
            raise ValueError("only room messages are appended to a room log")
        self._running()
        self._publisher.append(message, self.names.channel(room), done, key)

    def presence(self, ttl: float) -> RedisPresence:
        return RedisPresence(self.run_script, self.names, pod_id=self.pod_id, ttl=ttl)

    async def read(self, room: str, after: int, limit: int, *, epoch: str | None = None) -> Slice:
        if self._redis is None:
            raise BroadcastError("the backend is not running")
        command = self._log.read_command(room, after, limit, epoch)
        self.counters.history_reads += 1
        try:
            try:
                reply = await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]
            except NoScriptError:
                await self._load_scripts()
                reply = await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]
        except LINK_ERRORS as exc:
            raise BroadcastError(f"history read failed: {describe(exc)}") from exc
        return self._log.parse_read(reply, after)

    async def run_script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """``EVALSHA`` one of our scripts on the command connection, loading it
        if Redis does not know it; raises ``BroadcastError`` on link trouble."""
        if self._redis is None:
            raise BroadcastError("the backend is not running")
        command = ["EVALSHA", script.sha, len(keys), *keys, *args]
        try:
            try:
                return await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]
            except NoScriptError:
                await self._redis.script_load(script.source)
                return await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]
        except LINK_ERRORS as exc:
            raise BroadcastError(f"script failed: {describe(exc)}") from exc

    async def _load_scripts(self) -> None:
        assert self._redis is not None
        await self._redis.script_load(APPEND.source)
        await self._redis.script_load(READ.source)

    def subscribe(self, room: str) -> None:
        channel = self.names.channel(room)
        if channel in self._rooms:
            return
        self._rooms[channel] = room
        link = self._link
        if link is not None:
            link.subscribe((channel,))

    def unsubscribe(self, room: str) -> None:
        channel = self.names.channel(room)
        if channel not in self._rooms:
            return
        del self._rooms[channel]
        link = self._link
        if link is not None:
            link.unsubscribe((channel,))

    @property
    def roundtrip(self) -> Histogram:
        """Seconds per publisher round trip (one batch: write to last reply)."""
        return self._publisher.roundtrip

    def stats(self) -> Mapping[str, object]:
        link = self._link
        age = None
        if self._last_heartbeat is not None:
            age = round(time.monotonic() - self._last_heartbeat, 3)
        return {
            "kind": "redis",
            "state": self._state.value,
            "pod": self.pod_id,
            "channel_prefix": self.channel_prefix,
            "published": self._publisher.counters.published,
            "received": self.counters.received,
            "skipped_own": self.counters.skipped_own,
            "malformed": self.counters.malformed,
            "publish_failures": self._publisher.counters.publish_failures,
            "publish_queue": self._publisher.queued,
            "reconnects": self.counters.reconnects,
            "connect_failures": self.counters.connect_failures,
            "heartbeat_timeouts": self.counters.heartbeat_timeouts,
            "last_heartbeat_age": age,
            "subscribed_channels": 0 if link is None else len(link.channels),
            "appended": self._publisher.counters.appended,
            "append_failures": self._publisher.counters.append_failures,
            "history_reads": self.counters.history_reads,
            "wanted_channels": len(self._rooms) + 1,
        }

    # -- receiving -------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        """One pub/sub message, straight from the parser: no JSON decoding."""
        room = self._rooms.get(channel, "")
        if room == "":
            if channel == self._pod_channel:
                self._last_heartbeat = time.monotonic()
            return  # a room left a moment ago, still in flight
        cut = data.find(b"\n")
        handler = self._handler
        if cut < 0 or handler is None:
            self.counters.malformed += 1
            return
        try:
            if room is not None:
                entry = read_entry(data, cut + 1)
                if entry is not None:  # a room entry, this pod's own too
                    self.counters.received += 1
                    handler.on_entry(room, entry)
                    return
            if data.startswith(self._own):  # delivered when it was published
                self.counters.skipped_own += 1
                return
            self.counters.received += 1
            handler.on_message(room, data[cut + 1 :])
        except Exception:  # a bug above us must not cut the link for every room
            log.exception("delivering a message from redis failed (room=%s)", room)

    def _own_entry(self, room: str, entry: Entry) -> None:
        """This pod's own append, stamped by the script."""
        if self._handler is not None:
            self._handler.on_entry(room, entry)

    def _on_subscribed(self, channel: bytes) -> None:
        """Redis confirmed a subscription: from now on the room's messages
        reach this pod, so the node may read where the room stands."""
        room = self._rooms.get(channel)
        if room is not None and self._handler is not None:
            self._handler.on_ready(room)

    def _wanted(self) -> list[bytes]:
        return [self._pod_channel, *self._rooms]

    async def _supervise(self) -> None:
        """Keep the link connected for as long as the backend runs."""
        attempt = 0
        while True:
            try:
                link = await open_link(
                    self._address,
                    self._on_message,
                    on_subscribe=self._on_subscribed,
                    client_name=f"{self._client_name}:link",
                    timeout=self._heartbeat_timeout,
                )
            except LINK_ERRORS as exc:
                self._connect_failed(exc, attempt)
                await self._backoff(attempt)
                attempt += 1
                continue
            connected_at = time.monotonic()
            # From here on subscribe() and unsubscribe() write to this link;
            # what is wanted now is subscribed in one go.
            self._link = link
            link.subscribe(self._wanted())
            try:
                self._connected(link)
                reason = await self._watch(link)
            except Exception as exc:  # a bug: log it, rebuild the link, keep serving
                log.exception("redis link failed unexpectedly")
                reason = describe(exc)
            finally:
                self._link = None
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
        self._last_heartbeat = time.monotonic()
        while True:
            self._publisher.heartbeat()
            await asyncio.wait({link.closed}, timeout=self._heartbeat_interval)
            if link.closed.done():
                if link.lost_reason is STALLED:  # a reply did not come back in time
                    self.counters.heartbeat_timeouts += 1
                return link.lost_reason
            age = time.monotonic() - (self._last_heartbeat or 0.0)
            if age > self._heartbeat_timeout:
                self.counters.heartbeat_timeouts += 1
                return f"no heartbeat came back for {age:.1f}s: {STALLED}"

    def _connected(self, link: Link) -> None:
        self._unreachable = False
        self._link_up.set()
        channels = len(self._rooms) + 1
        if self._first_attempt is not None and not self._first_attempt.done():
            self._first_attempt.set_result(None)
        if self._state is LinkState.CONNECTING:
            self._move(LinkState.CONNECTED)
            self._down_since = None
            log.info(
                "redis link connected (pod=%s, prefix=%s, %d channels subscribed)",
                self.pod_id,
                self.channel_prefix,
                channels,
            )
            return
        self._move(LinkState.CONNECTED)
        self.counters.reconnects += 1
        down = time.monotonic() - (self._down_since or time.monotonic())
        self._down_since = None
        log.info(
            "redis link resubscribed %d channels after %.1fs down (pod=%s)",
            channels,
            down,
            self.pod_id,
        )

    def _lost(self, reason: str) -> None:
        self._link_up.clear()
        self._move(LinkState.RECONNECTING)
        self._down_since = time.monotonic()
        log.warning(
            "redis link lost (%s); serving local clients only, reconnecting (pod=%s)",
            reason,
            self.pod_id,
        )

    def _connect_failed(self, exc: BaseException, attempt: int) -> None:
        self._unreachable = True
        self.counters.connect_failures += 1
        if self._first_attempt is not None and not self._first_attempt.done():
            self._first_attempt.set_result(None)
        if self._down_since is None:
            self._down_since = time.monotonic()
        if attempt == 0:
            log.warning(
                "redis unreachable (%s); serving local clients only, "
                "reconnecting with backoff up to %.1fs (pod=%s)",
                describe(exc),
                self._max_delay,
                self.pod_id,
            )
        else:
            log.debug("redis reconnect attempt %d failed: %s", attempt + 1, describe(exc))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("redis backend task %s crashed", task.get_name(), exc_info=exc)
