"""The ``Backend`` contract, run against every implementation: unordered
messages, room entries (offsets, history, idempotency), readiness, stats and
stop — in memory, and against a real redis-server the suite starts.

In-process: each test starts a backend with a recording ``BackendHandler``
and calls its methods, as the node does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from realtime import (
    Backend,
    Identity,
    LinkState,
    MemoryBackend,
    Message,
    RedisBackend,
    StateError,
)
from realtime.backends.base import Stamp, Unstored
from realtime.core.protocol import entry_payload
from realtime.core.sequencer import Entry

from .redis_support import RedisServer, quick_broadcaster
from .support import eventually

Factory = Callable[..., Backend]


class Recorder:
    """A ``BackendHandler`` that keeps what it is told."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Entry]] = []
        self.messages: list[tuple[str | None, bytes]] = []
        self.ready_rooms: list[str] = []

    def on_entry(self, room: str, entry: Entry) -> None:
        self.entries.append((room, entry))

    def on_message(self, room: str | None, payload: bytes) -> None:
        self.messages.append((room, payload))

    def on_ready(self, room: str) -> None:
        self.ready_rooms.append(room)


def message(room: str | None, n: int, data: Any = None) -> Message:
    return Message(
        id=f"m-{n}", room=room, sender=Identity("u1", "Ann"), ts=1, data=n if data is None else data
    )


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest, channel_prefix: str) -> AsyncIterator[Factory]:
    """``make(pod_id, **settings)`` builds an unstarted backend; all are stopped afterwards."""
    made: list[Backend] = []

    def factory(pod_id: str = "pod-a", *, url: str | None = None, **kwargs: Any) -> Backend:
        backend: Backend
        if request.param == "memory":
            backend = MemoryBackend(**kwargs)
        else:
            backend = quick_broadcaster(
                url or request.getfixturevalue("shared_redis_url"), pod_id, channel_prefix, **kwargs
            )
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        async with asyncio.timeout(5):
            await backend.stop()


async def started(backend: Backend) -> Recorder:
    recorder = Recorder()
    async with asyncio.timeout(5):
        await backend.start(recorder)
    return recorder


async def outcome(log: Backend, msg: Message, key: str | None = None) -> Stamp | Unstored:
    future: asyncio.Future[Stamp | Unstored] = asyncio.get_running_loop().create_future()
    log.append(msg, future.set_result, key=key)
    async with asyncio.timeout(5):
        return await future


async def append(log: Backend, msg: Message, key: str | None = None) -> Stamp:
    got = await outcome(log, msg, key)
    assert isinstance(got, Stamp), got
    return got


def _subscribed(backend: Backend, count: int) -> Callable[[], Any]:
    async def check() -> bool:
        return backend.stats().get("subscribed_channels") == count

    return check


# -- lifecycle -------------------------------------------------------------------


async def test_is_a_backend(make: Factory) -> None:
    assert isinstance(make("pod-a"), Backend)


async def test_publish_before_start_raises_state_error(make: Factory) -> None:
    with pytest.raises(StateError):
        make("pod-a").publish("general", b"{}")
    with pytest.raises(StateError):
        make("pod-b").append(message("general", 1), lambda outcome: None)


async def test_start_twice_raises_state_error(make: Factory) -> None:
    backend = make()
    await started(backend)
    with pytest.raises(StateError):
        await backend.start(Recorder())


async def test_link_is_up_after_start_when_the_backend_is_up(make: Factory) -> None:
    backend = make()
    await started(backend)
    assert backend.state in (LinkState.LOCAL_ONLY, LinkState.CONNECTED)
    assert backend.stats()["state"] == backend.state.value


async def test_stop_is_idempotent_and_final(make: Factory) -> None:
    backend = make()
    await started(backend)
    backend.subscribe("general")
    await backend.stop()
    await backend.stop()
    assert backend.state is LinkState.STOPPED
    with pytest.raises(StateError):
        backend.publish("general", b"{}")


async def test_stats_name_state_and_counters_without_secrets(make: Factory) -> None:
    backend = make()
    await started(backend)
    backend.subscribe("general")
    backend.publish("general", b'{"x":1}')
    stats = dict(backend.stats())
    assert {"kind", "state", "published"} <= stats.keys()
    text = orjson.dumps(stats).decode()
    assert "password" not in text
    assert "redis://" not in text


