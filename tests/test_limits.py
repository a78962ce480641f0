"""The limits that bound what a pod holds: a room's history in bytes (local
and in Redis), the pod's memory budget for catch-up, connections that never
became WebSockets, rooms-claim patterns that cannot backtrack, and an
idempotency key reused for another body."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import pytest

from .conftest import PodFactory, redis_pod_env
from .security_support import SECRET, claims, hs_token
from .support import connect, recv_type, send
from .test_history import messages

KB = 1024
BIG = "x" * (20 * KB)
"""A message of about 20 KB: a few of them reach the byte caps below."""


async def send_big(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict[str, Any]]:
    """Send ``n`` big messages, one at a time; their acks (the message
    frames that come before each ack are skipped)."""
    acks = []
    for i in range(n):
        await send(ws, {"type": "message", "data": {"n": i, "pad": BIG}, "ref": i})
        acks.append(await recv_type(ws, "ack"))
    return acks


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_a_rooms_history_is_capped_in_bytes(
    store: str,
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    request: pytest.FixtureRequest,
    channel_prefix: str,
) -> None:
    env = {"HISTORY_MAX_BYTES": str(64 * KB), "HISTORY_LENGTH": "100"}
    if store == "redis":
        env.update(redis_pod_env(request.getfixturevalue("shared_redis_url"), channel_prefix))
    pod = pod_factory(env)
    sender, _ = await connect(session, pod.ws_url("heavy"))
    await send_big(sender, 8)  # about 160 KB: only the newest three fit in 64 KB
    ws, _ = await connect(session, pod.ws_url("heavy", history="100"))
    sync = await recv_type(ws, "sync")
    assert sync["offset"] == 8
    assert 1 <= sync["replayed"] <= 3, sync
    got = await messages(ws, sync["replayed"])
    assert [m["offset"] for m in got] == list(range(9 - sync["replayed"], 9))
    assert sum(len(m["data"]["pad"]) for m in got) <= 64 * KB
    await sender.close()
    await ws.close()


async def test_rooms_past_the_pods_memory_budget_are_dropped_and_a_resume_is_told(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"HISTORY_MEMORY_BYTES": str(64 * KB)})  # local-only
    ws, _ = await connect(session, pod.ws_url("first"))
    first = await send_big(ws, 2)
    # three more rooms of 40 KB each: the least recently used, "first", goes
    for room in ("second", "third", "fourth"):
        await send(ws, {"type": "join", "room": room})
        await recv_type(ws, "joined")
        for i in range(2):
            await send(ws, {"type": "message", "room": room, "data": {"pad": BIG}, "ref": i})
            await recv_type(ws, "ack")
    await ws.close()
    back, _ = await connect(session, pod.ws_url("first", since="1", epoch=first[0]["epoch"]))
    sync = await recv_type(back, "sync")
    assert sync["complete"] is False, sync
    # the room's offsets are kept, its messages are not: message 2 is gone
    assert (sync["reason"], sync["epoch"], sync["offset"]) == (
        "window_exceeded",
        first[0]["epoch"],
        2,
    ), sync
    assert sync["replayed"] == 0
    async with session.get(f"{pod.base}/api/chat-api/ws/stats") as resp:
        stats = await resp.json()
    assert stats["broadcaster"]["history_bytes"] <= 64 * KB
    assert stats["broadcaster"]["history_shed"] >= 1
    await back.close()


def test_connections_that_are_not_websockets_are_capped(pod_factory: PodFactory) -> None:
    pod = pod_factory({"MAX_PENDING_CONNECTIONS": "3", "HTTP_REQUEST_TIMEOUT": "30"})
    held = [socket.create_connection(("127.0.0.1", pod.port), timeout=5) for _ in range(3)]
    try:
        for sock in held:  # started requests, never finished
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        extra = socket.create_connection(("127.0.0.1", pod.port), timeout=5)
        extra.settimeout(5)
        with extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            try:
                answer = extra.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert answer == b"", answer[:80]  # cut at once, no answer
    finally:
        for sock in held:
            sock.close()

    # once they are gone, requests are served again
    def healthy() -> bool:
        with socket.create_connection(("127.0.0.1", pod.port), timeout=5) as sock:
            sock.settimeout(5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            try:
                return sock.recv(1024).startswith(b"HTTP/1.1 200")
            except ConnectionResetError:
                return False

    deadline = time.monotonic() + 10
    while not healthy():
        assert time.monotonic() < deadline, "the pod never served again"


async def test_a_backtracking_rooms_pattern_costs_nobody_else(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET})
    evil = hs_token(claims("eve", rooms=["general", "a*a*a*a*a*a*a*a*a*a*a*a*b"]))
    bystander, _ = await connect(session, pod.ws_url("general", access_token=hs_token(claims("b"))))
    ws, _ = await connect(session, pod.ws_url("general", access_token=evil))
    started = time.monotonic()
    for ref in range(20):  # each one a regex backtracking for seconds, before
        await send(ws, {"type": "join", "room": "a" * 63, "ref": ref})
    for _ in range(20):
        assert (await recv_type(ws, "error"))["code"] == "forbidden_room"
    await send(bystander, {"type": "ping", "ref": "p"})
    assert (await recv_type(bystander, "pong"))["ref"] == "p"
    # generous for a loaded machine; the backtracking took seconds per join
    assert time.monotonic() - started < 5
    await ws.close()
    await bystander.close()


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_an_idempotency_key_reused_for_another_body_is_a_conflict(
    store: str,
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    request: pytest.FixtureRequest,
    channel_prefix: str,
) -> None:
    env = {"PUBLISH_API_KEY": "k"}
    if store == "redis":
        env.update(redis_pod_env(request.getfixturevalue("shared_redis_url"), channel_prefix))
    pod = pod_factory(env)
    url = f"{pod.base}/api/chat-api/rooms/news/messages"
    headers = {"Authorization": "Bearer k", "Idempotency-Key": "same"}

    async def post(data: Any) -> tuple[int, Any]:
        async with (
            asyncio.timeout(10),
            session.post(url, json={"data": data}, headers=headers) as r,
        ):
            return r.status, await r.json()

    assert (await post("one"))[0] == 201
    status, body = await post("two")
    assert (status, body["error"]) == (409, "idempotency_conflict")
    status, body = await post("one")
    assert (status, body["duplicate"], body["offset"]) == (200, True, 1)
    # and a WebSocket message with that key and other data: key_conflict
    ws, _ = await connect(session, pod.ws_url("news"))
    await send(ws, {"type": "message", "data": "three", "key": "same", "ref": 1})
    error = await recv_type(ws, "error")
    assert (error["code"], error["ref"]) == ("key_conflict", 1)
    await ws.close()
