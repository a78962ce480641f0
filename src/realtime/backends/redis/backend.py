"""RedisBackend: the pods of one deployment linked through Redis — one
server, a Sentinel set, or a Cluster (``topology.py`` reads which from the URL).

Every name it uses (channels, keys, the envelope) is built in ``names.py``. A
pod subscribes to a room's channel only while it hosts the room (the node
calls ``subscribe`` on the first local member and ``unsubscribe`` after the
last), to the global channel always, and to its own heartbeat channel.

The pod keeps one ``ShardLink`` (``shard.py``) per primary: one connection
(``link.py``, RESP3: commands and pub/sub pushes on one socket), its
heartbeat, and a ``Publisher`` (``publisher.py``) that drains an outbox
onto it. One server or a Sentinel set has one primary; a Cluster one per
shard, each carrying the rooms whose slots it serves (sharded pub/sub:
``SSUBSCRIBE``/``SPUBLISH``; a room's keys and channel share its slot).

Where the primaries are is looked up again (``_follow``) whenever a link is
lost or fails to connect, a node answers ``MOVED``/``ASK``/``READONLY``, or
a shard drops a subscription (its slot moved): links to nodes that are no
longer primaries are closed, their channels subscribed at the new owner and
their queued messages sent there. When a room's subscription is confirmed
again, the node reads what it missed (``on_ready``), so a failover or a slot
migration costs a gap repair, not messages.

A room message is appended with one ``EVALSHA`` of ``lua/append.lua``
(``log.py`` builds its arguments) that stamps it with the room's next offset,
stores it in the room's capped stream and publishes it, atomically. What
arrives on a room channel goes to the handler's ``on_entry`` (a room entry:
the appending pod's own included) or ``on_message`` (presence events)
without any JSON decoding; a pod's own unordered messages were delivered
when it published them, so it skips their echo.

Redis replication is asynchronous: a primary may fail after it published a
message its replica never got. With ``wait_replicas`` (default 1 on Sentinel
and Cluster), an append is acknowledged only once that many replicas have it
(``WAIT``); and whatever the setting, a room that Redis set back below what
this pod saw in its epoch is moved to a new epoch (by the append script, or
on the next read), so no offset ever names two messages.
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

from redis.exceptions import NoScriptError

from ...core.exceptions import BroadcastError, StateError
from ...core.histogram import ROUNDTRIP_BUCKETS, Histogram
from ...core.protocol import Message
from ...core.sequencer import Entry
from ..base import BackendHandler, LinkState, OnAppended, Slice, Unstored
from .link import STALLED, Link
from .log import RedisRoomLog
from .names import Names, read_entry
from .presence import RedisPresence
from .publisher import Outgoing, is_redirect
from .resp import LINK_ERRORS, InFlightLost, describe, pack_command
from .scripts import SCRIPTS, Script, sharded
from .shard import ShardLink
from .slots import SLOTS, key_slot
from .topology import Shard, Topology

__all__ = ["RedisBackend", "RedisCounters"]

log = logging.getLogger("realtime.redis")

_ALLOWED = {
    LinkState.CONNECTING: {LinkState.CONNECTED, LinkState.RECONNECTING, LinkState.STOPPED},
    LinkState.CONNECTED: {LinkState.RECONNECTING, LinkState.STOPPED},
    LinkState.RECONNECTING: {LinkState.CONNECTED, LinkState.STOPPED},
    LinkState.STOPPED: set(),
}

_STOP_TIMEOUT = 5.0
_RELOCATE_EVERY = 30.0
"""Seconds between lookups of the primaries while every link is up (a
Sentinel or Cluster only): changes are noticed sooner by their effects."""


@dataclass(slots=True)
class RedisCounters:
    """What went over the links; shown in stats."""

    received: int = 0
    """messages from Redis handed to local members (room entries, this pod's own too)"""
    skipped_own: int = 0
    """this pod's own unordered messages echoed back by Redis"""
    malformed: int = 0
    """envelopes on our channels not from a chat-api pod"""
    history_reads: int = 0
    topology_changes: int = 0
    """times the primaries changed (a failover, a slot moved)"""
    rewinds: int = 0
    """rooms Redis set back below what this pod had seen: moved to a new epoch"""


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
        wait_replicas: int | None = None,
        wait_timeout: float = 1.0,
        flush_delay: float = 0.005,
    ) -> None:
        if not pod_id or any(c.isspace() or not c.isprintable() for c in pod_id):
            raise ValueError("pod_id must be non-empty, printable, without white space")
        if heartbeat_timeout <= heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")
        self._topology = Topology.from_url(url)
        if wait_replicas is None:
            wait_replicas = 0 if self._topology.kind == "standalone" else 1
        if wait_replicas < 0:
            raise ValueError("wait_replicas must be 0 or more")
        if wait_replicas and not 0 < wait_timeout < heartbeat_timeout:
            raise ValueError("wait_timeout must be above 0 and below heartbeat_timeout")
        self.wait_replicas = wait_replicas
        self._wait_timeout = wait_timeout
        if not 0 <= flush_delay < heartbeat_timeout:
            raise ValueError("flush_delay must be 0 or more and below heartbeat_timeout")
        self._flush_delay = flush_delay
        self.pod_id = pod_id
        self._client_name = f"{name}:{pod_id}:link"
        """Names the Redis connections (``CLIENT LIST``): service and pod."""
        self.channel_prefix = channel_prefix
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._min_delay = reconnect_min_delay
        self._max_delay = reconnect_max_delay
        self._publish_queue = publish_queue
        self._publish_batch = publish_batch

        self._sharded = self._topology.sharded
        self.names = Names(channel_prefix, pod_id, sharded=self._sharded)
        self._own = self.names.envelope
        self._replied = self.names.replied_envelope
        # channel -> room (None: global) for every channel this pod needs
        self._rooms: dict[bytes, str | None] = {self.names.global_channel: None}
        self._seen: dict[str, tuple[str, int]] = {}
        """Per hosted room, the epoch and highest offset this pod has seen."""
        self._seen_on: dict[str, Link | None] = {}
        """Per hosted room, the link that brought what ``_seen`` holds, if a
        push on the only primary's link did: that Redis has it, so it is not
        behind it (the publisher may then append the room plainly)."""
        self._log = RedisRoomLog(
            self.names,
            history_length=history_length,
            history_ttl=history_ttl,
            history_max_bytes=history_max_bytes,
            idempotency_keys=idempotency_keys,
            publish=wait_replicas == 0,
        )
        scripts = tuple(sharded(s) for s in SCRIPTS) if self._sharded else SCRIPTS
        self._scripts = (*scripts, self._log.append_script)

        self._state = LinkState.CONNECTING
        self._handler: BackendHandler | None = None
        self._shards: dict[str, ShardLink] = {}
        """Every primary's link, by ``host:port``."""
        self._slots: list[ShardLink | None] = []
        """The link serving each Cluster slot (a Cluster only)."""
        self._only: ShardLink | None = None
        """The one link, where there is one primary."""
        self._heartbeats: dict[bytes, ShardLink] = {}
        self._parked: list[tuple[Outgoing, str]] = []
        """Messages a node sent back (``MOVED``…), with why, until the
        primaries are known again."""
        self._relocate = asyncio.Event()
        self._located = asyncio.Event()
        """Set once the primaries were found (the first time)."""
        self._follower: asyncio.Task[None] | None = None
        self._primary_since: float | None = None
        self._down_since: float | None = None
        self._started_at = 0.0
        self.counters = RedisCounters()
        self._retired_bytes = 0
        self._roundtrip = Histogram(ROUNDTRIP_BUCKETS)

    # -- Backend ----------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self._state

    def _move(self, new: LinkState) -> None:
        if new is self._state:
            return
        if new not in _ALLOWED[self._state]:
            raise StateError(f"link cannot go from {self._state.value} to {new.value}")
        self._state = new

    async def start(self, handler: BackendHandler) -> None:
        """Find the primaries, start their links and wait (at most the
        heartbeat timeout) for the first connection attempts; serve locally
        whatever their outcome."""
        if self._handler is not None or self._state is LinkState.STOPPED:
            raise StateError("the backend was started already")
        self._handler = handler
        self._started_at = time.monotonic()
        loop = asyncio.get_running_loop()
        if self._topology.kind == "standalone":
            self._apply(await self._topology.locate(self._heartbeat_timeout))
        else:
            self._follower = loop.create_task(self._follow(), name=f"redis-topology-{self.pod_id}")
        deadline = loop.time() + self._heartbeat_timeout
        while loop.time() < deadline:
            attempts = [s.first_attempt for s in self._shards.values()]
            if attempts and all(a.done() for a in attempts):
                break
            if attempts:
                await asyncio.wait(attempts, timeout=deadline - loop.time())
            else:  # the primaries are not known yet
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._located.wait(), deadline - loop.time())

    async def stop(self) -> None:
        """Unsubscribe, stop every task and close every Redis connection."""
        if self._state is LinkState.STOPPED:
            return
        self._move(LinkState.STOPPED)
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.wait({self._follower}, timeout=_STOP_TIMEOUT)
            self._follower = None
        shards = list(self._shards.values())
        self._shards.clear()
        await asyncio.gather(*(s.stop(_STOP_TIMEOUT) for s in shards))
        for shard in shards:
            shard.publisher.close()
        self._parked.clear()
        self._handler = None
        log.info("redis link stopped (pod=%s)", self.pod_id)

    def _running(self) -> BackendHandler:
        if self._handler is None:
            raise StateError("the backend is not running")
        return self._handler

    def _owner(self, channel: bytes) -> ShardLink | None:
        """The link of the primary that serves ``channel`` (None: not known now)."""
        if self._only is not None:
            return self._only
        if not self._slots:
            return None
        return self._slots[key_slot(channel)]

    def publish(self, room: str | None, payload: bytes) -> None:
        self._running().on_message(room, payload)
        channel = self.names.channel(room)
        shard = self._owner(channel)
        if shard is None:
            self._park((channel, self._own + payload), "the Redis primaries are not known yet")
            return
        shard.publisher.publish(channel, self._own + payload)

    def append(self, message: Message, done: OnAppended, *, key: str | None = None) -> None:
        room = message.room
        if room is None:
            raise ValueError("only room messages are appended to a room log")
        self._running()
        channel = self.names.channel(room)
        shard = self._owner(channel)
        if shard is None:
            done(Unstored.FAILED)
            return
        shard.publisher.append(
            message,
            channel,
            done,
            key,
            slot=key_slot(channel) if self._sharded else 0,
            seen=self._seen.get(room),
            seen_on=self._seen_on.get(room),
        )

    def presence(self, ttl: float) -> RedisPresence:
        return RedisPresence(
            self.run_script, self.run_scripts, self.names, pod_id=self.pod_id, ttl=ttl
        )

    async def read(self, room: str, after: int, limit: int, *, epoch: str | None = None) -> Slice:
        channel = self.names.channel(room)
        self.counters.history_reads += 1
        # What this pod had seen when it asked: entries that arrive while the
        # reply is on its way are newer than the reply, not a sign of loss.
        seen = self._seen.get(room)
        try:
            reply = await self._call(channel, self._log.read_command(room, after, limit, epoch))
            got = self._log.parse_read(reply, after)
            if seen is not None and got.epoch == seen[0] and got.newest < seen[1]:
                # Redis is behind what this pod saw: writes were lost (a
                # replica promoted before it had them). A new epoch, so that
                # the offsets this pod's members saw are never reused.
                self.counters.rewinds += 1
                log.warning(
                    "room %s: Redis has offset %d, this pod saw %d in epoch %s "
                    "(a failover lost writes?): moving the room to a new epoch",
                    room,
                    got.newest,
                    seen[1],
                    seen[0],
                )
                await self._call(channel, self._log.rebase_command(room, seen[0], seen[1]))
                reply = await self._call(channel, self._log.read_command(room, after, limit, epoch))
                got = self._log.parse_read(reply, after)
        except LINK_ERRORS as exc:
            raise BroadcastError(f"history read failed: {describe(exc)}") from exc
        return got

    async def run_script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """``EVALSHA`` one of our scripts where its keys live, loading it if
        Redis does not know it; raises ``BroadcastError`` on link trouble."""
        if self._sharded:
            script = sharded(script)
        command = pack_command(b"EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._call(keys[0].encode(), command)
        except LINK_ERRORS as exc:
            raise BroadcastError(f"script failed: {describe(exc)}") from exc

    async def claim(self, name: str, value: str, ttl: float) -> str | None:
        key = self.names.claim_key(name)
        ms = max(1, int(ttl * 1000))
        try:
            if await self._call(key, pack_command(b"SET", key, value, b"NX", b"PX", ms)):
                return None
            held = await self._call(key, pack_command(b"GET", key))
        except LINK_ERRORS as exc:
            raise BroadcastError(f"claim failed: {describe(exc)}") from exc
        # expired between the two commands: nobody holds it now, claim again
        return held.decode() if isinstance(held, bytes) else await self.claim(name, value, ttl)

    async def run_scripts(
        self, script: Script, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """``run_script`` for many ``(keys, args)`` at once: the calls for one
        primary written together (one round trip per primary, not per call),
        the primaries in parallel; the replies in the order of ``calls``."""
        if self._sharded:
            script = sharded(script)
        groups: dict[int, tuple[bytes, list[int], list[bytes]]] = {}
        for i, (keys, args) in enumerate(calls):
            key = keys[0].encode()
            shard = self._owner(key)
            _, indices, commands = groups.setdefault(id(shard), (key, [], []))
            indices.append(i)
            commands.append(pack_command(b"EVALSHA", script.sha, len(keys), *keys, *args))
        replies: list[Any] = [None] * len(calls)
        try:
            done = await asyncio.gather(
                *(self._call_many(key, commands) for key, _, commands in groups.values())
            )
        except LINK_ERRORS as exc:
            raise BroadcastError(f"script failed: {describe(exc)}") from exc
        for (_, indices, _), got in zip(groups.values(), done, strict=True):
            for i, reply in zip(indices, got, strict=True):
                replies[i] = reply
        return replies

    async def _call(self, key: bytes, command: bytes) -> Any:
        """One command on the link of the primary that serves ``key``; the
        scripts loaded again on ``NOSCRIPT``; ``ResponseError`` raised."""
        (reply,) = await self._call_many(key, [command])
        return reply

    async def _call_many(self, key: bytes, commands: list[bytes]) -> list[Any]:
        """``_call`` for commands that go where ``key`` lives, in one write."""
        if self._state is LinkState.STOPPED or self._handler is None:
            raise BroadcastError("the backend is not running")
        for _ in range(2):
            shard = self._owner(key)
            link = None if shard is None else await shard.ready_link()
            if shard is None or link is None:
                raise ConnectionError("the link to Redis is down")
            try:
                async with asyncio.timeout(self._heartbeat_timeout):
                    replies = await link.call(b"".join(commands), len(commands))
            except TimeoutError:
                link.abort(STALLED)
                raise InFlightLost(STALLED) from None
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing and len(missing) == len(commands):
                await self.load_scripts(shard)
                continue
            if missing:
                # some ran and some did not: run only those again
                await self.load_scripts(shard)
                again = await self._call_many(key, [commands[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
            for reply in replies:
                if isinstance(reply, BaseException):
                    if is_redirect(reply):
                        self._relocate.set()
                    raise reply
            return replies
        raise BroadcastError("Redis does not keep the scripts loaded")

    async def load_scripts(self, shard: ShardLink) -> None:
        """Load every script on ``shard``'s node (after ``NOSCRIPT``)."""
        link = await shard.ready_link()
        if link is None:
            raise ConnectionError("the link to Redis is down")
        commands = b"".join(pack_command(b"SCRIPT", b"LOAD", s.source) for s in self._scripts)
        async with asyncio.timeout(self._heartbeat_timeout):
            replies = await link.call(commands, len(self._scripts))
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply

    def subscribe(self, room: str) -> None:
        channel = self.names.channel(room)
        if channel in self._rooms:
            return
        self._rooms[channel] = room
        shard = self._owner(channel)
        if shard is not None:
            shard.subscribe(channel)

    def unsubscribe(self, room: str) -> None:
        channel = self.names.channel(room)
        if channel not in self._rooms:
            return
        del self._rooms[channel]
        self._seen.pop(room, None)
        self._seen_on.pop(room, None)
        for shard in self._shards.values():
            shard.unsubscribe(channel)

    @property
    def roundtrip(self) -> Histogram:
        """Seconds per publisher round trip (one batch: write to last reply),
        over every primary's link."""
        return self._roundtrip

    def stats(self) -> Mapping[str, object]:
        shards = list(self._shards.values())
        ages = [time.monotonic() - s.last_heartbeat for s in shards if s.last_heartbeat]
        publishers = [s.publisher for s in shards]
        stats: dict[str, object] = {
            "kind": "redis",
            "state": self._state.value,
            "pod": self.pod_id,
            "channel_prefix": self.channel_prefix,
            "published": sum(p.counters.published for p in publishers),
            "received": self.counters.received,
            "skipped_own": self.counters.skipped_own,
            "malformed": self.counters.malformed,
            "publish_failures": sum(p.counters.publish_failures for p in publishers),
            "publish_queue": sum(p.queued for p in publishers) + len(self._parked),
            "reconnects": sum(s.counters.reconnects for s in shards),
            "connect_failures": sum(s.counters.connect_failures for s in shards),
            "heartbeat_timeouts": sum(s.counters.heartbeat_timeouts for s in shards),
            "last_heartbeat_age": round(max(ages), 3) if ages else None,
            "subscribed_channels": sum(s.subscribed for s in shards),
            "appended": sum(p.counters.appended for p in publishers),
            "plain_appends": sum(p.counters.plain_appends for p in publishers),
            "append_failures": sum(p.counters.append_failures for p in publishers),
            "history_reads": self.counters.history_reads,
            "wanted_channels": len(self._rooms) + max(1, len(shards)),
            "topology": self._topology.kind,
            "wait_replicas": self.wait_replicas,
            "unreplicated": sum(p.counters.unreplicated for p in publishers),
            "resent": sum(p.counters.resent for p in publishers),
            "batches": sum(p.counters.batches for p in publishers),
            "flush_waits": sum(p.counters.flush_waits for p in publishers),
            "received_bytes": sum(s.received_bytes for s in shards) + self._retired_bytes,
            "rewinds": self.counters.rewinds,
        }
        if self._topology.kind != "standalone":
            stats["primaries"] = sorted(self._shards)
            stats["topology_changes"] = self.counters.topology_changes
            stats["primary_since"] = (
                None if self._primary_since is None else round(self._primary_since, 3)
            )
            stats["redirected"] = sum(p.counters.redirected for p in publishers)
        if self._sharded:
            stats["shards"] = {
                label: {"state": s.state.value, "channels": len(s.channels)}
                for label, s in sorted(self._shards.items())
            }
        return stats

    # -- receiving -------------------------------------------------------------

    def on_pubsub(self, channel: bytes, data: bytes) -> None:
        """One pub/sub message, straight from the parser: no JSON decoding."""
        room = self._rooms.get(channel, "")
        if room == "":
            shard = self._heartbeats.get(channel)
            if shard is not None:
                shard.heard_heartbeat()
            return  # a room left a moment ago, still in flight
        cut = data.find(b"\n")
        handler = self._handler
        if cut < 0 or handler is None:
            self.counters.malformed += 1
            return
        try:
            if data.startswith(self._replied):
                # Published once the append's reply came (a plain append; or,
                # waiting for replicas, every one), and delivered from it.
                self.counters.skipped_own += 1
                return
            if room is not None:
                entry = read_entry(data, cut + 1)
                if entry is not None:  # a room entry, this pod's own too
                    self.counters.received += 1
                    only = self._only
                    self._saw(room, entry, None if only is None else only.link)
                    handler.on_entry(room, entry)
                    return
            if data.startswith(self._own):  # delivered when it was published
                self.counters.skipped_own += 1
                return
            self.counters.received += 1
            handler.on_message(room, data[cut + 1 :])
        except Exception:  # a bug above us must not cut the link for every room
            log.exception("delivering a message from redis failed (room=%s)", room)

    def _saw(self, room: str, entry: Entry, link: Link | None = None) -> None:
        seen = self._seen.get(room)
        if seen is None or seen[0] != entry.epoch or entry.offset > seen[1]:
            self._seen[room] = (entry.epoch, entry.offset)
            self._seen_on[room] = link

    def on_own_entry(self, room: str, entry: Entry, link: Link | None) -> None:
        """This pod's own append, delivered from its reply: no push brings
        it, or (``link`` given: a plain append's, on that link) the push
        comes a round trip later."""
        if self._handler is not None:
            if room in self._seen or self.names.channel(room) in self._rooms:
                self._saw(room, entry, link)
            self._handler.on_entry(room, entry)

    def on_subscribed(self, channel: bytes) -> None:
        """Redis confirmed a subscription: from now on the room's messages
        reach this pod, so the node may read where the room stands."""
        room = self._rooms.get(channel)
        if room is not None and self._handler is not None:
            self._handler.on_ready(room)

    def on_dropped(self, channel: bytes, why: str) -> None:
        """A node refused or dropped a subscription (its slot moved):
        find the new owner and subscribe there."""
        if channel not in self._rooms or self._state is LinkState.STOPPED:
            return
        for shard in self._shards.values():
            shard.channels.discard(channel)
        log.info(
            "redis dropped channel %s (%s); subscribing where it is now (pod=%s)",
            channel.decode(errors="replace"),
            why,
            self.pod_id,
        )
        self._relocate.set()

    def on_link(self, shard: ShardLink, up: bool) -> None:
        """A link came up or went down: the backend's state follows them all."""
        if self._state is LinkState.STOPPED or self._shards.get(shard.label) is not shard:
            return
        if not up:
            self._relocate.set()
            if self._state is not LinkState.CONNECTING:
                self._move(LinkState.RECONNECTING)
                if self._down_since is None:
                    self._down_since = time.monotonic()
            return
        if any(s.state is not LinkState.CONNECTED for s in self._shards.values()):
            return
        channels = len(self._rooms) + len(self._shards)
        if self._state is LinkState.CONNECTING:
            self._move(LinkState.CONNECTED)
            self._down_since = None
            log.info(
                "redis link connected (pod=%s, prefix=%s, %d channels subscribed%s)",
                self.pod_id,
                self.channel_prefix,
                channels,
                self._where(),
            )
            return
        self._move(LinkState.CONNECTED)
        down = time.monotonic() - (self._down_since or time.monotonic())
        self._down_since = None
        log.info(
            "redis link resubscribed %d channels after %.1fs down (pod=%s%s)",
            channels,
            down,
            self.pod_id,
            self._where(),
        )

    def _where(self) -> str:
        if self._topology.kind == "standalone":
            return ""
        return f", {self._topology.kind} primaries {', '.join(sorted(self._shards))}"

    # -- following the primaries ------------------------------------------------

    async def _follow(self) -> None:
        """Look up the primaries at start, whenever something says they may
        have changed, and every few seconds while a link is down; apply
        what changed."""
        attempt = 0
        while True:
            self._relocate.clear()
            prefer = [s.address for s in self._shards.values() if s.state is LinkState.CONNECTED]
            try:
                found = await self._topology.locate(self._heartbeat_timeout, prefer)
            except BroadcastError as exc:
                if attempt == 0:
                    log.warning(
                        "redis primaries unknown (%s); serving local clients only, "
                        "asking again (pod=%s)",
                        exc,
                        self.pod_id,
                    )
                self._fail_parked(str(exc))
                if self._state is LinkState.CONNECTED:
                    self._move(LinkState.RECONNECTING)
                delay = min(self._max_delay, self._min_delay * 2**attempt)
                attempt += 1
                await self._wait_relocate(random.uniform(delay / 2, delay))
                continue
            attempt = 0
            self._apply(found)
            down = any(s.state is not LinkState.CONNECTED for s in self._shards.values())
            await self._wait_relocate(
                max(self._min_delay, 0.25) if down or self._parked else _RELOCATE_EVERY
            )

    async def _wait_relocate(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: see ShardLink.ready_link
                await self._relocate.wait()

    def _apply(self, found: list[Shard]) -> None:
        """Make the links match ``found``: start links to new primaries, move
        channels and queued messages to their owners, stop the old links."""
        if self._state is LinkState.STOPPED:
            return
        labels = {primary.key for primary in found}
        retired = [s for label, s in self._shards.items() if label not in labels]
        changed = bool(retired) or any(primary.key not in self._shards for primary in found)
        for primary in found:
            if primary.key not in self._shards:
                self._shards[primary.key] = self._new_link(primary)
        if changed:
            if self._primary_since is not None or retired:
                self.counters.topology_changes += 1
                log.warning(
                    "redis primaries now %s (pod=%s)",
                    ", ".join(sorted(labels)),
                    self.pod_id,
                )
            self._primary_since = time.time()
        # the slot map
        if self._sharded:
            slots: list[ShardLink | None] = [None] * SLOTS
            for primary in found:
                link = self._shards[primary.key]
                for start, end in primary.ranges:
                    slots[start : end + 1] = [link] * (end - start + 1)
            self._slots = slots
            self._only = None
        else:
            self._only = self._shards[found[0].key]
        for shard in retired:
            del self._shards[shard.label]
            if self._heartbeats.get(shard.heartbeat_channel) is shard:
                del self._heartbeats[shard.heartbeat_channel]
        # every channel where it belongs now
        for channel in self._rooms:
            owner = self._owner(channel)
            for shard in self._shards.values():
                if shard is not owner and channel in shard.channels:
                    shard.unsubscribe(channel)
            if owner is not None and channel not in owner.channels:
                owner.subscribe(channel)
        # what was queued for a node that is gone, and what came back
        moved: list[tuple[Outgoing, str]] = [
            (item, "its primary changed") for shard in retired for item in shard.publisher.take()
        ]
        parked, self._parked = self._parked, []
        self._requeue(moved + parked)
        for shard in retired:
            asyncio.get_running_loop().create_task(self._retire(shard))
        for shard in self._shards.values():
            if not shard.started:
                shard.start()
        self._located.set()

    async def _retire(self, shard: ShardLink) -> None:
        await shard.stop(_STOP_TIMEOUT)
        self._retired_bytes += shard.received_bytes
        for item in shard.publisher.take():  # queued while it stopped
            self._requeue([(item, "its primary changed")])
        shard.publisher.close()

    def _new_link(self, shard: Shard) -> ShardLink:
        heartbeat = (
            self.names.heartbeat_channel(shard.ranges[0])
            if self._sharded
            else self.names.heartbeat_channel()
        )
        link = ShardLink(
            shard.address,
            self,
            pod_id=self.pod_id,
            client_name=self._client_name,
            heartbeat_channel=heartbeat,
            room_log=self._log,
            sharded=self._sharded,
            primary_only=self._topology.kind != "standalone",
            heartbeat_interval=self._heartbeat_interval,
            heartbeat_timeout=self._heartbeat_timeout,
            reconnect_min_delay=self._min_delay,
            reconnect_max_delay=self._max_delay,
            publish_queue=self._publish_queue,
            publish_batch=self._publish_batch,
            wait_replicas=self.wait_replicas,
            wait_timeout=self._wait_timeout,
            on_redirect=self._redirected,
            roundtrip=self._roundtrip,
            flush_delay=self._flush_delay,
        )
        self._heartbeats[heartbeat] = link
        return link

    def _redirected(self, items: list[Outgoing], why: str) -> None:
        """A node sent messages back (``MOVED``, ``ASK``, ``READONLY``…): park
        them until the primaries are looked up again."""
        for item in items:
            self._park(item, why)
        self._relocate.set()

    def _park(self, item: Outgoing, why: str) -> None:
        if len(self._parked) >= self._publish_queue:
            self._fail([item], "the publish queue is full")
            return
        self._parked.append((item, why))

    def _requeue(self, items: list[tuple[Outgoing, str]]) -> None:
        """Send each item to the link that serves it now, in order (ahead of
        what was queued there later); one that has waited too long fails."""
        now = time.monotonic()
        by_link: dict[str, list[Outgoing]] = {}
        for item, why in items:
            channel = item[0] if isinstance(item, tuple) else item.channel
            owner = self._owner(channel)
            queued_at = item.queued_at if not isinstance(item, tuple) else now
            if owner is None or now - queued_at > self._heartbeat_timeout:
                self._fail([item], why)
                continue
            by_link.setdefault(owner.label, []).append(item)
        for label, moved in by_link.items():
            self._shards[label].publisher.requeue(moved)

    def _fail_parked(self, why: str) -> None:
        """While the primaries cannot be found, parked messages wait at most
        the heartbeat timeout."""
        now = time.monotonic()
        keep: list[tuple[Outgoing, str]] = []
        for item, reason in self._parked:
            queued_at = item.queued_at if not isinstance(item, tuple) else now
            if now - queued_at > self._heartbeat_timeout:
                self._fail([item], why)
            else:
                keep.append((item, reason))
        self._parked = keep

    def _fail(self, items: list[Outgoing], why: str) -> None:
        shard = next(iter(self._shards.values()), None)
        if shard is not None:
            shard.publisher.fail(items, why)
            return
        for item in items:
            if not isinstance(item, tuple):
                item.done(Unstored.FAILED)
