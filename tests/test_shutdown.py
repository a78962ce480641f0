"""Graceful shutdown of a real process: 1001 to everyone, exit 0, no traceback."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from .conftest import PodFactory
from .support import (
    Pod,
    connect,
    eventually,
    raw_ws_connect,
    read_frame,
    read_until_close,
    recv,
    recv_type,
    send,
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_every_connection_with_1001_and_exits_0(
    pod_factory: PodFactory, session: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    pod = pod_factory({"SHUTDOWN_TIMEOUT": "5"})
    clients = [(await connect(session, pod.ws_url(room)))[0] for room in ("a", "a", None)]
    await send(clients[0], {"type": "message", "data": "before"})
    await recv_type(clients[1], "message")
    started = time.monotonic()
    pod.signal(sig)
    for ws in clients:
        msg = await recv_type_or_close(ws)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1001
        assert msg.extra == "server shutting down"
    assert pod.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert "Traceback" not in pod.log
    assert "Task was destroyed" not in pod.log
    assert "stopped" in pod.log


async def recv_type_or_close(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    while True:
        frame = await recv(ws)
        if not isinstance(frame, dict):
            return frame


async def test_readiness_turns_false_and_new_connections_are_refused_while_draining(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"SHUTDOWN_DRAIN_DELAY": "30", "SHUTDOWN_TIMEOUT": "40"})
    ws, _ = await connect(session, pod.ws_url("a"))
    pod.signal(signal.SIGTERM)

    async def not_ready() -> bool:
        async with asyncio.timeout(10), session.get(f"{pod.base}/readyz") as resp:
            body = await resp.json()
            return resp.status == 503 and body["ready"] is False and body["draining"] is True

    await eventually(not_ready)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        async with asyncio.timeout(10):
            await session.ws_connect(pod.ws_url("a"))
    assert info.value.status == 503
    # Existing connections are still served during the drain delay...
    await send(ws, {"type": "message", "data": "still served"})
    assert (await recv_type(ws, "message"))["data"] == "still served"
    # ...and a second signal ends it at once.
    pod.signal(signal.SIGTERM)
    msg = await recv_type_or_close(ws)
    assert msg.data == 1001
    assert pod.wait(timeout=10) == 0
    assert "Traceback" not in pod.log


async def test_start_up_line_names_address_pod_and_mode(pod_factory: PodFactory) -> None:
    pod = pod_factory(name="alpha")
    line = pod.wait_for_log("listening on")
    assert f"http://127.0.0.1:{pod.port}" in line
    assert "pod=alpha" in line
    assert "local-only (REDIS_URL is not set)" in line


def test_console_script_starts_the_same_service() -> None:
    script = Path(sys.executable).with_name("chat-api")
    pod = Pod(name="script", command=[str(script)])
    try:
        pod.start()
        assert "local-only" in pod.wait_for_log("listening on")
        assert pod.stop() == 0
    finally:
        pod.kill()


def test_shutdown_timeout_forces_the_exit_when_a_client_never_closes(
    pod_factory: PodFactory,
) -> None:
    timeout = 2.0
    pod = pod_factory({"SHUTDOWN_TIMEOUT": str(timeout), "WS_CLOSE_TIMEOUT": "60"})
    sock = raw_ws_connect(pod.port, "/api/chat-api/ws/general")
    try:
        assert read_frame(sock) is not None  # welcome
        started = time.monotonic()
        pod.signal(signal.SIGTERM)
        _, close = read_until_close(sock)
        assert close is not None
        assert close.close == (1001, "server shutting down")
        # ...and this client never answers it, nor lets go.
        code = pod.wait(timeout=timeout + 10)
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert "exiting anyway" in pod.log, pod.log
    assert timeout * 0.75 <= elapsed < timeout + 3, elapsed
    assert code == 0
    assert "Traceback" not in pod.log