# -- unordered messages ----------------------------------------------------------


@pytest.mark.parametrize("room", ["general", None])
async def test_publish_reaches_this_pod_once_at_once(make: Factory, room: str | None) -> None:
    backend = make()
    recorder = await started(backend)
    if room is not None:
        backend.subscribe(room)
    backend.publish(room, b'{"type":"message","data":"hi"}')
    # synchronously, before any await: the sending pod delivers by the same path
    assert recorder.messages == [(room, b'{"type":"message","data":"hi"}')]

    async def echo_came_back() -> bool:  # a local-only backend has no echo
        return int(backend.stats().get("skipped_own", 1)) >= 1  # type: ignore[call-overload]

    await eventually(echo_came_back, timeout=5)
    assert recorder.messages == [(room, b'{"type":"message","data":"hi"}')]


async def test_publish_keeps_the_order_of_calls(make: Factory) -> None:
    backend = make()
    recorder = await started(backend)
    backend.subscribe("general")
    for n in range(100):
        backend.publish("general", b"%d" % n)
    assert [p for _, p in recorder.messages] == [b"%d" % n for n in range(100)]


async def test_subscribe_and_unsubscribe_are_idempotent_and_never_raise(make: Factory) -> None:
    backend = make()
    await started(backend)
    backend.unsubscribe("never-joined")
    backend.subscribe("general")
    backend.subscribe("general")
    backend.unsubscribe("general")
    backend.unsubscribe("general")
    backend.subscribe("general")


async def test_a_second_pod_receives_what_the_first_publishes(make: Factory) -> None:
    if isinstance(make("probe"), MemoryBackend):
        pytest.skip("a local-only backend has no other pods")
    a, b = make("pod-a"), make("pod-b")
    from_a, from_b = await started(a), await started(b)
    b.subscribe("general")
    await eventually(_subscribed(b, 3))  # b's subscription is confirmed by Redis
    a.publish("general", b'{"n":1}')
    a.publish(None, b'{"n":2}')

    async def both() -> bool:
        return len(from_b.messages) == 2

    await eventually(both, timeout=5)
    assert from_b.messages == [("general", b'{"n":1}'), (None, b'{"n":2}')]
    assert len(from_a.messages) == 2  # at once, and no echo from Redis


# -- room entries -------------------------------------------------------------------


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
    assert sink.entries[2][1].payload == entry_payload(message("r", 3).body(), epoch, 3)


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
    assert got.entries[0].payload == entry_payload(message("r", 5).body(), got.epoch or "", 5)


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
    if isinstance(make("probe"), MemoryBackend):
        pytest.skip("a local-only backend has no other pods")
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
    log = RedisBackend(redis_server.url, pod_id="pod-a", channel_prefix="flush")
    await log.start(Recorder())
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
    log = RedisBackend(
        redis_server.url,
        pod_id="pod-a",
        channel_prefix="down",
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
    )
    await log.start(Recorder())
    try:
        redis_server.kill()

        async def link_down() -> bool:
            return log.state is LinkState.RECONNECTING

        await eventually(link_down)
        assert await outcome(log, message("r", 1)) is Unstored.FAILED  # never sent
        assert log.stats()["append_failures"] == 1
    finally:
        await log.stop()


# -- claims ------------------------------------------------------------------------


async def test_a_claim_is_held_once_across_pods_until_it_expires(make: Factory) -> None:
    first = make("pod-a")
    await started(first)
    second = first  # local-only: one pod is all there is
    if not isinstance(first, MemoryBackend):
        second = make("pod-b")
        await started(second)
    assert await first.claim("k1", "one", 30) is None
    assert await second.claim("k1", "two", 30) == "one"
    assert await first.claim("k1", "three", 30) == "one"
    assert await second.claim("k2", "two", 30) is None  # another name
    assert await first.claim("short", "a", 0.05) is None

    async def expired() -> bool:
        return await first.claim("short", "b", 30) is None

    await eventually(expired, timeout=5)
    assert await second.claim("short", "c", 30) == "b"
