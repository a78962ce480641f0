"""Timeline in-process: gap hold and repair from history, catch-up at join,
without sockets (the local-only room log is real, the transport a list)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from realtime import (
    Catchup,
    Connection,
    Identity,
    LocalHub,
    MemoryBroadcaster,
    MemoryPresence,
    Message,
    Presence,
    Timeline,
    TimelineSettings,
)
from realtime.backends.base import Stamp
from realtime.backends.redis.scripts import APPEND
from realtime.core.exceptions import BroadcastError
from realtime.core.sequencer import Entry

from .redis_support import RedisServer, ReplyCutter, quick_broadcaster
from .support import eventually


class Frames:
    """A FrameSink that keeps the JSON of every text frame."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def write(self, frame: bytes) -> None:
        length = frame[1] & 0x7F
        start = 2 if length < 126 else 4 if length == 126 else 10
        self.frames.append(orjson.loads(frame[start:]))

    def buffered(self) -> int:
        return 0

    def close(self, code: int, reason: str) -> None:
        pass

    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.frames if f["type"] == "message"]


class Lossy:
    """Passes log entries on to the timeline, except the offsets it drops."""

    def __init__(self, timeline: Timeline, drop: set[int]) -> None:
        self.timeline = timeline
        self.drop = drop

    def entry(self, room: str, entry: Entry) -> None:
        if entry.offset not in self.drop:
            self.timeline.entry(room, entry)

    def ready(self, room: str) -> None:
        self.timeline.ready(room)


@pytest.fixture
async def parts() -> AsyncIterator[tuple[LocalHub, MemoryBroadcaster, Timeline]]:
    hub = LocalHub()
    log = MemoryBroadcaster(history_length=50)
    timeline = Timeline(hub, log, log, TimelineSettings(keep=50, gap_wait=0.05))
    hub.watch(timeline)
    await log.start(hub.broadcast)
    yield hub, log, timeline
    await timeline.stop()
    await log.stop()


def member(hub: LocalHub, n: int) -> tuple[Connection, Frames]:
    sink = Frames()
    conn = Connection(f"c{n}", Identity(f"u{n}", f"user{n}"), sink, max_buffered=1 << 20)
    hub.add(conn)
    return conn, sink


def publish(timeline: Timeline, n: int) -> asyncio.Future[Stamp | None]:
    done: asyncio.Future[Stamp | None] = asyncio.get_running_loop().create_future()
    msg = Message(id=f"m{n}", room="r", sender=Identity("u", "u"), ts=0, data=n)
    timeline.publish(msg, done.set_result)
    return done


async def test_a_lost_entry_is_held_for_then_read_from_history(
    parts: tuple[LocalHub, MemoryBroadcaster, Timeline],
) -> None:
    hub, log, timeline = parts
    conn, sink = member(hub, 1)
    await asyncio.wait_for(timeline.attach(conn, "r", Catchup()), 5)
    log.attach(Lossy(timeline, drop={2, 3}))
    for n in range(1, 6):
        await publish(timeline, n)
    # 4 and 5 arrived, 2 and 3 did not: nothing after 1 is delivered yet.
    assert sink.offsets() == [1]
    assert timeline.stats()["rooms_holding"] == 1

    async def repaired() -> bool:
        return sink.offsets() == [1, 2, 3, 4, 5]

    await eventually(repaired, timeout=5)
    stats = timeline.stats()
    assert (stats["gap_repairs"], stats["recovered"], stats["lost"]) == (1, 4, 0)


async def test_a_join_during_a_gap_gets_no_duplicate(
    parts: tuple[LocalHub, MemoryBroadcaster, Timeline],
) -> None:
    hub, log, timeline = parts
    first, first_sink = member(hub, 1)
    await asyncio.wait_for(timeline.attach(first, "r", Catchup()), 5)
    await publish(timeline, 1)
    log.attach(Lossy(timeline, drop={2}))
    await publish(timeline, 2)
    await publish(timeline, 3)  # held behind the missing 2
    late, late_sink = member(hub, 2)
    await asyncio.wait_for(timeline.attach(late, "r", Catchup(history=10)), 5)
    sync = late_sink.frames[0]
    assert (sync["type"], sync["offset"], sync["replayed"]) == ("sync", 1, 1)

    async def both() -> bool:
        return late_sink.offsets() == [1, 2, 3] and first_sink.offsets() == [1, 2, 3]

    await eventually(both, timeout=5)


