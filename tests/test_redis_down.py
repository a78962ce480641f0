"""What the protocol promises while Redis is down: a real pod on a real
redis-server that the test stops.

The pod keeps serving its own clients: a room message reaches this pod's
members without an offset (it is not stored), its ack says ``offset: null``,
the stats count it as ``timeline.unstamped``; what needs Redis answers
"unavailable": the publish API (503), the presence route (503), the
``presence`` frame (an ``unavailable`` error) and a catch-up in a room the
pod has no state of (``sync`` with ``reason: unavailable``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from .conftest import PodFactory, redis_pod_env
from .redis_support import RedisServer
from .support import DEFAULT_TIMEOUT, Pod, connect, eventually, get_json, recv, recv_type, send

pytestmark = pytest.mark.slow

KEY = "publish-key"


async def stats(session: aiohttp.ClientSession, pod: Pod) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
    return result


async def link_up(session: aiohttp.ClientSession, pod: Pod) -> bool:
    return bool((await get_json(session, f"{pod.base}/readyz"))["link_up"])


class Down:
    """A pod whose Redis is stopped, with two members of room ``general``."""

    def __init__(
        self, pod: Pod, a: aiohttp.ClientWebSocketResponse, b: aiohttp.ClientWebSocketResponse
    ) -> None:
        self.pod, self.a, self.b = pod, a, b


@pytest.fixture
async def down(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> AsyncIterator[Down]:
    pod = pod_factory(redis_pod_env(redis_server.url, channel_prefix, PUBLISH_API_KEY=KEY))
    a, _ = await connect(session, pod.ws_url("general", name="Ann"))
    b, _ = await connect(session, pod.ws_url("general", name="Bob"))

    async def subscribed() -> bool:
        return redis_server.numsub(f"{channel_prefix}:room:general") == 1

    await eventually(subscribed)
    # While Redis is up, room messages are stored: offset 1.
    await send(a, {"type": "message", "data": "stored", "ref": "up"})
    assert (await recv_type(a, "ack"))["offset"] == 1
    assert (await recv_type(b, "message"))["offset"] == 1

    redis_server.stop()

    async def link_down() -> bool:
        return not await link_up(session, pod)

    await eventually(link_down)
    yield Down(pod, a, b)
    await a.close()
    await b.close()


async def message_frame(ws: aiohttp.ClientWebSocketResponse, data: str) -> dict[str, Any]:
    """The next ``message`` frame with this ``data`` (presence events pass by)."""
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        while (frame := await recv_type(ws, "message"))["data"] != data:
            pass
    return frame


async def test_a_room_message_reaches_this_pods_members_unstamped_and_its_ack_says_null(
    down: Down, session: aiohttp.ClientSession
) -> None:
    before = (await stats(session, down.pod))["timeline"]["unstamped"]
    await send(down.a, {"type": "message", "data": "while down", "ref": "d1"})
    for ws in (down.a, down.b):
        frame = await message_frame(ws, "while down")
        assert set(frame) == {"type", "room", "id", "from", "ts", "data"}, frame  # no offset
        assert frame["room"] == "general"
        assert frame["from"]["name"] == "Ann"
    ack = await recv_type(down.a, "ack")
    assert ack == {
        "type": "ack",
        "ref": "d1",
        "id": frame["id"],
        "room": "general",
        "offset": None,
        "epoch": None,
    }
    after = await stats(session, down.pod)
    assert after["timeline"]["unstamped"] == before + 1
    assert after["broadcaster"]["state"] == "reconnecting"
    # Messages to everyone go on locally too.
    g, _ = await connect(session, down.pod.ws_url())
    await send(g, {"type": "message", "data": "to all", "ref": "g"})
    assert (await message_frame(down.a, "to all"))["room"] is None
    assert (await recv_type(g, "ack"))["ref"] == "g"
    await g.close()


async def test_the_publish_api_answers_503_unavailable(
    down: Down, session: aiohttp.ClientSession
) -> None:
    url = f"{down.pod.base}/api/chat-api/rooms/general/messages"
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "while-down"}
    # The route waits for the store's answer: up to its own 10 s, then 503.
    async with asyncio.timeout(30), session.post(url, json={"data": 1}, headers=headers) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "unavailable"
    # Not delivered either (it was not stored): the next frame is the probe's pong.
    await send(down.b, {"type": "ping", "ref": "probe"})
    frame = await recv(down.b)
    while frame.get("type") in ("member_joined", "member_left", "presence"):
        frame = await recv(down.b)
    assert frame == {"type": "pong", "ref": "probe"}


async def test_presence_answers_unavailable(down: Down, session: aiohttp.ClientSession) -> None:
    async with (
        asyncio.timeout(30),
        session.get(f"{down.pod.base}/api/chat-api/rooms/general/presence") as resp,
    ):
        assert resp.status == 503
    await send(down.a, {"type": "presence", "room": "general", "ref": "p"})
    async with asyncio.timeout(30):
        error = await recv_type(down.a, "error", timeout=30)
    assert (error["code"], error["ref"]) == ("unavailable", "p")


async def test_a_catch_up_in_a_room_new_to_the_pod_says_unavailable_and_goes_live(
    down: Down, session: aiohttp.ClientSession
) -> None:
    # A room this pod has never read the state of: nothing to catch up from.
    ws, _ = await connect(session, down.pod.ws_url("elsewhere", history="10"))
    sync = await recv_type(ws, "sync", timeout=30)
    assert (sync["complete"], sync["reason"], sync["replayed"]) == (False, "unavailable", 0)
    # Live: it gets what is sent now (unstamped).
    await send(down.a, {"type": "join", "room": "elsewhere"})
    await recv_type(down.a, "joined")
    await send(down.a, {"type": "message", "room": "elsewhere", "data": "live"})
    frame = await message_frame(ws, "live")
    assert (frame["room"], "offset" in frame) == ("elsewhere", False)
    await ws.close()
