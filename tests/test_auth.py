"""AUTH_ENABLED: JWTs by header or query parameter, refused before the
upgrade, identity from the token, room claims, expiry, protected stats."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_api.auth import Authenticator, RoomPatterns, TokenError
from chat_api.config import Config, ConfigError

from .conftest import PodFactory
from .security_support import (
    SECRET,
    KeyPair,
    claims,
    ec_key,
    forge_hs256,
    handshake,
    hs_token,
    jwks_server,
    key_token,
    rsa_key,
)
from .support import DEFAULT_TIMEOUT, Pod, connect, eventually, recv, recv_type, send

HS_ENV = {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET}
ADMIN = hs_token(claims("ops", admin=True))


@pytest.fixture(scope="module")
def rsa_pair() -> KeyPair:
    return rsa_key()


@pytest.fixture(scope="module")
def ec_pair() -> KeyPair:
    return ec_key()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def stats(
    session: aiohttp.ClientSession, pod: Pod, token: str | None = ADMIN
) -> dict[str, Any]:
    headers = bearer(token) if token else {}
    async with (
        asyncio.timeout(DEFAULT_TIMEOUT),
        session.get(f"{pod.base}/api/chat-api/ws/stats", headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def refused_status(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    """What aiohttp's WebSocket client sees when the server refuses."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            await session.ws_connect(url, **kwargs)
    return info.value.status


# -- a valid token --------------------------------------------------------------


