"""Presence: lists, join/leave events, and cleanup after a pod is killed."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from .conftest import PodFactory, redis_pod_env
from .security_support import SECRET, claims, hs_token
from .support import DEFAULT_TIMEOUT, Pod, connect, eventually, get_json, recv, recv_type, send


async def presence_of(ws: aiohttp.ClientWebSocketResponse, room: str) -> list[dict[str, Any]]:
    await send(ws, {"type": "presence", "room": room, "ref": "p"})
    frame = await recv_type(ws, "presence")
    assert frame["room"] == room
    assert frame["ref"] == "p"
    members: list[dict[str, Any]] = frame["members"]
    return members


async def event_for(ws: aiohttp.ClientWebSocketResponse, kind: str, name: str) -> dict[str, Any]:
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        while True:
            frame = await recv_type(ws, kind)
            if frame["user"]["name"] == name:
                return frame


async def test_presence_list_events_and_route_on_one_pod(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    before = int(time.time() * 1000)
    ann, wa = await connect(session, pod.ws_url("lobby", name="Ann"))
    bob, wb = await connect(session, pod.ws_url("lobby", name="Bob"))
    joined = await event_for(ann, "member_joined", "Bob")
    assert joined["room"] == "lobby"
    assert joined["user"] == wb["user"]
    assert joined["ts"] >= before
    members = await presence_of(ann, "lobby")
    assert [(m["id"], m["name"]) for m in members] == [
        (wa["user"]["id"], "Ann"),
        (wb["user"]["id"], "Bob"),
    ]
    assert all(m["since"] >= before for m in members)
    listed = await get_json(session, f"{pod.base}/api/chat-api/rooms/lobby/presence")
    assert listed == {"room": "lobby", "members": members}
    await bob.close()
    left = await event_for(ann, "member_left", "Bob")
    assert left["user"] == wb["user"]
    assert [m["name"] for m in await presence_of(ann, "lobby")] == ["Ann"]
    await ann.close()


async def test_presence_of_a_room_not_joined_is_refused(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    ws, _ = await connect(session, pod.ws_url("lobby"))
    await send(ws, {"type": "presence", "room": "elsewhere", "ref": 3})
    error = await recv_type(ws, "error")
    assert (error["code"], error["ref"]) == ("not_in_room", 3)
    await ws.close()


@pytest.mark.slow
async def test_presence_across_pods_and_cleanup_after_kill(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    shared_redis_url: str,
    channel_prefix: str,
) -> None:
    # Short, but with room for a loaded machine: pods refresh every ttl / 3 = 1 s,
    # and a live pod's entries outlive a refresh that comes 2 s late.
    ttl = 3.0
    env = redis_pod_env(shared_redis_url, channel_prefix, PRESENCE_TTL=str(ttl))
    a, b = pod_factory(env, name="pod-a"), pod_factory(env, name="pod-b")
    ann, _ = await connect(session, a.ws_url("lobby", name="Ann"))
    bob, wb = await connect(session, b.ws_url("lobby", name="Bob"))
    await event_for(ann, "member_joined", "Bob")
    await event_for(bob, "member_joined", "Bob")  # Bob's pod delivers its own events too
    names = sorted(m["name"] for m in await presence_of(ann, "lobby"))
    assert names == ["Ann", "Bob"]
    listed = await get_json(session, f"{b.base}/api/chat-api/rooms/lobby/presence")
    assert sorted(m["name"] for m in listed["members"]) == ["Ann", "Bob"]

    b.signal(signal.SIGKILL)
    killed = time.monotonic()
    left = await event_for(ann, "member_left", "Bob")
    assert left["user"] == wb["user"]
    # Documented bound: PRESENCE_TTL plus one refresh period (a third of it),
    # and 2 s for a loaded machine.
    assert time.monotonic() - killed < ttl + ttl / 3 + 2.0
    assert [m["name"] for m in await presence_of(ann, "lobby")] == ["Ann"]
    await ann.close()


async def test_a_user_with_several_connections_is_one_member(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET})
    admin = {"Authorization": f"Bearer {hs_token(claims('ops', admin=True))}"}

    def url(sub: str, name: str, **query: str) -> str:
        return pod.ws_url("lobby", access_token=hs_token(claims(sub, name=name)), **query)

    async def names() -> list[str]:
        route = f"{pod.base}/api/chat-api/rooms/lobby/presence"
        async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(route, headers=admin) as resp:
            return [m["name"] for m in (await resp.json())["members"]]

    async def listed(expected: list[str]) -> None:
        async def check() -> bool:
            return await names() == expected

        await eventually(check)

    watcher, _ = await connect(session, url("w", "Watcher"))
    events: list[dict[str, Any]] = []

    async def record() -> None:
        while isinstance(frame := await recv(watcher, timeout=60), dict):
            if frame["type"] in ("member_joined", "member_left"):
                events.append(frame)

    recording = asyncio.create_task(record())
    try:
        first, _ = await connect(session, url("u1", "Ann"))
        second, _ = await connect(session, url("u1", "Ann"))  # the same user again
        await listed(["Watcher", "Ann"])  # once
        await first.close()  # Ann is still here, on her second connection
        bob, _ = await connect(session, url("u2", "Bob"))
        await listed(["Watcher", "Ann", "Bob"])
        await second.close()  # now she has gone
        carol, _ = await connect(session, url("u3", "Carol"))
        await listed(["Watcher", "Bob", "Carol"])
        # Events are not replayed: a newcomer asking for history gets none.
        late, _ = await connect(session, url("u4", "Dan", history="10"))
        sync = await recv_type(late, "sync")
        assert (sync["replayed"], sync["complete"]) == (0, True)

        async def dan_announced() -> bool:  # the last write: all before it is in
            return any(e["user"]["name"] == "Dan" for e in events)

        await eventually(dan_announced)
    finally:
        recording.cancel()
        await asyncio.gather(recording, return_exceptions=True)
    ann = [e["type"] for e in events if e["user"]["name"] == "Ann"]
    assert ann == ["member_joined", "member_left"], events
    assert all("offset" not in e for e in events)  # not part of the room's offsets
    for ws in (watcher, bob, carol, late):
        await ws.close()


@pytest.mark.slow
async def test_clients_of_a_pod_shut_down_gracefully_move_without_a_leave_join_storm(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    shared_redis_url: str,
    channel_prefix: str,
) -> None:
    ttl = 3.0
    env = redis_pod_env(
        shared_redis_url,
        channel_prefix,
        PRESENCE_TTL=str(ttl),
        AUTH_ENABLED="true",
        AUTH_JWT_SECRET=SECRET,
    )
    a, b = pod_factory(env, name="pod-a"), pod_factory(env, name="pod-b")

    def url(pod: Pod, sub: str, name: str) -> str:
        return pod.ws_url("lobby", access_token=hs_token(claims(sub, name=name)))

    bob, _ = await connect(session, url(b, "u-bob", "Bob"))
    ann, _ = await connect(session, url(a, "u-ann", "Ann"))
    await event_for(bob, "member_joined", "Ann")
    events: list[dict[str, Any]] = []

    async def record() -> None:
        while isinstance(frame := await recv(bob, timeout=60), dict):
            if frame["type"] in ("member_joined", "member_left", "presence"):
                events.append(frame)

    recording = asyncio.create_task(record())
    try:
        assert a.stop() == 0  # graceful: Ann gets 1001 and reconnects to pod b
        while isinstance(closed := await recv(ann), dict):
            pass  # its own presence events
        assert closed.data == 1001
        ann, _ = await connect(session, url(b, "u-ann", "Ann"))
        # Pod a's entries expire within the TTL and are pruned by pod b's next
        # refresh (a third of it later): wait until only pod b is left in the
        # room's set of pods, the moment a member_left would have come.
        pods_key = f"{channel_prefix}:room:{{lobby}}:pods"
        client = aioredis.from_url(shared_redis_url)
        try:

            async def pod_a_pruned() -> bool:
                return int(await client.zcard(pods_key)) == 1

            await eventually(pod_a_pruned, timeout=3 * ttl)
        finally:
            await client.aclose()
        carol, _ = await connect(session, url(b, "u-carol", "Carol"))

        async def carol_announced() -> bool:  # later writes come later
            return any(e.get("user", {}).get("name") == "Carol" for e in events)

        await eventually(carol_announced)
    finally:
        recording.cancel()
        await asyncio.gather(recording, return_exceptions=True)
    about_ann = [e for e in events if e.get("user", {}).get("name") == "Ann"]
    assert about_ann == [], events
    assert not [e for e in events if e["type"] == "presence"], events
    names = sorted(m["name"] for m in await presence_of(bob, "lobby"))
    assert names == ["Ann", "Bob", "Carol"]
    for ws in (ann, bob, carol):
        await ws.close()
