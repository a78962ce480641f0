"""The room log contract (offsets, history, idempotency), in memory and in a
real Redis; the Redis scripts run against a redis-server started by the suite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from realtime import Identity, MemoryBroadcaster, Message, OrderedBroadcaster, RedisBroadcaster
from realtime.backends.base import Stamp, Unstored
from realtime.backends.redis.log import parse_stamp
from realtime.core.sequencer import Entry

from .redis_support import RedisServer, quick_broadcaster
from .support import eventually

Factory = Callable[..., OrderedBroadcaster]


class Sink:
    def __init__(self) -> None:
        self.entries: list[tuple[str, Entry]] = []
        self.ready_rooms: list[str] = []

    def entry(self, room: str, entry: Entry) -> None:
        self.entries.append((room, entry))

    def ready(self, room: str) -> None:
        self.ready_rooms.append(room)


def message(room: str, n: int) -> Message:
    return Message(id=f"m-{n}", room=room, sender=Identity("u1", "Ann"), ts=1, data=n)


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest, channel_prefix: str) -> AsyncIterator[Factory]:
    made: list[OrderedBroadcaster] = []

    def factory(
        pod_id: str = "pod-a", *, url: str | None = None, **kwargs: Any
    ) -> OrderedBroadcaster:
        broadcaster: OrderedBroadcaster
        if request.param == "memory":
            broadcaster = MemoryBroadcaster(**kwargs)
        else:
            broadcaster = quick_broadcaster(
                url or request.getfixturevalue("shared_redis_url"), pod_id, channel_prefix, **kwargs
            )
        made.append(broadcaster)
        return broadcaster

    yield factory
    for broadcaster in made:
        async with asyncio.timeout(5):
            await broadcaster.stop()


async def started(broadcaster: OrderedBroadcaster) -> Sink:
    sink = Sink()
    broadcaster.attach(sink)
    async with asyncio.timeout(5):
        await broadcaster.start(lambda room, payload: 0)
    return sink


async def outcome(
    log: OrderedBroadcaster, msg: Message, key: str | None = None
) -> Stamp | Unstored:
    future: asyncio.Future[Stamp | Unstored] = asyncio.get_running_loop().create_future()
    log.append(msg, future.set_result, idempotency_key=key)
    async with asyncio.timeout(5):
        return await future


async def append(log: OrderedBroadcaster, msg: Message, key: str | None = None) -> Stamp:
    got = await outcome(log, msg, key)
    assert isinstance(got, Stamp), got
    return got


async def test_offsets_grow_by_one_and_entries_are_stamped(make: Factory) -> None:
    log = make()
    sink = await started(log)
    stamps = [await append(log, message("r", n)) for n in range(1, 4)]
    assert [s.offset for s in stamps if s] == [1, 2, 3]
    epoch = stamps[0].epoch if stamps[0] else ""
    assert all(s is not None and s.epoch == epoch and not s.duplicate for s in stamps)
    assert [(room, e.offset) for room, e in sink.entries] == [("r", 1), ("r", 2), ("r", 3)]
    frame = orjson.loads(sink.entries[0][1].payload)
    assert (frame["type"], frame["offset"], frame["epoch"], frame["data"]) == (
        "message",
        1,
        epoch,
        1,
    )
    assert parse_stamp(sink.entries[2][1].payload) == (epoch, 3)


async def test_read_ranges_tail_and_epoch_mismatch(make: Factory) -> None:
    log = make(history_length=5)
    await started(log)
    empty = await log.read("r", 0, 10)
    assert (empty.epoch, empty.newest, empty.first, empty.entries) == (None, 0, 1, ())
    for n in range(1, 9):
        await append(log, message("r", n))
    got = await log.read("r", 4, 2)
    assert [e.offset for e in got.entries] == [5, 6]
    assert (got.newest, got.first) == (8, 4)  # only the last 5 are kept
    tail = await log.read("r", -1, 3)
    assert [e.offset for e in tail.entries] == [6, 7, 8]
    other = await log.read("r", 7, 10, epoch="not-this-one")
    assert [e.offset for e in other.entries] == [4, 5, 6, 7, 8]
    # Replayed bytes are the live bytes.
    assert got.entries[0].payload == message("r", 5).stamped(got.epoch or "", 5)


async def test_idempotency_key_publishes_once(make: Factory) -> None:
    log = make()
    sink = await started(log)
    first = await append(log, message("r", 1), key="k1")
    again = await append(log, message("r", 1), key="k1")
    other = await append(log, message("r", 2), key="k2")
    assert first is not None
    assert again == Stamp(first.epoch, first.offset, duplicate=True)
    assert other is not None
    assert other.offset == 2
    assert len(sink.entries) == 2


async def test_history_expires_and_a_new_epoch_starts(make: Factory) -> None:
    log = make(history_ttl=0.2)
    await started(log)
    first = await append(log, message("r", 1))

    async def expired() -> bool:
        return (await log.read("r", 0, 10)).epoch is None

    await eventually(expired, timeout=5)
    second = await append(log, message("r", 2))
    assert first is not None
    assert second is not None
    assert second.offset == 1
    assert second.epoch != first.epoch


async def test_ready_follows_subscribe(make: Factory) -> None:
    log = make()
    sink = await started(log)
    log.subscribe("r")

    async def ready() -> bool:
        return sink.ready_rooms == ["r"]

    await eventually(ready, timeout=5)


async def test_another_pod_gets_the_same_entry_through_pub_sub(make: Factory) -> None:
    if isinstance(make("probe"), MemoryBroadcaster):
        pytest.skip("a local-only log has no other pods")
    a, b = make("pod-a"), make("pod-b")
    sink_a, sink_b = await started(a), await started(b)
    b.subscribe("r")

    async def ready() -> bool:
        return sink_b.ready_rooms == ["r"]

    await eventually(ready, timeout=5)
    stamp = await append(a, message("r", 7))

    async def arrived() -> bool:
        return len(sink_b.entries) == 1

    await eventually(arrived, timeout=5)
    assert sink_b.entries == sink_a.entries
    assert isinstance(stamp, Stamp)
    assert sink_b.entries[0][1].offset == stamp.offset


async def test_flushed_redis_starts_a_new_epoch(redis_server: RedisServer) -> None:
    log = RedisBroadcaster(redis_server.url, pod_id="pod-a", channel_prefix="flush")
    log.attach(Sink())
    await log.start(lambda room, payload: 0)
    try:
        before = await append(log, message("r", 1))
        redis_server.command("FLUSHALL")
        redis_server.command("SCRIPT", "FLUSH")
        after = await append(log, message("r", 2))
        assert before is not None
        assert after is not None
        assert (after.offset, after.epoch != before.epoch) == (1, True)
        got = await log.read("r", 0, 10)
        assert [e.offset for e in got.entries] == [1]
    finally:
        await log.stop()


async def test_append_while_redis_is_down_reports_no_stamp(redis_server: RedisServer) -> None:
    log = RedisBroadcaster(
        redis_server.url,
        pod_id="pod-a",
        channel_prefix="down",
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
    )
    log.attach(Sink())
    await log.start(lambda room, payload: 0)
    try:
        redis_server.kill()
        assert await outcome(log, message("r", 1)) is Unstored.FAILED
        assert log.stats()["append_failures"] == 1
    finally:
        await log.stop()
