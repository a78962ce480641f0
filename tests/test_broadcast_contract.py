"""The ``Broadcaster`` contract, run against every implementation.

In-process: each test starts a broadcaster with a recording ``deliver``
callback and calls its methods, against a real Redis for ``RedisBroadcaster``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from realtime import (
    Broadcaster,
    Identity,
    LinkState,
    MemoryBroadcaster,
    Message,
    StateError,
)

from .redis_support import quick_broadcaster
from .support import eventually

Delivered = list[tuple[str | None, bytes]]
Factory = Callable[[str], Broadcaster]


def message(room: str | None, text: str, n: int = 1) -> Message:
    return Message(
        id=f"m-{n}", room=room, sender=Identity("u1", "Ann"), ts=1_700_000_000_000, data=text
    )


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest, channel_prefix: str) -> AsyncIterator[Factory]:
    """``make(pod_id)`` builds an unstarted broadcaster; all are stopped afterwards."""
    made: list[Broadcaster] = []

    def factory(pod_id: str) -> Broadcaster:
        broadcaster: Broadcaster
        if request.param == "memory":
            broadcaster = MemoryBroadcaster()
        else:
            url = request.getfixturevalue("shared_redis_url")
            broadcaster = quick_broadcaster(url, pod_id, channel_prefix)
        made.append(broadcaster)
        return broadcaster

    yield factory
    for broadcaster in made:
        async with asyncio.timeout(5):
            await broadcaster.stop()


async def started(make: Factory, pod_id: str = "pod-a") -> tuple[Broadcaster, Delivered]:
    delivered: Delivered = []

    def deliver(room: str | None, payload: bytes) -> int:
        delivered.append((room, payload))
        return 1

    broadcaster = make(pod_id)
    async with asyncio.timeout(5):
        await broadcaster.start(deliver)
    return broadcaster, delivered


async def test_is_a_broadcaster(make: Factory) -> None:
    assert isinstance(make("pod-a"), Broadcaster)


async def test_publish_before_start_raises_state_error(make: Factory) -> None:
    with pytest.raises(StateError):
        make("pod-a").publish(message("general", "hi"))


async def test_start_twice_raises_state_error(make: Factory) -> None:
    broadcaster, _ = await started(make)
    with pytest.raises(StateError):
        await broadcaster.start(lambda room, payload: 0)


async def test_link_is_up_after_start_when_the_backend_is_up(make: Factory) -> None:
    broadcaster, _ = await started(make)
    assert broadcaster.state in (LinkState.LOCAL_ONLY, LinkState.CONNECTED)
    assert broadcaster.stats()["state"] == broadcaster.state.value


@pytest.mark.parametrize("room", ["general", None])
async def test_publish_delivers_locally_once_at_once(make: Factory, room: str | None) -> None:
    broadcaster, delivered = await started(make)
    if room is not None:
        broadcaster.subscribe(room)
    msg = message(room, "hi")
    broadcaster.publish(msg)
    assert delivered == [(room, msg.encode())]  # synchronously, before any await
    decoded = orjson.loads(delivered[0][1])
    assert decoded["type"] == "message"
    assert decoded["data"] == "hi"

    async def echo_came_back() -> bool:  # a local-only broadcaster has no echo
        return int(broadcaster.stats().get("skipped_own", 1)) >= 1  # type: ignore[call-overload]

    await eventually(echo_came_back, timeout=5)
    assert delivered == [(room, msg.encode())]


async def test_publish_keeps_the_order_of_calls(make: Factory) -> None:
    broadcaster, delivered = await started(make)
    broadcaster.subscribe("general")
    for n in range(100):
        broadcaster.publish(message("general", f"m{n}", n))
    assert [orjson.loads(p)["data"] for _, p in delivered] == [f"m{n}" for n in range(100)]


async def test_subscribe_and_unsubscribe_are_idempotent_and_never_raise(make: Factory) -> None:
    broadcaster, _ = await started(make)
    broadcaster.unsubscribe("never-joined")
    broadcaster.subscribe("general")
    broadcaster.subscribe("general")
    broadcaster.unsubscribe("general")
    broadcaster.unsubscribe("general")
    broadcaster.subscribe("general")


async def test_stats_name_state_and_counters_without_secrets(make: Factory) -> None:
    broadcaster, _ = await started(make)
    broadcaster.subscribe("general")
    broadcaster.publish(message("general", "hi"))
    stats = dict(broadcaster.stats())
    assert {"kind", "state", "published"} <= stats.keys()
    text = orjson.dumps(stats).decode()
    assert "password" not in text
    assert "redis://" not in text


async def test_stop_is_idempotent_and_final(make: Factory) -> None:
    broadcaster, _ = await started(make)
    broadcaster.subscribe("general")
    await broadcaster.stop()
    await broadcaster.stop()
    assert broadcaster.state is LinkState.STOPPED
    with pytest.raises(StateError):
        broadcaster.publish(message("general", "late"))


async def test_a_second_pod_receives_what_the_first_publishes(
    make: Factory, request: pytest.FixtureRequest
) -> None:
    if isinstance(make("probe"), MemoryBroadcaster):
        pytest.skip("a local-only broadcaster has no other pods")
    a, from_a = await started(make, "pod-a")
    b, from_b = await started(make, "pod-b")
    b.subscribe("general")
    # wait until b's subscription is confirmed by Redis
    await eventually(_subscribed(b, 3))
    msg = message("general", "across")
    a.publish(msg)
    a.publish(message(None, "to everyone", 2))

    async def both() -> bool:
        return len(from_b) == 2

    await eventually(both, timeout=5)
    assert from_b == [("general", msg.encode()), (None, message(None, "to everyone", 2).encode())]
    assert len(from_a) == 2  # local delivery only, no echo from Redis


def _subscribed(broadcaster: Broadcaster, count: int) -> Callable[[], Any]:
    async def check() -> bool:
        return broadcaster.stats().get("subscribed_channels") == count

    return check
