"""Close code 1011, end to end: a frame whose answer fails with something
other than a protocol or broadcast error (a bug: no client input is known
to reach one, see ``test_fuzz``) closes that client's connection with 1011
``internal error``, on both transports, served in this process on a free
port to real WebSocket clients; the other clients and the pod carry on.

The bug is planted in the presence store (its ``members`` raises), so the
failing answer is one the transport waits for (a presence query): the
frames the client sent behind it wait for it, and are not served once it
failed (the client got no ack for them, and its connection is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import uvicorn
from aiohttp import web

from realtime import AiohttpTransport, AsgiTransport, MemoryBackend, Node, NodeSettings
from realtime.backends import Member
from realtime.backends.memory import MemoryPresence

from .support import connect, eventually, recv, recv_type, send

ServeNode = Callable[[Node], contextlib.AbstractAsyncContextManager[str]]


class BrokenMembers(MemoryPresence):
    async def members(self, room: str) -> list[Member]:
        raise RuntimeError("a planted bug")


class BrokenPresence(MemoryBackend):
    def presence(self, ttl: float) -> MemoryPresence:
        return BrokenMembers()


@contextlib.asynccontextmanager
async def aiohttp_server(node: Node) -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(AiohttpTransport(node).routes("/ws"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with node.running():
            yield f"ws://127.0.0.1:{port}/ws"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def asgi_server(node: Node) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        AsgiTransport(node, prefix="/ws"),
        log_level="critical",
        lifespan="off",
        ws="websockets-sansio",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with node.running():

            async def started() -> bool:
                return server.started

            await eventually(started)
            yield f"ws://127.0.0.1:{port}/ws"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@pytest.fixture(params=["aiohttp", "asgi"])
def serve(request: pytest.FixtureRequest) -> ServeNode:
    return aiohttp_server if request.param == "aiohttp" else asgi_server  # type: ignore[return-value]


async def joined(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws, _ = await connect(session, url)
    await send(ws, {"type": "join", "room": "r"})
    await recv_type(ws, "joined")
    return ws


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[Any, Any, list[Any]]:
    """Read until the server's Close: its code and reason, and the frames before it."""
    frames: list[Any] = []
    while True:
        frame = await recv(ws)
        if isinstance(frame, dict):
            frames.append(frame)
            continue
        assert frame.type is aiohttp.WSMsgType.CLOSE, frame
        return frame.data, frame.extra, frames


async def test_a_failed_answer_closes_its_client_with_1011_and_no_one_else(
    serve: ServeNode,
) -> None:
    node = Node(NodeSettings(pod_id="pod-a"), backend=BrokenPresence())
    async with serve(node) as url, aiohttp.ClientSession() as session:
        victim, other = await joined(session, url), await joined(session, url)
        # The query fails; the message sent right behind it waits for it.
        await send(victim, {"type": "presence", "room": "r", "ref": "p"})
        await send(victim, {"type": "message", "room": "r", "data": "behind", "ref": 1})
        code, reason, frames = await closed_with(victim)
        assert (code, reason) == (1011, "internal error")
        assert [f for f in frames if f["type"] in ("ack", "message", "presence")] == []

        # The other client, and the pod, carry on.
        await send(other, {"type": "message", "room": "r", "data": "still here", "ref": 2})
        got = await recv_type(other, "message")
        assert got["data"] == "still here"
        late = await joined(session, url)
        await send(other, {"type": "message", "room": "r", "data": "and here", "ref": 3})
        assert (await recv_type(late, "message"))["data"] == "and here"
        for ws in (other, late):
            await ws.close()