async def test_presence_coalesces_connections_and_reconnects_of_one_user() -> None:
    hub = LocalHub()
    presence = Presence(hub, MemoryPresence(), ttl=5)
    watcher, seen = member(hub, 0)
    hub.join(watcher, "r")

    def events() -> list[tuple[str, str]]:
        return [(f["type"], f["user"]["id"]) for f in seen.frames]

    def connect(n: int) -> Connection:
        conn = Connection(f"c{n}", Identity("u1", "Ann"), Frames(), max_buffered=1 << 20)
        hub.add(conn)
        hub.join(conn, "r")
        presence.join(conn, "r")
        return conn

    first = connect(1)
    second = connect(2)  # same user, second tab
    await presence.flush()
    assert events() == [("member_joined", "u1")]
    presence.drop(first)
    await presence.flush()
    assert events() == [("member_joined", "u1")]  # still there in the other tab
    presence.drop(second)
    third = connect(3)  # a reconnect within one flush interval
    await presence.flush()
    assert events() == [("member_joined", "u1")]
    members = await presence.members("r")
    assert [(m.id, m.name) for m in members] == [("u1", "Ann")]
    presence.drop(third)
    await presence.flush()
    assert events() == [("member_joined", "u1"), ("member_left", "u1")]
    assert await presence.members("r") == []


async def test_members_are_told_when_history_no_longer_has_a_gap() -> None:
    hub = LocalHub()
    log = MemoryBroadcaster(history_length=2)
    timeline = Timeline(hub, log, log, TimelineSettings(keep=2, gap_wait=0.05))
    hub.watch(timeline)
    await log.start(hub.broadcast)
    try:
        conn, sink = member(hub, 1)
        await asyncio.wait_for(timeline.attach(conn, "r", Catchup()), 5)
        log.attach(Lossy(timeline, drop={2, 3, 4}))
        for n in range(1, 6):
            await publish(timeline, n)

        async def repaired() -> bool:
            return sink.offsets() == [1, 4, 5]

        await eventually(repaired, timeout=5)
        kinds = [(f["type"], f.get("offset"), f.get("lost")) for f in sink.frames]
        assert kinds == [
            ("message", 1, None),
            ("sync", 3, 2),
            ("message", 4, None),
            ("message", 5, None),
        ]
        assert sink.frames[1]["reason"] == "window_exceeded"
        assert timeline.stats()["lost"] == 2
    finally:
        await timeline.stop()
        await log.stop()


class LinkDown(MemoryBroadcaster):
    """A room log whose reads fail while ``down`` (a Redis outage)."""

    down = True

    async def read(self, room: str, after: int, limit: int, *, epoch: str | None = None) -> Any:
        if self.down:
            raise BroadcastError("link down")
        return await super().read(room, after, limit, epoch=epoch)


async def test_a_confirmed_subscription_cuts_a_failed_reads_backoff_short() -> None:
    hub = LocalHub()
    log = LinkDown(history_length=50)
    # The first retry of a failed read would come after gap_wait (3 s).
    timeline = Timeline(hub, log, log, TimelineSettings(keep=50, gap_wait=3.0))
    hub.watch(timeline)
    await log.start(hub.broadcast)
    try:
        conn, sink = member(hub, 1)
        await asyncio.wait_for(timeline.attach(conn, "r", Catchup()), 5)
        await publish(timeline, 1)  # stored, but held: the room's state is unknown
        assert sink.offsets() == []
        log.down = False
        timeline.ready("r")  # the link is back and the subscription confirmed

        async def delivered() -> bool:
            return sink.offsets() == [1]

        # Well inside the 3 s backoff: the confirmation woke the read.
        await eventually(delivered, timeout=1.5)
    finally:
        await timeline.stop()
        await log.stop()


async def test_a_lost_script_reply_delivers_the_message_once_in_order(
    redis_server: RedisServer, channel_prefix: str
) -> None:
    """The append script ran but its reply was lost with the connection: the
    sender's pod must not show the message unstamped (it may be stored); it
    reads the room again and shows it once, with its offset."""
    cutter = await ReplyCutter(redis_server.port).start()
    hub = LocalHub()
    log = quick_broadcaster(cutter.url, "pod-a", channel_prefix)
    timeline = Timeline(hub, log, log, TimelineSettings(gap_wait=0.05))
    hub.watch(timeline)
    await log.start(hub.broadcast)
    try:
        conn, sink = member(hub, 1)
        await asyncio.wait_for(timeline.attach(conn, "r", Catchup()), 5)
        assert isinstance(await asyncio.wait_for(publish(timeline, 1), 5), Stamp)

        cutter.arm(APPEND.sha.encode())  # the next append's answer is lost
        assert await asyncio.wait_for(publish(timeline, 2), 5) is None  # not confirmed
        assert cutter.cut == 1

        async def shown(offsets: list[int]) -> bool:
            return sink.offsets() == offsets

        await eventually(lambda: shown([1, 2]), timeout=5)
        assert isinstance(await asyncio.wait_for(publish(timeline, 3), 5), Stamp)
        await eventually(lambda: shown([1, 2, 3]), timeout=5)
        messages = [f for f in sink.frames if f["type"] == "message"]
        assert [f["data"] for f in messages] == [1, 2, 3]  # none unstamped, none twice
        stats = timeline.stats()
        assert (stats["unknown"], stats["unstamped"]) == (1, 0)
    finally:
        await timeline.stop()
        await log.stop()
        await cutter.stop()
