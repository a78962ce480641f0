"""Backend hooks, end to end: real pods (aiohttp, and the ASGI example)
pointed at the FastAPI hooks backend of ``examples/hooks_backend.py``,
served by uvicorn on a free port; real WebSocket clients; the backend
killed, restarted and slowed on purpose."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from chat_api.config import Config, ConfigError
from chat_api.hooks import SIGNATURE_HEADER, sign

from .conftest import PodFactory, redis_pod_env
from .security_support import SECRET as JWT_SECRET
from .security_support import claims, handshake, hs_token
from .support import ROOT, Pod, connect, eventually, recv, recv_type, send

pytestmark = pytest.mark.contract

HOOK_SECRET = "hook-secret-" + secrets.token_hex(16)
BackendFactory = Callable[..., Pod]


def backend_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "--app-dir", ROOT, "examples.hooks_backend:app",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
    ]  # fmt: skip


@pytest.fixture
def backend_factory() -> Iterator[BackendFactory]:
    """Start the hooks backend: ``backend_factory(port=0, **env)``."""
    started: list[Pod] = []

    def start(port: int = 0, **env: str) -> Pod:
        app = Pod({"HOOK_SECRET": HOOK_SECRET, **env}, name="app", command=backend_command(port))
        started.append(app)
        return app.start()

    yield start
    for app in started:
        app.kill()


@pytest.fixture
def backend(backend_factory: BackendFactory) -> Pod:
    return backend_factory(EXAMPLE_TRUSTED="bot", EXAMPLE_BANNED="mallory")


def hook_env(
    app: Pod | str, *, connect: bool = True, publish: bool = True, **extra: str
) -> dict[str, str]:
    base = app if isinstance(app, str) else app.base
    env = {"HOOK_SECRET": HOOK_SECRET, "HOOK_TIMEOUT": "2", **extra}
    if connect:
        env["HOOK_CONNECT_URL"] = f"{base}/hooks/connect"
    if publish:
        env["HOOK_PUBLISH_URL"] = f"{base}/hooks/publish"
    return env


async def login(
    session: aiohttp.ClientSession, app: Pod, name: str, rooms: str | None = None
) -> dict[str, str]:
    """Sign in at the app; the ``Cookie`` header its session cookie makes."""
    params = {"name": name} if rooms is None else {"name": name, "rooms": rooms}
    async with session.post(f"{app.base}/login", params=params) as resp:
        assert resp.status == 200, await resp.text()
        return {"Cookie": f"session={resp.cookies['session'].value}"}


async def next_reply(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next ack or error frame (messages and others skipped)."""
    while True:
        frame = await recv(ws)
        assert isinstance(frame, dict), frame
        if frame["type"] in ("ack", "error"):
            return frame