async def test_token_in_header_or_query_sets_the_identity(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(HS_ENV)
    token = hs_token(claims("alice-42", name="Alice\u200b  Liddell"))
    a, welcome = await connect(session, pod.ws_url("general"), headers=bearer(token))
    assert welcome["user"] == {"id": "alice-42", "name": "Alice Liddell"}
    b, welcome_b = await connect(
        session, pod.ws_url("general", access_token=hs_token(claims("bob")))
    )
    assert welcome_b["user"] == {"id": "bob", "name": "bob"}  # no name claim: the sub

    # Neither a "from" in the frame nor ?name= changes who the sender is.
    c, _ = await connect(
        session, pod.ws_url("general", access_token=token, name="root"), headers={}
    )
    await send(c, {"type": "message", "data": "hi", "from": {"id": "bob", "name": "bob"}})
    for ws in (a, b, c):
        frame = await recv_type(ws, "message")
        assert frame["from"] == {"id": "alice-42", "name": "Alice Liddell"}
        assert frame["data"] == "hi"
    for ws in (a, b, c):
        await ws.close()


# -- refusals before the upgrade -----------------------------------------------


async def test_bad_tokens_are_refused_with_401_before_the_upgrade(
    pod_factory: PodFactory, session: aiohttp.ClientSession, rsa_pair: KeyPair
) -> None:
    pod = pod_factory({**HS_ENV, "AUTH_AUDIENCE": "chat", "AUTH_ISSUER": "https://idp.test"})
    good = {"aud": "chat", "iss": "https://idp.test"}
    now = int(time.time())
    unsigned = jwt.encode({**claims(), **good}, None, algorithm="none")
    cases: dict[str, str | None] = {
        "missing": None,
        "malformed": "not-a-jwt",
        "garbage segments": "a.b.c",
        "expired": hs_token({**claims(), **good, "exp": now - 120}),
        "not yet valid": hs_token({**claims(), **good, "nbf": now + 600}),
        "wrong secret": hs_token({**claims(), **good}, secret="another-secret-" + "x" * 32),
        "alg none": unsigned,
        "alg none, signature stripped": hs_token({**claims(), **good}).rsplit(".", 1)[0] + ".",
        "HS512 not on the list": hs_token({**claims(), **good}, alg="HS512"),
        "RS256 with HS config": key_token({**claims(), **good}, rsa_pair),
        "wrong audience": hs_token({**claims(), "aud": "other", "iss": "https://idp.test"}),
        "no audience": hs_token({**claims(), "iss": "https://idp.test"}),
        "wrong issuer": hs_token({**claims(), "aud": "chat", "iss": "https://evil.test"}),
        "no sub": hs_token({"exp": now + 300, **good}),
        "no exp": hs_token({"sub": "x", **good}),
        "sub not a string": hs_token({**claims(), **good, "sub": 12}),
        "rooms claim not a list": hs_token({**claims(), **good, "rooms": {"a": 1}}),
    }
    for case, token in cases.items():
        headers = bearer(token) if token is not None else {}
        status, body, resp_headers = await handshake(session, pod.ws_url("general"), headers)
        assert status == 401, (case, status, body)
        assert resp_headers["WWW-Authenticate"].startswith("Bearer"), case
        assert body, case
        assert token is None or token not in body, case
        # The same through a real WebSocket client, by query parameter.
        query = {"access_token": token} if token is not None else {}
        assert await refused_status(session, pod.ws_url("general", **query)) == 401, case

    s = await stats(session, pod, hs_token({**claims("ops", admin=True), **good}))
    assert s["connections"] == {"open": 0, "accepted": 0}
    assert s["rooms"] == {}
    assert s["refused"] == {"401": 2 * len(cases)}
    # The good token works on the same pod.
    ws, _ = await connect(
        session, pod.ws_url("general"), headers=bearer(hs_token({**claims(), **good}))
    )
    await ws.close()


async def test_refusal_reasons_are_plain(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(HS_ENV)
    expired = hs_token({**claims(), "exp": int(time.time()) - 3600})
    _, body, _ = await handshake(session, pod.ws_url(), bearer(expired))
    assert "expired" in body
    _, body, headers = await handshake(session, pod.ws_url())
    assert "token is required" in body
    assert headers["WWW-Authenticate"] == "Bearer"


# -- rooms claim -----------------------------------------------------------------


async def test_rooms_claim_limits_connect_and_join(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(HS_ENV)
    token = hs_token(claims("carol", rooms=["general", "team-*"]))
    # At connect: HTTP 403, nothing joined.
    assert await refused_status(session, pod.ws_url("secret", access_token=token)) == 403
    assert await refused_status(session, pod.ws_url(access_token=token)) == 403  # global
    s = await stats(session, pod)
    assert s["refused"] == {"403": 2}
    assert s["connections"]["accepted"] == 0

    ws, welcome = await connect(session, pod.ws_url("team-blue", access_token=token))
    assert welcome["rooms"] == ["team-blue"]
    await send(ws, {"type": "join", "room": "secret", "ref": "j1"})
    error = await recv_type(ws, "error")
    assert error == {
        "type": "error",
        "code": "forbidden_room",
        "message": "not allowed in room 'secret'",
        "ref": "j1",
    }
    await send(ws, {"type": "join", "room": "general", "ref": "j2"})
    assert (await recv_type(ws, "joined"))["room"] == "general"
    s = await stats(session, pod)
    assert s["rooms"] == {"team-blue": 1, "general": 1}
    await ws.close()

    # "*" opens every room and the global channel.
    anywhere = hs_token(claims("dave", rooms=["*"]))
    ws, _ = await connect(session, pod.ws_url(access_token=anywhere))
    await send(ws, {"type": "join", "room": "secret"})
    assert (await recv_type(ws, "joined"))["room"] == "secret"
    await ws.close()


def test_room_patterns() -> None:
    rooms = RoomPatterns.from_claim(["general", "team-*", "a*z"])
    for room in ("general", "team-", "team-x.y", "abcz"):
        assert rooms(room), room
    for room in ("generalx", "xteam-a", "az-", None):
        assert not rooms(room), room
    assert RoomPatterns.from_claim("one two")("two")
    assert RoomPatterns.from_claim(["*"])(None)
    assert not RoomPatterns.from_claim([])("general")
    for bad in ([1], "a?b", ["a b"], ["[ab]"], {"x": 1}, ["*"] * 300):
        with pytest.raises(TokenError):
            RoomPatterns.from_claim(bad)


# -- expiry ------------------------------------------------------------------------


async def test_token_expiring_mid_connection_closes_with_1008(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    leeway = 1.0
    pod = pod_factory({**HS_ENV, "AUTH_LEEWAY_SECONDS": str(leeway)})
    short = claims("erin", ttl=3)
    ws, _ = await connect(session, pod.ws_url("general", access_token=hs_token(short)))
    other, _ = await connect(session, pod.ws_url("general", access_token=hs_token(claims("f"))))
    while isinstance(msg := await recv(ws, timeout=DEFAULT_TIMEOUT), dict):
        pass  # presence events
    closed_at = time.time()
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert (msg.data, msg.extra) == (1008, "token expired")
    # Not before exp + leeway (50 ms for timer granularity), nor long after.
    assert closed_at >= short["exp"] + leeway - 0.05, closed_at - short["exp"]
    assert closed_at < short["exp"] + leeway + 5, closed_at - short["exp"]
    s = await stats(session, pod)
    assert s["policy_closes"]["token_expired"] == 1
    assert s["rooms"] == {"general": 1}
    # The other connection is untouched.
    await send(other, {"type": "ping", "ref": 1})
    assert (await recv_type(other, "pong"))["ref"] == 1
    await other.close()


async def test_default_leeway_is_30_seconds(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(HS_ENV)  # AUTH_LEEWAY_SECONDS not set
    now = int(time.time())
    recent = hs_token({**claims("recent"), "exp": now - 10})
    ws, welcome = await connect(session, pod.ws_url("general", access_token=recent))
    assert welcome["user"]["id"] == "recent"
    await ws.close()
    old = hs_token({**claims("old"), "exp": now - 60})
    assert await refused_status(session, pod.ws_url("general", access_token=old)) == 401
    # nbf gets the same leeway: 10 s ahead is accepted, 60 s ahead refused.
    early = hs_token({**claims("early"), "nbf": now + 10})
    ws, _ = await connect(session, pod.ws_url("general", access_token=early))
    await ws.close()
    too_early = hs_token({**claims("too-early"), "nbf": now + 60})
    assert await refused_status(session, pod.ws_url("general", access_token=too_early)) == 401

    # A token 28 s past exp lives on until exp + 30 s, and no longer.
    dying = {**claims("dying"), "exp": now - 28}
    ws, _ = await connect(session, pod.ws_url("general", access_token=hs_token(dying)))
    while isinstance(msg := await recv(ws, timeout=DEFAULT_TIMEOUT), dict):
        pass  # presence events
    closed_at = time.time()
    assert (msg.data, msg.extra) == (1008, "token expired")
    assert dying["exp"] + 30 - 0.05 <= closed_at < dying["exp"] + 30 + 5


@pytest.mark.parametrize(
    ("alg", "secret_bytes"),
    [("HS256", 32), ("HS384", 48), ("HS512", 64)],
)
async def test_hs384_and_hs512_with_a_long_enough_secret(
    pod_factory: PodFactory, session: aiohttp.ClientSession, alg: str, secret_bytes: int
) -> None:
    secret = os.urandom(secret_bytes // 2).hex()  # exactly secret_bytes characters
    pod = pod_factory(
        {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": secret, "AUTH_JWT_ALGORITHMS": alg}
    )
    pod.wait_for_log(rf"tokens verified with AUTH_JWT_SECRET, algorithms {alg}$")
    token = hs_token(claims(f"user-{alg}"), secret=secret, alg=alg)
    ws, welcome = await connect(session, pod.ws_url("general", access_token=token))
    assert welcome["user"]["id"] == f"user-{alg}"
    await ws.close()
    if alg != "HS256":  # only the configured algorithm, even with the right secret
        wrong_alg = hs_token(claims(), secret=secret, alg="HS256")
        assert await refused_status(session, pod.ws_url("general", access_token=wrong_alg)) == 401


@pytest.mark.parametrize(("alg", "secret_bytes"), [("HS384", 47), ("HS512", 63)])
def test_hs384_and_hs512_refuse_a_short_secret(alg: str, secret_bytes: int) -> None:
    env = {
        "AUTH_ENABLED": "true",
        "AUTH_JWT_SECRET": "s" * secret_bytes,
        "AUTH_JWT_ALGORITHMS": alg,
    }
    with pytest.raises(ConfigError) as info:
        Config.load(env, env_file=None)
    assert info.value.key == "AUTH_JWT_SECRET"
    assert "s" * secret_bytes not in str(info.value)


async def test_claim_names_are_configurable(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(
        {
            **HS_ENV,
            "AUTH_NAME_CLAIM": "display",
            "AUTH_ROOMS_CLAIM": "https://chat.example/rooms",
            "AUTH_ADMIN_CLAIM": "ops",
        }
    )
    token = hs_token(
        {
            **claims(
                "u-7",
                display="Grace Hopper",
                name="not this one",
                rooms=["ignored-*"],  # the default claim names mean nothing now
                admin=True,
            ),
            "https://chat.example/rooms": ["team-*"],
        }
    )
    ws, welcome = await connect(session, pod.ws_url("team-a", access_token=token))
    assert welcome["user"] == {"id": "u-7", "name": "Grace Hopper"}
    await send(ws, {"type": "join", "room": "ignored-x", "ref": 1})
    assert (await recv_type(ws, "error"))["code"] == "forbidden_room"
    await send(ws, {"type": "join", "room": "team-b", "ref": 2})
    assert (await recv_type(ws, "joined"))["room"] == "team-b"
    await ws.close()
    assert await refused_status(session, pod.ws_url("ignored-x", access_token=token)) == 403
    # Without the name claim: the sub.
    ws, welcome = await connect(
        session, pod.ws_url("team-a", access_token=hs_token(claims("u-8", name="Nope")))
    )
    assert welcome["user"] == {"id": "u-8", "name": "u-8"}
    await ws.close()

    # Stats: "admin": true no longer opens them; "ops": true does.
    stats_url = f"{pod.base}/api/chat-api/ws/stats"
    for token, expected in (
        (hs_token(claims("a", admin=True)), 403),
        (hs_token(claims("b", ops="true")), 403),
        (hs_token(claims("c", ops=True)), 200),
    ):
        async with (
            asyncio.timeout(DEFAULT_TIMEOUT),
            session.get(stats_url, headers=bearer(token)) as resp,
        ):
            assert resp.status == expected, token


# -- public keys and JWKS -----------------------------------------------------------


@pytest.mark.slow
async def test_rs256_and_es256_with_a_pem_public_key(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    rsa_pair: KeyPair,
    ec_pair: KeyPair,
    tmp_path: Path,
) -> None:
    pem_file = tmp_path / "key.pem"
    pem_file.write_text(ec_pair.public_pem)
    rsa_pod = pod_factory({"AUTH_ENABLED": "true", "AUTH_JWT_PUBLIC_KEY": rsa_pair.public_pem})
    ec_pod = pod_factory({"AUTH_ENABLED": "true", "AUTH_JWT_PUBLIC_KEY": str(pem_file)})
    rsa_pod.wait_for_log(
        r"authentication on: tokens verified with AUTH_JWT_PUBLIC_KEY, algorithms RS256"
    )
    ec_pod.wait_for_log(r"algorithms ES256")

    ws, welcome = await connect(
        session, rsa_pod.ws_url("r", access_token=key_token(claims("rs"), rsa_pair))
    )
    assert welcome["user"]["id"] == "rs"
    await ws.close()
    ws, welcome = await connect(
        session, ec_pod.ws_url("r", access_token=key_token(claims("es"), ec_pair))
    )
    assert welcome["user"]["id"] == "es"
    await ws.close()

    # Algorithm confusion: an HS256 token whose HMAC key is the public PEM.
    forged = forge_hs256(claims(), rsa_pair.public_pem.encode())
    assert await refused_status(session, rsa_pod.ws_url(access_token=forged)) == 401
    # The wrong key pair's signature fails too.
    other = rsa_key("other")
    assert (
        await refused_status(session, rsa_pod.ws_url(access_token=key_token(claims(), other)))
        == 401
    )


async def test_jwks_keys_are_fetched_cached_and_rotated(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    rsa_pair: KeyPair,
    ec_pair: KeyPair,
) -> None:
    async with jwks_server([rsa_pair, ec_pair]) as idp:
        pod = pod_factory({"AUTH_ENABLED": "true", "AUTH_JWKS_URL": idp.url})
        for key in (rsa_pair, ec_pair, rsa_pair):
            ws, welcome = await connect(
                session, pod.ws_url("r", access_token=key_token(claims(key.kid), key))
            )
            assert welcome["user"]["id"] == key.kid
            await ws.close()
        assert idp.requests == 1  # cached

        # The IdP rotates: a token with a new kid makes the pod fetch again.
        rotated = rsa_key("rsa-2")
        idp.keys = [rotated]
        ws, _ = await connect(
            session, pod.ws_url("r", access_token=key_token(claims("new"), rotated))
        )
        await ws.close()
        assert idp.requests == 2
        # Made-up kids do not turn into a request each.
        for i in range(5):
            bogus = key_token(claims(), KeyPair(rotated.private, f"bogus-{i}", "RS256"))
            assert await refused_status(session, pod.ws_url(access_token=bogus)) == 401
        assert idp.requests == 2
        # A JWKS key only verifies its own algorithm: an ES256 token naming
        # the RSA key's kid is refused, not tried against another key.
        mixed = key_token(claims(), KeyPair(ec_pair.private, "rsa-2", "ES256"))
        assert await refused_status(session, pod.ws_url(access_token=mixed)) == 401
        pod.wait_for_log(r"fetched the JWKS from http://127\.0\.0\.1:\d+/\.well-known/jwks\.json")


@pytest.mark.slow
async def test_jwks_keys_are_fetched_again_after_the_cache_time(
    pod_factory: PodFactory, session: aiohttp.ClientSession, rsa_pair: KeyPair
) -> None:
    cache = 1.0
    async with jwks_server([rsa_pair]) as idp:
        pod = pod_factory(
            {"AUTH_ENABLED": "true", "AUTH_JWKS_URL": idp.url, "AUTH_JWKS_CACHE_SECONDS": "1"}
        )
        url = pod.ws_url("r", access_token=key_token(claims("k"), rsa_pair))
        ws, _ = await connect(session, url)
        await ws.close()
        assert idp.requests == 1

        async def fetched_again() -> bool:  # a known kid: only the cache time refetches
            ws, _ = await connect(session, url)
            await ws.close()
            return idp.requests == 2

        await eventually(fetched_again, timeout=cache + 10, interval=0.1)
        first, second = idp.request_times
        assert second - first >= cache * 0.9  # not before the cache time


async def test_jwks_unreachable_answers_503_not_401_and_recovers(
    pod_factory: PodFactory, session: aiohttp.ClientSession, rsa_pair: KeyPair
) -> None:
    async with jwks_server([rsa_pair]) as idp:
        idp.failing = True
        pod = pod_factory({"AUTH_ENABLED": "true", "AUTH_JWKS_URL": idp.url})
        token = key_token(claims(), rsa_pair)
        url = pod.ws_url("r", access_token=token)
        for _ in range(5):
            status, body, headers = await handshake(session, url)
            assert status == 503
            assert "keys are unavailable" in body
            assert headers["Retry-After"]
        assert idp.requests == 1  # no request per knock while it is down
        pod.wait_for_log(
            r"WARNING chat_api\.auth: fetching the JWKS .* failed: ValueError: HTTP 500"
        )

        idp.failing = False

        async def back() -> bool:
            return (await handshake(session, url))[0] == 101

        await eventually(back, timeout=DEFAULT_TIMEOUT, interval=0.25)
        assert "Traceback" not in pod.log


async def test_concurrent_handshakes_share_one_jwks_fetch(
    pod_factory: PodFactory, session: aiohttp.ClientSession, rsa_pair: KeyPair
) -> None:
    async with jwks_server([rsa_pair]) as idp:
        pod = pod_factory({"AUTH_ENABLED": "true", "AUTH_JWKS_URL": idp.url})
        urls = [
            pod.ws_url("r", access_token=key_token(claims(f"u{i}"), rsa_pair)) for i in range(8)
        ]
        opened = await asyncio.gather(*(connect(session, url) for url in urls))
        assert idp.requests == 1
        for ws, _ in opened:
            await ws.close()


# -- stats ---------------------------------------------------------------------------


async def test_stats_and_presence_need_an_admin_token_or_the_stats_token(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    stats_token = "stats-" + os.urandom(8).hex()
    pod = pod_factory({**HS_ENV, "STATS_TOKEN": stats_token})
    url = f"{pod.base}/api/chat-api/ws/stats"
    cases = [
        ({}, 401),
        (bearer("nonsense"), 403),
        (bearer(hs_token(claims("user"))), 403),
        (bearer(hs_token(claims("user", admin="true"))), 403),  # must be JSON true
        (bearer(hs_token({**claims("ops", admin=True), "exp": int(time.time()) - 600})), 403),
        (bearer(ADMIN), 200),
        (bearer(stats_token), 200),
    ]
    presence = f"{pod.base}/api/chat-api/rooms/general/presence"
    for target in (url, presence):
        for headers, expected in cases:
            async with (
                asyncio.timeout(DEFAULT_TIMEOUT),
                session.get(target, headers=headers) as resp,
            ):
                assert resp.status == expected, (target, headers, await resp.text())
    # Health and readiness stay public: probes carry no token.
    for path in ("/healthz", "/readyz"):
        async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(pod.base + path) as resp:
            assert resp.status == 200


async def test_stats_token_protects_stats_without_auth(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"STATS_TOKEN": "s3cr3t-stats"})
    assert (await stats(session, pod, "s3cr3t-stats"))["pod"] == pod.name
    async with (
        asyncio.timeout(DEFAULT_TIMEOUT),
        session.get(f"{pod.base}/api/chat-api/ws/stats") as resp,
    ):
        assert resp.status == 401
    # WebSockets stay open to guests.
    ws, welcome = await connect(session, pod.ws_url("general"))
    assert welcome["user"]["id"].startswith("guest-")
    await ws.close()


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"AUTH_ENABLED": "true"}, "AUTH_JWT_SECRET"),
        ({"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": "short"}, "AUTH_JWT_SECRET"),
        (
            {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "AUTH_JWKS_URL": "https://x/j"},
            "AUTH_JWKS_URL",
        ),
        (
            {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "AUTH_JWT_ALGORITHMS": "none"},
            "AUTH_JWT_ALGORITHMS",
        ),
        (
            {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "AUTH_JWT_ALGORITHMS": "RS256"},
            "AUTH_JWT_ALGORITHMS",
        ),
        (
            {
                "AUTH_ENABLED": "true",
                "AUTH_JWKS_URL": "https://x/j",
                "AUTH_JWT_ALGORITHMS": "HS256",
            },
            "AUTH_JWT_ALGORITHMS",
        ),
        ({"AUTH_JWKS_URL": "ftp://x/j"}, "AUTH_JWKS_URL"),
        ({"ALLOWED_ORIGINS": "evil.example"}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": "https://a.example/path"}, "ALLOWED_ORIGINS"),
        ({"RATE_LIMIT_BURST": "0"}, "RATE_LIMIT_BURST"),
        ({"MAX_CONNECTIONS": "-1"}, "MAX_CONNECTIONS"),
    ],
)
def test_bad_security_settings_name_the_variable(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env, env_file=None)
    assert info.value.key == key
    assert SECRET not in str(info.value)


def test_public_key_settings_are_checked_at_start_up(rsa_pair: KeyPair, tmp_path: Path) -> None:
    def build(**env: str) -> Authenticator:
        return Authenticator(Config.load({"AUTH_ENABLED": "true", **env}, env_file=None))

    assert build(AUTH_JWT_PUBLIC_KEY=rsa_pair.public_pem).algorithms == ("RS256",)
    assert build(AUTH_JWKS_URL="https://idp.example/jwks").algorithms == ("RS256", "ES256")
    assert build(AUTH_JWT_SECRET=SECRET).algorithms == ("HS256",)
    for env in (
        {"AUTH_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"},
        {"AUTH_JWT_PUBLIC_KEY": str(tmp_path / "missing.pem")},
        {"AUTH_JWT_PUBLIC_KEY": rsa_pair.public_pem, "AUTH_JWT_ALGORITHMS": "ES256"},
    ):
        with pytest.raises(ConfigError) as info:
            build(**env)
        assert info.value.key in env


def test_auth_without_a_key_stops_the_process_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chat_api"],
        env={"PATH": "/usr/bin:/bin", "AUTH_ENABLED": "true", "PORT": "0"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 2
    assert "AUTH_JWT_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def test_realtime_knows_nothing_of_tokens() -> None:
    """Auth plugs into the handler through ``identify``; ``realtime`` imports
    neither ``chat_api`` nor PyJWT."""
    src = Path(__file__).resolve().parent.parent / "src" / "realtime"
    banned = re.compile(r"^\s*(from|import)\s+(chat_api|jwt|cryptography)\b", re.M)
    for path in src.rglob("*.py"):
        assert banned.search(path.read_text()) is None, path.name


_FUZZ_AUTH = Authenticator(
    Config.load({"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET}, env_file=None)
)


@settings(max_examples=300, deadline=None)
@given(
    token=st.text(max_size=300)
    | st.builds(
        lambda header, body, sig: ".".join([header, body, sig]),
        st.text(max_size=60),
        st.text(max_size=60),
        st.text(max_size=60),
    )
    | st.builds(
        hs_token,
        st.dictionaries(
            st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "rooms", "name"]),
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats()
            | st.text()
            | st.lists(st.text()),
        ),
    )
)
def test_any_token_is_admitted_or_refused_never_crashes(token: str) -> None:
    refused: TokenError | None = None
    try:
        asyncio.run(_FUZZ_AUTH.admit(token))
    except TokenError as exc:
        refused = exc
    if refused is not None:
        assert refused.status == 401
        assert len(token) < 8 or token not in refused.reason
