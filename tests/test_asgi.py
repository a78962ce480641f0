"""The ASGI transport: the FastAPI example (``examples/fastapi_chat.py``) on
uvicorn, next to ``chat-api`` pods on one real Redis, and its own sign-in.

The protocol itself is checked on both transports by the contract tests
(``test_ws.py``, ``test_history.py``); here, what is particular to mixing
them and to embedding: the two kinds of pod share rooms, offsets and history
both ways, and the team's own auth decides who a connection is.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from .conftest import PodFactory, redis_pod_env
from .redis_support import RedisServer
from .support import DEFAULT_TIMEOUT, connect, recv_type, send


async def test_an_asgi_pod_and_a_chat_api_pod_share_a_room_both_ways(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    redis_server: RedisServer,
    channel_prefix: str,
) -> None:
    env = redis_pod_env(redis_server.url, channel_prefix)
    aio = pod_factory(env, name="aio", transport_name="aiohttp")
    asgi = pod_factory(env, name="asgi", transport_name="asgi")
    on_aio, welcome_aio = await connect(session, aio.ws_url("lobby"))
    on_asgi, welcome_asgi = await connect(session, asgi.ws_url("lobby"))
    assert (welcome_aio["pod"], welcome_asgi["pod"]) == ("aio", "asgi")
    everyone, _ = await connect(session, asgi.ws_url())

    await send(on_aio, {"type": "message", "data": "from aiohttp", "ref": 1})
    await send(on_asgi, {"type": "message", "data": "from asgi", "ref": 2})
    seen: dict[str, list[tuple[int, str]]] = {}
    for name, ws in (("aio", on_aio), ("asgi", on_asgi)):
        got = [await recv_type(ws, "message") for _ in range(2)]
        seen[name] = [(m["offset"], m["data"]) for m in got]
        assert len({m["epoch"] for m in got}) == 1
    assert seen["aio"] == seen["asgi"]  # one order, the same offsets on both pods
    assert sorted(offset for offset, _ in seen["aio"]) == [1, 2]

    # A late joiner on either kind of pod gets the same history.
    for pod in (aio, asgi):
        late, _ = await connect(session, pod.ws_url("lobby", history="10"))
        sync = await recv_type(late, "sync")
        assert (sync["replayed"], sync["complete"]) == (2, True)
        replayed = [await recv_type(late, "message") for _ in range(2)]
        assert [(m["offset"], m["data"]) for m in replayed] == seen["aio"]
        await late.close()

    # A message to everyone from a chat-api pod reaches the ASGI pod's /ws.
    global_sender, _ = await connect(session, aio.ws_url())
    await send(global_sender, {"type": "message", "data": "to all"})
    frame = await recv_type(everyone, "message")
    assert (frame["room"], frame["data"]) == (None, "to all")
    for ws in (on_aio, on_asgi, everyone, global_sender):
        await ws.close()


async def test_the_teams_own_sign_in_decides_who_a_connection_is(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"EXAMPLE_REQUIRE_LOGIN": "1"}, transport_name="asgi")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(pod.ws_url("lobby"))
    assert refused.value.status == 401
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        async with session.post(f"{pod.base}/login", params={"name": "ada"}) as resp:
            assert resp.status == 200
            cookie = resp.cookies["session"].value
    ws, welcome = await connect(
        session, pod.ws_url("lobby"), headers={"Cookie": f"session={cookie}"}
    )
    assert welcome["user"] == {"id": "user-ada", "name": "ada"}
    await send(ws, {"type": "message", "data": "signed in"})
    message = await recv_type(ws, "message")
    assert message["from"] == {"id": "user-ada", "name": "ada"}
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as foreign:
        await session.ws_connect(
            pod.ws_url("lobby"),
            headers={"Cookie": f"session={cookie}", "Origin": "https://evil.example"},
        )
    assert foreign.value.status == 403
