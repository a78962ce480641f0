"""A message's ``key``: a resend after a lost ack is stored once (issue 12
item 5), on real pods, local-only and on a real Redis — through a Redis
stopped while the message is in flight, and through a pod killed between the
append script and its reply."""

from __future__ import annotations

import signal
from typing import Any

import aiohttp
import pytest

from realtime.backends.redis.scripts import APPEND

from .conftest import PodFactory, redis_pod_env
from .redis_support import RedisServer, ReplyCutter
from .support import Pod, connect, eventually, get_json, recv, recv_type, send, until_linked

pytestmark = pytest.mark.contract


async def ack_of(ws: aiohttp.ClientWebSocketResponse, ref: Any) -> dict[str, Any]:
    """The ack with ``ref`` (other frames are skipped)."""
    while True:
        frame = await recv_type(ws, "ack")
        if frame["ref"] == ref:
            return frame


async def messages_until_quiet(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[Any]:
    """The ``data`` of the next ``n`` message frames, then proof of quiet: a
    ping answered with nothing but its pong in between."""
    got = [(await recv_type(ws, "message"))["data"] for _ in range(n)]
    await send(ws, {"type": "ping", "ref": "quiet"})
    while True:
        frame = await recv(ws)
        assert isinstance(frame, dict)
        if frame["type"] == "pong":
            return got
        assert frame["type"] != "message", f"one more message: {frame}"


async def test_a_resend_with_the_same_key_is_acked_as_a_duplicate_and_stored_once(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    sender, _ = await connect(session, pod.ws_url("keys"))
    member, _ = await connect(session, pod.ws_url("keys"))
    message = {"type": "message", "data": {"text": "hi"}, "key": "k-1"}
    await send(sender, {**message, "ref": 1})
    first = await ack_of(sender, 1)
    assert "duplicate" not in first
    await send(sender, {**message, "ref": 2})  # the ack was "lost": send again
    again = await ack_of(sender, 2)
    assert again["duplicate"] is True
    assert (again["id"], again["offset"], again["epoch"]) == (
        first["id"],
        first["offset"],
        first["epoch"],
    )
    assert await messages_until_quiet(member, 1) == [{"text": "hi"}]
    # History has it once too.
    late, _ = await connect(session, pod.ws_url("keys", history="10"))
    sync = await recv_type(late, "sync")
    assert sync["replayed"] == 1
    for ws in (sender, member, late):
        await ws.close()


async def test_a_key_names_one_message_in_its_room(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    ann, _ = await connect(session, pod.ws_url("keys", name="ann"))
    bob, _ = await connect(session, pod.ws_url("keys", name="bob"))
    await send(ann, {"type": "message", "data": 1, "key": "same", "ref": "a"})
    first = await ack_of(ann, "a")
    await send(ann, {"type": "message", "data": 2, "key": "same", "ref": "b"})
    error = await recv_type(ann, "error")
    assert (error["code"], error["ref"]) == ("key_conflict", "b")
    # A resend comes from another connection (a guest's reconnect even has a
    # new user id): the key, not the sender, names the message.
    await send(bob, {"type": "message", "data": 1, "key": "same", "ref": "c"})
    again = await ack_of(bob, "c")
    assert again["duplicate"] is True
    assert (again["id"], again["offset"]) == (first["id"], first["offset"])
    # In another room it is another key.
    await send(bob, {"type": "join", "room": "other", "ref": "j"})
    await recv_type(bob, "joined")
    await send(bob, {"type": "message", "room": "other", "data": 1, "key": "same", "ref": "d"})
    elsewhere = await ack_of(bob, "d")
    assert ("duplicate" not in elsewhere, elsewhere["offset"]) == (True, 1)
    for ws in (ann, bob):
        await ws.close()


@pytest.mark.parametrize("key", ["", "x" * 65, 7, ["a"], "bad\nkey"])
async def test_a_key_must_be_a_short_string(
    pod: Pod, session: aiohttp.ClientSession, key: Any
) -> None:
    ws, _ = await connect(session, pod.ws_url("keys"))
    await send(ws, {"type": "message", "data": 1, "key": key, "ref": 9})
    error = await recv_type(ws, "error")
    assert (error["code"], error["ref"]) == ("invalid_frame", 9)
    assert "key" in error["message"]
    await ws.close()


async def test_a_room_remembers_its_last_idempotency_keys(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"IDEMPOTENCY_KEYS": "3"})
    ws, _ = await connect(session, pod.ws_url("keys"))
    for n in range(4):  # k0 is forgotten once the fourth key comes
        await send(ws, {"type": "message", "data": n, "key": f"k{n}", "ref": n})
        await ack_of(ws, n)
    await send(ws, {"type": "message", "data": 3, "key": "k3", "ref": "again3"})
    assert (await ack_of(ws, "again3"))["duplicate"] is True
    await send(ws, {"type": "message", "data": 0, "key": "k0", "ref": "again0"})
    fresh = await ack_of(ws, "again0")
    assert "duplicate" not in fresh
    assert fresh["offset"] == 5
    await ws.close()


# -- on a real Redis -------------------------------------------------------------------


@pytest.mark.aiohttp_only("one transport is enough for the Redis-side checks")
async def test_a_key_is_a_key_on_every_pod(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    shared_redis_url: str,
    channel_prefix: str,
) -> None:
    env = redis_pod_env(shared_redis_url, channel_prefix, IDEMPOTENCY_KEYS="3")
    a, b = pod_factory(env, name="a"), pod_factory(env, name="b")
    on_a, _ = await connect(session, a.ws_url("keys", name="ann"))
    on_b, _ = await connect(session, b.ws_url("keys", name="ann"))
    await send(on_a, {"type": "message", "data": "x", "key": "k", "ref": 1})
    first = await ack_of(on_a, 1)
    await send(on_b, {"type": "message", "data": "x", "key": "k", "ref": 2})
    again = await ack_of(on_b, 2)  # the resend on another pod
    assert again["duplicate"] is True
    assert (again["id"], again["offset"], again["epoch"]) == (
        first["id"],
        first["offset"],
        first["epoch"],
    )
    for n in range(3):  # k is forgotten after three more keys
        await send(on_a, {"type": "message", "data": n, "key": f"k{n}", "ref": f"m{n}"})
        await ack_of(on_a, f"m{n}")
    await send(on_a, {"type": "message", "data": "x", "key": "k", "ref": 3})
    assert "duplicate" not in await ack_of(on_a, 3)
    await send(on_a, {"type": "message", "data": "y", "key": "k2", "ref": 4})
    error = await recv_type(on_a, "error")
    assert (error["code"], error["ref"]) == ("key_conflict", 4)
    assert first["offset"] == 1
    for ws in (on_a, on_b):
        await ws.close()


async def stats(session: aiohttp.ClientSession, pod: Pod) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
    return result


@pytest.mark.slow
@pytest.mark.aiohttp_only("one transport is enough for the Redis-side checks")
async def test_a_resend_through_a_stopped_redis_is_stored_once(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    redis_server: RedisServer,
    channel_prefix: str,
) -> None:
    """Redis stops (SIGSTOP) with the message in flight: the ack says
    ``offset: null`` (not confirmed). Redis resumes and stores it. The client
    resends it with its key, as the chat page does: stored once, shown once."""
    env = redis_pod_env(redis_server.url, channel_prefix)
    a, b = pod_factory(env, name="a"), pod_factory(env, name="b")
    sender, _ = await connect(session, a.ws_url("stall"))
    member, _ = await connect(session, b.ws_url("stall"))
    await send(sender, {"type": "message", "data": "warm", "key": "w", "ref": "w"})
    await ack_of(sender, "w")
    assert await messages_until_quiet(member, 1) == ["warm"]
    redis_server.pause()
    try:
        await send(sender, {"type": "message", "data": "stalled", "key": "s", "ref": 1})
        unconfirmed = await ack_of(sender, 1)  # after REDIS_HEARTBEAT_TIMEOUT (1 s)
        assert (unconfirmed["offset"], unconfirmed["epoch"]) == (None, None)
    finally:
        redis_server.resume()

    async def connected() -> bool:
        return bool((await stats(session, a))["broadcaster"]["state"] == "connected")

    await eventually(connected)
    timeline = (await stats(session, a))["timeline"]
    await send(sender, {"type": "message", "data": "stalled", "key": "s", "ref": 2})
    again = await ack_of(sender, 2)
    assert again["offset"] == 2, again
    if timeline["unknown"]:  # written before Redis stopped: it ran when it resumed
        assert again.get("duplicate") is True, again
    else:
        # Never written: a batch (a heartbeat) was in flight when Redis
        # stopped, and the link was given up with the message still queued
        # (a busy host makes that window wider). The resend stores it.
        assert timeline["unstamped"] == 1, timeline
        assert "duplicate" not in again, again
    assert await messages_until_quiet(member, 1) == ["stalled"]
    for ws in (sender, member):
        await ws.close()


@pytest.mark.slow
@pytest.mark.aiohttp_only("one transport is enough for the Redis-side checks")
async def test_a_resend_after_the_sending_pod_died_before_the_reply_is_stored_once(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    redis_server: RedisServer,
    channel_prefix: str,
) -> None:
    """The append script ran, and the pod was killed before its reply came:
    the sender never got an ack. It reconnects to another pod and resends
    with its key: acked as a duplicate, with the stored offset, shown once."""
    cutter = await ReplyCutter(redis_server.port).start()
    try:
        a = pod_factory(redis_pod_env(cutter.url, channel_prefix), name="a")
        b = pod_factory(redis_pod_env(redis_server.url, channel_prefix), name="b")
        await until_linked(a, b)  # a's link through the cutter may start down
        member, _ = await connect(session, b.ws_url("died"))
        sender, _ = await connect(session, a.ws_url("died", name="ann"))
        cutter.arm(APPEND.sha.encode(), hold=True)  # the reply never comes back
        await send(sender, {"type": "message", "data": "last words", "key": "lw", "ref": 1})
        assert await messages_until_quiet(member, 1) == ["last words"]  # it was stored
        assert cutter.cut == 1
        a.signal(signal.SIGKILL)
        a.wait()
        await sender.close()
        again, _ = await connect(session, b.ws_url("died", name="ann"))
        await send(again, {"type": "message", "data": "last words", "key": "lw", "ref": 2})
        ack = await ack_of(again, 2)
        assert (ack["duplicate"], ack["offset"]) == (True, 1)
        await send(member, {"type": "ping", "ref": "quiet"})
        assert (await recv(member))["type"] == "pong"  # no second copy came before it
        for ws in (member, again):
            await ws.close()
    finally:
        await cutter.stop()