async def texts_until_quiet(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[Any]:
    """The ``data`` of the next ``n`` messages, then proof that no other
    message comes: a ping answered with nothing in between but its pong."""
    got = [(await recv_type(ws, "message"))["data"] for _ in range(n)]
    await send(ws, {"type": "ping", "ref": "quiet"})
    while True:
        frame = await recv(ws)
        assert isinstance(frame, dict)
        if frame["type"] == "pong":
            return got
        assert frame["type"] != "message", f"one more message: {frame}"


async def history(session: aiohttp.ClientSession, pod: Pod, app: Pod, room: str) -> list[Any]:
    """The data of the stored messages of ``room``, as a new member gets them."""
    cookie = await login(session, app, "reader")
    ws, _ = await connect(session, pod.ws_url(room, history="50"), headers=cookie)
    sync = await recv_type(ws, "sync")
    got = [(await recv_type(ws, "message"))["data"] for _ in range(sync["replayed"])]
    await ws.close()
    return got


# -- the connect hook ------------------------------------------------------------


async def test_sign_in_by_the_apps_cookie_gives_the_apps_user_and_data(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(hook_env(backend))
    cookie = await login(session, backend, "Alice")
    ws, welcome = await connect(session, pod.ws_url("lobby"), headers=cookie)
    assert welcome["user"] == {"id": "user-alice", "name": "Alice"}
    assert welcome["data"] == {"signed_in_by": "hooks_backend", "room": "lobby"}
    await ws.close()


async def test_the_apps_refusal_is_the_http_refusal(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(hook_env(backend))
    status, body, headers = await handshake(session, pod.ws_url("lobby"))
    assert (status, body) == (401, "sign in first: POST /login")
    assert headers["WWW-Authenticate"] == 'Session realm="chat"'  # the app's, passed on
    cookie = await login(session, backend, "mallory")
    status, body, _ = await handshake(session, pod.ws_url("lobby"), cookie)
    assert (status, body) == (403, "mallory is banned")


async def test_the_app_limits_the_rooms(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(hook_env(backend))
    cookie = await login(session, backend, "carol", rooms="lobby,team-*")
    status, body, _ = await handshake(session, pod.ws_url("elsewhere"), cookie)
    assert (status, body) == (403, "not allowed in room 'elsewhere'")
    ws, _ = await connect(session, pod.ws_url("lobby"), headers=cookie)
    await send(ws, {"type": "join", "room": "team-red", "ref": 1})
    assert (await recv_type(ws, "joined"))["room"] == "team-red"
    await send(ws, {"type": "join", "room": "secret", "ref": 2})
    error = await recv_type(ws, "error")
    assert (error["code"], error["ref"]) == ("forbidden_room", 2)
    await ws.close()


async def test_a_wrong_secret_is_refused_by_the_app(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({**hook_env(backend), "HOOK_SECRET": "another-secret-" + "x" * 32})
    cookie = await login(session, backend, "dave")
    status, body, _ = await handshake(session, pod.ws_url("lobby"), cookie)
    assert (status, body) == (401, "the hook request's signature does not verify")


@pytest.mark.aiohttp_only("the ASGI example has no JWT sign-in")
async def test_with_a_token_the_hook_gets_its_claims_and_a_trusted_token_skips_the_publish_hook(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(
        {
            **hook_env(backend),
            "AUTH_ENABLED": "true",
            "AUTH_JWT_SECRET": JWT_SECRET,
            "AUTH_TRUSTED_CLAIM": "trusted",
        }
    )
    auth = {"Authorization": f"Bearer {hs_token(claims('svc', trusted=True))}"}
    plain = {"Authorization": f"Bearer {hs_token(claims('user-2', name='Two', rooms=['news']))}"}
    status, _, _ = await handshake(session, pod.ws_url("news"))
    assert status == 401  # the token comes first: no hook request without one
    trusted, _ = await connect(session, pod.ws_url("news"), headers=auth)
    member, welcome = await connect(session, pod.ws_url("news"), headers=plain)
    assert welcome["user"] == {"id": "user-2", "name": "Two"}  # the app kept the token's
    assert welcome["data"] == {"signed_in_by": "token", "room": "news"}
    status, body, _ = await handshake(session, pod.ws_url("sport"), plain)
    assert (status, body) == (403, "not allowed in room 'sport'")  # the token's rooms claim
    both = {**plain, **await login(session, backend, "Kim")}
    _, welcome = await connect(session, pod.ws_url("news"), headers=both)
    assert welcome["user"] == {"id": "user-kim", "name": "Kim"}  # the app's own session wins
    await send(member, {"type": "message", "data": "spam", "ref": 1})
    assert (await next_reply(member))["code"] == "blocked_word"
    await send(trusted, {"type": "message", "data": "spam and heck", "ref": 1})
    assert (await next_reply(trusted))["type"] == "ack"
    assert await texts_until_quiet(member, 1) == ["spam and heck"]


@pytest.mark.aiohttp_only("the ASGI example has no JWT sign-in")
async def test_a_refresh_under_the_connect_hook_keeps_the_apps_terms(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({**hook_env(backend), "AUTH_ENABLED": "true", "AUTH_JWT_SECRET": JWT_SECRET})
    first = {"Authorization": f"Bearer {hs_token(claims('user-3', ttl=600))}"}
    headers = {**first, **await login(session, backend, "Lee")}
    ws, welcome = await connect(session, pod.ws_url("news"), headers=headers)
    assert welcome["user"]["id"] == "user-lee"  # the app's user, not the token's sub
    longer = claims("user-3", ttl=1200)
    await send(ws, {"type": "refresh", "token": hs_token(longer), "ref": "r"})
    refreshed = await recv_type(ws, "refreshed")
    assert refreshed["expires_at"] == longer["exp"] + 30  # the default leeway
    other = hs_token(claims("user-4", ttl=1200))  # a token for someone else
    await send(ws, {"type": "refresh", "token": other, "ref": "o"})
    error = await recv_type(ws, "error")
    assert (error["code"], error["ref"]) == ("invalid_token", "o")
    await send(ws, {"type": "message", "data": "still me", "ref": 1})
    got = await recv_type(ws, "message")
    assert got["from"]["id"] == "user-lee"
    await ws.close()


# -- the publish hook ----------------------------------------------------------------


async def test_publish_replaced_or_rejected_never_stored_nor_delivered(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(hook_env(backend))
    alice, _ = await connect(
        session, pod.ws_url("filter"), headers=await login(session, backend, "alice")
    )
    bob, _ = await connect(
        session, pod.ws_url("filter"), headers=await login(session, backend, "bob")
    )
    await send(alice, {"type": "message", "data": "what the heck", "ref": 1})
    ack = await next_reply(alice)
    assert (ack["type"], ack["ref"]) == ("ack", 1)
    await send(alice, {"type": "message", "data": {"text": "buy SPAM now"}, "ref": "r2"})
    error = await next_reply(alice)
    assert error == {
        "type": "error",
        "code": "blocked_word",
        "message": "messages may not say 'SPAM'",
        "ref": "r2",
    }
    await send(alice, {"type": "message", "data": {"text": "darn it", "n": 3}, "ref": 3})
    assert (await next_reply(alice))["ref"] == 3
    assert await texts_until_quiet(bob, 2) == ["what the ****", {"text": "**** it", "n": 3}]
    assert await history(session, pod, backend, "filter") == [
        "what the ****",
        {"text": "**** it", "n": 3},
    ]


async def test_a_user_the_app_trusts_skips_the_publish_hook(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(hook_env(backend))
    bot, _ = await connect(
        session, pod.ws_url("news"), headers=await login(session, backend, "bot")
    )
    member, _ = await connect(
        session, pod.ws_url("news"), headers=await login(session, backend, "erin")
    )
    await send(bot, {"type": "message", "data": "spam, heck", "ref": 1})
    assert (await next_reply(bot))["type"] == "ack"
    assert await texts_until_quiet(member, 1) == ["spam, heck"]


async def test_order_and_acks_hold_with_many_messages_in_flight(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(hook_env(backend))
    sender, _ = await connect(
        session, pod.ws_url("order"), headers=await login(session, backend, "frank")
    )
    member, _ = await connect(
        session, pod.ws_url("order"), headers=await login(session, backend, "gina")
    )
    words = ["fine", "heck", "spam"]
    for i in range(30):  # all sent before any answer is read
        await send(sender, {"type": "message", "data": f"{i} {words[i % 3]}", "ref": i})
    replies = [await next_reply(sender) for _ in range(30)]
    assert [r["ref"] for r in replies] == list(range(30))
    assert [r["type"] for r in replies] == ["ack", "ack", "error"] * 10
    offsets = [r["offset"] for r in replies if r["type"] == "ack"]
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == 20
    expected = [f"{i} {'fine' if i % 3 == 0 else '****'}" for i in range(30) if i % 3 != 2]
    assert await texts_until_quiet(member, 20) == expected


async def test_a_resend_of_a_replaced_message_is_a_duplicate(
    pod_factory: PodFactory, backend: Pod, session: aiohttp.ClientSession
) -> None:
    await resend_a_replaced_message(session, pod_factory(hook_env(backend)), backend)


@pytest.mark.aiohttp_only("one transport is enough for the Redis-side check")
async def test_a_resend_of_a_replaced_message_is_a_duplicate_on_redis(
    pod_factory: PodFactory,
    backend: Pod,
    session: aiohttp.ClientSession,
    shared_redis_url: str,
    channel_prefix: str,
) -> None:
    env = {**hook_env(backend), **redis_pod_env(shared_redis_url, channel_prefix)}
    await resend_a_replaced_message(session, pod_factory(env), backend)


async def resend_a_replaced_message(session: aiohttp.ClientSession, pod: Pod, backend: Pod) -> None:
    sender, _ = await connect(
        session, pod.ws_url("resend"), headers=await login(session, backend, "hal")
    )
    member, _ = await connect(
        session, pod.ws_url("resend"), headers=await login(session, backend, "ida")
    )
    message = {"type": "message", "data": "heck yes", "key": "k-1"}
    await send(sender, {**message, "ref": 1})
    first = await next_reply(sender)
    await send(sender, {**message, "ref": 2})  # the ack was "lost"
    again = await next_reply(sender)
    assert again["duplicate"] is True
    assert (again["id"], again["offset"]) == (first["id"], first["offset"])
    await send(sender, {**message, "data": "heck no", "ref": 3})
    conflict = await next_reply(sender)
    assert (conflict["code"], conflict["ref"]) == ("key_conflict", 3)
    assert await texts_until_quiet(member, 1) == ["**** yes"]


# -- failures --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["refuse", "allow"])
async def test_a_hook_that_is_down_follows_the_policy_and_is_logged_once(
    pod_factory: PodFactory,
    backend_factory: BackendFactory,
    session: aiohttp.ClientSession,
    policy: str,
) -> None:
    app = backend_factory()
    port = app.port
    pod = pod_factory(hook_env(app, HOOK_FAILURE_POLICY=policy))
    cookie = await login(session, app, "jo")
    sender, _ = await connect(session, pod.ws_url("down"), headers=cookie)
    member, _ = await connect(session, pod.ws_url("down"), headers=cookie)
    app.kill()
    for i in range(3):
        await send(sender, {"type": "message", "data": f"heck {i}", "ref": i})
    replies = [await next_reply(sender) for _ in range(3)]
    if policy == "refuse":
        assert [(r["code"], r["ref"]) for r in replies] == [(("unavailable", i)) for i in range(3)]
        status, body, headers = await handshake(session, pod.ws_url("down"), cookie)
        assert (status, body) == (503, "sign-in is unavailable; try again later")
        assert headers["Retry-After"] == "5"
    else:  # as if there were no hook: sent as written, and a guest may connect
        assert [r["type"] for r in replies] == ["ack"] * 3
        assert await texts_until_quiet(member, 3) == ["heck 0", "heck 1", "heck 2"]
        _, welcome = await connect(session, pod.ws_url("down", name="guesty"))
        assert welcome["user"]["name"] == "guesty"
    failing = [line for line in pod.lines if "publish hook failing" in line]
    assert len(failing) == 1, pod.log
    backend_factory(port=port)  # back on its port
    await send(sender, {"type": "message", "data": "heck again", "ref": "back"})
    assert (await next_reply(sender))["type"] == "ack"
    if pod.transport == "aiohttp":  # the ASGI example leaves INFO logs to its host's config
        pod.wait_for_log(r"publish hook answering again after 3 failed request\(s\)")
    metrics = await _metrics(session, pod)
    assert metrics['chat_api_hook_requests_total{hook="publish",result="error"}'] == 3
    assert metrics['chat_api_hook_requests_total{hook="publish",result="replace"}'] == 1
    assert metrics['chat_api_hook_failing{hook="publish"}'] == 0


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["refuse", "allow"])
async def test_a_slow_hook_times_out_and_follows_the_policy(
    pod_factory: PodFactory,
    backend_factory: BackendFactory,
    session: aiohttp.ClientSession,
    policy: str,
) -> None:
    app = backend_factory(EXAMPLE_DELAY="5")
    pod = pod_factory(hook_env(app, connect=False, HOOK_TIMEOUT="0.3", HOOK_FAILURE_POLICY=policy))
    sender, _ = await connect(session, pod.ws_url("slow"))
    started = time.monotonic()
    await send(sender, {"type": "message", "data": "heck", "ref": 1})
    reply = await next_reply(sender)
    assert time.monotonic() - started < 3
    if policy == "refuse":
        assert (reply["code"], reply["ref"]) == ("unavailable", 1)
    else:
        assert (reply["type"], reply["ref"]) == ("ack", 1)
    metrics = await _metrics(session, pod)
    assert metrics['chat_api_hook_requests_total{hook="publish",result="timeout"}'] == 1


async def _metrics(session: aiohttp.ClientSession, pod: Pod) -> dict[str, float]:
    async def read() -> dict[str, float]:
        async with session.get(f"{pod.base}/metrics") as resp:
            text = await resp.text()
        return {
            name: float(value)
            for line in text.splitlines()
            if line and not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]
        }

    result: dict[str, float] = await eventually(read)
    return result


# -- the example's signature check, and the settings -------------------------------


@pytest.mark.aiohttp_only("no pod involved")
async def test_the_example_refuses_unsigned_stale_and_forged_requests(
    backend: Pod, session: aiohttp.ClientSession
) -> None:
    body = orjson.dumps({"room": "r", "sender": {"id": "u", "name": "u"}, "data": "hi"})
    url = f"{backend.base}/hooks/publish"

    async def post(signature: str | None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature
        async with session.post(url, data=body, headers=headers) as resp:
            return resp.status, await resp.json()

    now = int(time.time())
    assert await post(sign(HOOK_SECRET.encode(), body, now)) == (200, {"result": "accept"})
    assert (await post(None))[0] == 401
    stale = await post(sign(HOOK_SECRET.encode(), body, now - 3600))
    assert stale == (401, {"detail": "the hook request is too old (or from the future)"})
    forged = await post(sign(b"x" * 40, body, now))
    assert forged == (401, {"detail": "the hook request's signature does not verify"})


@pytest.mark.aiohttp_only("no pod involved")
@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"HOOK_PUBLISH_URL": "http://127.0.0.1:9/p"}, "HOOK_SECRET"),
        ({"HOOK_CONNECT_URL": "http://127.0.0.1:9/c", "HOOK_SECRET": "short"}, "HOOK_SECRET"),
        ({"HOOK_CONNECT_URL": "ftp://app/c", "HOOK_SECRET": HOOK_SECRET}, "HOOK_CONNECT_URL"),
        ({"HOOK_FAILURE_POLICY": "maybe"}, "HOOK_FAILURE_POLICY"),
        ({"HOOK_CONNECT_HEADERS": "Cookie,Bad Header"}, "HOOK_CONNECT_HEADERS"),
        ({"HOOK_TIMEOUT": "0"}, "HOOK_TIMEOUT"),
    ],
)
def test_bad_hook_settings_stop_start_up_naming_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.load(env, env_file=None)
    assert caught.value.key == key
