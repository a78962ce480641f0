"""The ``refresh`` frame: a new token on an open connection, same user,
new expiry and rooms, without reconnecting."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import aiohttp

from .conftest import PodFactory
from .security_support import SECRET, claims, hs_token
from .support import DEFAULT_TIMEOUT, connect, recv, recv_type, send


async def frames_until(ws: aiohttp.ClientWebSocketResponse, until: float) -> list[Any]:
    """Every frame received until the Unix time ``until``."""
    frames = []
    with contextlib.suppress(TimeoutError):
        while (left := until - time.time()) > 0:
            frames.append(await recv(ws, timeout=left))
    return frames


HS_ENV = {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "AUTH_LEEWAY_SECONDS": "0"}


async def test_a_refresh_moves_the_expiry_and_keeps_the_connection(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(HS_ENV)
    short = claims("ada", ttl=3)
    ws, welcome = await connect(session, pod.ws_url("general", access_token=hs_token(short)))
    assert welcome["expires_at"] == short["exp"]
    longer = claims("ada", ttl=600)
    await send(ws, {"type": "refresh", "token": hs_token(longer), "ref": "r1"})
    refreshed = await recv_type(ws, "refreshed")
    assert refreshed == {"type": "refreshed", "ref": "r1", "expires_at": longer["exp"]}
    # the old expiry passes: no close, only the room's own frames
    frames = await frames_until(ws, short["exp"] + 1.5)
    assert all(isinstance(frame, dict) for frame in frames), frames
    await send(ws, {"type": "message", "data": "still here", "ref": 2})
    assert (await recv_type(ws, "ack"))["ref"] == 2
    await ws.close()


async def test_a_bad_refresh_changes_nothing_and_the_old_expiry_still_closes(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(HS_ENV)
    short = claims("bob", ttl=3)
    ws, _ = await connect(session, pod.ws_url("general", access_token=hs_token(short)))
    now = int(time.time())
    bad = {
        "garbage": "not.a.token",
        "wrong key": hs_token(claims("bob"), secret="x" * 32),
        "expired": hs_token({**claims("bob"), "exp": now - 60}),
        "another user": hs_token(claims("mallory", ttl=600)),
    }
    for ref, token in bad.items():
        await send(ws, {"type": "refresh", "token": token, "ref": ref})
        error = await recv_type(ws, "error")
        assert (error["code"], error["ref"]) == ("invalid_token", ref), error
    await send(ws, {"type": "refresh", "ref": "none"})
    error = await recv_type(ws, "error")
    assert (error["code"], error["ref"]) == ("invalid_frame", "none")
    while isinstance(msg := await recv(ws, timeout=DEFAULT_TIMEOUT), dict):
        pass  # presence events
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert (msg.data, msg.extra) == (1008, "token expired")


async def test_rooms_the_new_token_may_not_join_are_left_with_a_reason(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(HS_ENV)
    both = hs_token(claims("cy", rooms=["general", "ops-*"]))
    ws, _ = await connect(session, pod.ws_url("general", access_token=both))
    await send(ws, {"type": "join", "room": "ops-1", "ref": "j"})
    assert (await recv_type(ws, "joined"))["room"] == "ops-1"
    await send(ws, {"type": "refresh", "token": hs_token(claims("cy", rooms=["general"]))})
    await recv_type(ws, "refreshed")
    left = await recv_type(ws, "left")
    assert left == {"type": "left", "room": "ops-1", "ref": None, "reason": "forbidden_room"}
    await send(ws, {"type": "join", "room": "ops-1", "ref": "again"})
    error = await recv_type(ws, "error")
    assert (error["code"], error["ref"]) == ("forbidden_room", "again")
    # the room still allowed is kept
    await send(ws, {"type": "message", "data": "hi", "ref": 3})
    assert (await recv_type(ws, "ack"))["room"] == "general"
    await ws.close()


async def test_a_refresh_without_auth_is_refused(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory()
    ws, welcome = await connect(session, pod.ws_url("general"))
    assert welcome["expires_at"] is None
    await send(ws, {"type": "refresh", "token": "anything", "ref": 1})
    error = await recv_type(ws, "error")
    assert (error["code"], error["ref"]) == ("invalid_token", 1)
    await ws.close()
