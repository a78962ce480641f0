"""The users API: a message to every connection of one user, and a
disconnect (with an optional ban), on every pod."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from .conftest import PodFactory, redis_pod_env
from .security_support import SECRET, claims, hs_token
from .support import DEFAULT_TIMEOUT, Pod, connect, recv, recv_type, send

KEY = "users-api-key"
AUTH = {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "PUBLISH_API_KEY": KEY}


async def post(
    session: aiohttp.ClientSession,
    pod: Pod,
    path: str,
    body: Any,
    *,
    key: str | None = KEY,
    idempotency_key: str | None = None,
) -> tuple[int, Any]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    url = f"{pod.base}/api/chat-api/users/{path}"
    async with asyncio.timeout(DEFAULT_TIMEOUT), session.post(url, json=body, headers=headers) as r:
        return r.status, await r.json()


async def user_ws(
    session: aiohttp.ClientSession, pod: Pod, user: str, room: str = "general"
) -> aiohttp.ClientWebSocketResponse:
    ws, welcome = await connect(session, pod.ws_url(room, access_token=hs_token(claims(user))))
    assert welcome["user"]["id"] == user
    return ws


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str]:
    while isinstance(frame := await recv(ws), dict):
        pass  # presence events, messages
    assert frame.type is aiohttp.WSMsgType.CLOSE, frame
    return frame.data, frame.extra


@pytest.fixture
def two_pods(
    pod_factory: PodFactory, shared_redis_url: str, channel_prefix: str
) -> tuple[Pod, Pod]:
    env = {**AUTH, **redis_pod_env(shared_redis_url, channel_prefix)}
    return pod_factory(env), pod_factory(env)


async def test_a_user_message_reaches_every_connection_of_the_user_on_every_pod(
    two_pods: tuple[Pod, Pod], session: aiohttp.ClientSession
) -> None:
    one, two = two_pods
    ada = [await user_ws(session, one, "ada"), await user_ws(session, one, "ada", "other")]
    ada.append(await user_ws(session, two, "ada"))
    bob = await user_ws(session, two, "bob")
    body = {"data": {"text": "your order shipped"}, "from": {"id": "shop", "name": "Shop"}}
    status, reply = await post(session, one, "ada/messages", body, idempotency_key="n-1")
    assert status == 202, reply
    assert reply["duplicate"] is False
    for ws in ada:
        got = await recv_type(ws, "message")
        assert (got["room"], got["to"]) == (None, "ada"), got
        assert (got["id"], got["data"], got["from"]) == (reply["id"], body["data"], body["from"])
        assert "offset" not in got
    # a retry, on the other pod, delivers nothing and names the first message
    status, again = await post(session, two, "ada/messages", body, idempotency_key="n-1")
    assert (status, again["id"], again["duplicate"]) == (200, reply["id"], True)
    status, conflict = await post(
        session, two, "ada/messages", {"data": "else"}, idempotency_key="n-1"
    )
    assert (status, conflict["error"]) == (409, "idempotency_conflict")
    status, _ = await post(session, two, "ada/messages", {"data": "next"})
    assert status == 202
    for ws in ada:  # the next thing each gets is the next message: no duplicate
        assert (await recv_type(ws, "message"))["data"] == "next"
    # bob got none of it: his next message is his own
    await send(bob, {"type": "message", "data": "mine", "ref": 1})
    assert (await recv_type(bob, "message"))["data"] == "mine"
    for ws in [*ada, bob]:
        await ws.close()


async def test_a_disconnect_closes_the_users_connections_everywhere_and_a_ban_holds(
    two_pods: tuple[Pod, Pod], session: aiohttp.ClientSession
) -> None:
    one, two = two_pods
    ada = [await user_ws(session, one, "ada"), await user_ws(session, two, "ada")]
    bob = await user_ws(session, one, "bob")
    body = {"code": 4003, "reason": "banned for spam", "ban_seconds": 60}
    status, reply = await post(session, two, "ada/disconnect", body, idempotency_key="ban-1")
    assert (status, reply["user"], reply["duplicate"]) == (202, "ada", False), reply
    for ws in ada:
        assert await closed_with(ws) == (4003, "banned for spam")
    token = hs_token(claims("ada"))
    for pod in (one, two):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(pod.ws_url("general", access_token=token))
        assert refused.value.status == 403
    # the others are untouched
    await send(bob, {"type": "ping", "ref": 1})
    assert (await recv_type(bob, "pong"))["ref"] == 1
    admin = {"Authorization": f"Bearer {hs_token(claims('ops', admin=True))}"}
    async with session.get(f"{one.base}/api/chat-api/ws/stats", headers=admin) as resp:
        stats = await resp.json()
    assert (stats["users"]["closed"], stats["users"]["refused_banned"]) == (1, 1), stats
    await bob.close()


async def test_a_disconnect_without_a_ban_lets_the_user_back(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(AUTH)  # local-only: the same API
    ws = await user_ws(session, pod, "cy")
    status, _ = await post(session, pod, "cy/disconnect", {})
    assert status == 202
    assert await closed_with(ws) == (4000, "disconnected by the server")
    back = await user_ws(session, pod, "cy")
    status, _ = await post(session, pod, "cy/messages", {"data": 1})
    assert status == 202
    assert (await recv_type(back, "message"))["to"] == "cy"
    await back.close()


async def test_bad_requests_get_a_clear_4xx(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(AUTH)
    bad: list[tuple[str, Any, dict[str, Any], int, str]] = [
        ("ada/messages", {"data": 1}, {"key": None}, 401, "unauthorized"),
        ("ada/messages", {"data": 1}, {"key": "wrong"}, 401, "unauthorized"),
        ("ada/messages", {"text": 1}, {}, 400, "missing_data"),
        ("ada/messages", [1], {}, 400, "invalid_body"),
        ("ada/messages", {"data": 1, "from": "x"}, {}, 400, "invalid_from"),
        ("ada/messages", {"data": 1}, {"idempotency_key": "has space"}, 400,
         "invalid_idempotency_key"),
        ("ada/disconnect", {"code": 1000}, {}, 400, "invalid_code"),
        ("ada/disconnect", {"code": "4000"}, {}, 400, "invalid_code"),
        ("ada/disconnect", {"reason": "x" * 124}, {}, 400, "invalid_reason"),
        ("ada/disconnect", {"ban_seconds": -1}, {}, 400, "invalid_ban"),
        ("ada/disconnect", {"ban_seconds": 10**9}, {}, 400, "invalid_ban"),
        ("x" * 129 + "/messages", {"data": 1}, {}, 400, "invalid_user"),
    ]  # fmt: skip
    for path, body, options, status, code in bad:
        got, reply = await post(session, pod, path, body, **options)
        assert (got, reply["error"]) == (status, code), (path, body, reply)
    off = pod_factory()  # no PUBLISH_API_KEY: the API is off
    got, reply = await post(session, off, "ada/messages", {"data": 1})
    assert (got, reply["error"]) == (404, "disabled")
