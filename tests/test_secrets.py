"""Secrets (tokens, the JWT secret, the stats token, the Redis password)
never appear in logs, stats, refusals, error frames or exceptions.

(The Redis password of a pod connected to Redis is covered by
``test_redis_cluster``; here: a Redis that refuses connections, start-up and
configuration errors.)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import pytest

from chat_api.config import Config, ConfigError

from .conftest import PodFactory
from .security_support import SECRET, claims, handshake, hs_token
from .support import DEFAULT_TIMEOUT, connect, recv_type, send

STATS_TOKEN = "stats-token-" + os.urandom(12).hex()
REDIS_PASSWORD = "redis-pw-" + os.urandom(8).hex()
PUBLISH_KEY = "publish-key-" + os.urandom(8).hex()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_tokens_and_secrets_never_reach_logs_stats_or_answers(
    pod_factory: PodFactory, session: aiohttp.ClientSession, log_format: str
) -> None:
    pod = pod_factory(
        {
            "LOG_FORMAT": log_format,
            "AUTH_ENABLED": "true",
            "AUTH_JWT_SECRET": SECRET,
            "STATS_TOKEN": STATS_TOKEN,
            "PUBLISH_API_KEY": PUBLISH_KEY,
            "LOG_LEVEL": "DEBUG",
            # Nobody listens there: the pod logs its reconnect attempts.
            "REDIS_URL": f"redis://chat:{REDIS_PASSWORD}@127.0.0.1:{unused_port()}/0",
        }
    )
    now = int(time.time())
    good = hs_token(claims("user-1", name="Ann"))
    admin = hs_token(claims("ops", admin=True))
    bad = [
        hs_token({**claims(), "exp": now - 3600}),
        hs_token(claims(), secret="wrong-secret-" + "y" * 40),
        jwt.encode(claims(), None, algorithm="none"),
        "garbage-" + os.urandom(8).hex(),
        good[:-4] + "AAAA",  # the good token, signature altered
        good.replace(".", "..", 1),
    ]
    answers: list[str] = []
    url = pod.ws_url("general")
    for token in bad:
        for headers, target in (
            ({"Authorization": f"Bearer {token}"}, url),
            ({}, pod.ws_url("general", access_token=token)),
        ):
            status, body, answer_headers = await handshake(session, target, headers)
            assert status == 401
            answers += [body, str(answer_headers)]
        async with (
            asyncio.timeout(DEFAULT_TIMEOUT),
            session.get(
                f"{pod.base}/api/chat-api/ws/stats", headers={"Authorization": f"Bearer {token}"}
            ) as resp,
        ):
            assert resp.status == 403
            answers.append(await resp.text())

    # Over-long tokens are refused by aiohttp's HTTP parser, which must not log
    # them. (Its 400 answer shows the sender the start of its own line.)
    huge = "hugetoken" + os.urandom(8).hex() * 600
    for headers, target in (
        ({"Authorization": f"Bearer {huge}"}, url),
        ({}, pod.ws_url("general", access_token=huge)),
    ):
        status, _, _ = await handshake(session, target, headers)
        assert status == 400
    bad.append(huge[:24])

    # A good connection; its error frames and messages.
    ws, welcome = await connect(session, url, headers={"Authorization": f"Bearer {good}"})
    answers.append(str(welcome))
    await send(ws, {"type": "join", "room": "a*"})
    answers.append(str(await recv_type(ws, "error")))
    await send(ws, {"type": "message", "data": "hello"})
    answers.append(str(await recv_type(ws, "message")))
    await ws.close()

    for token in (admin, STATS_TOKEN):
        async with (
            asyncio.timeout(DEFAULT_TIMEOUT),
            session.get(
                f"{pod.base}/api/chat-api/ws/stats", headers={"Authorization": f"Bearer {token}"}
            ) as resp,
        ):
            assert resp.status == 200
            answers.append(await resp.text())
    publish = f"{pod.base}/api/chat-api/rooms/general/messages"
    for key in (PUBLISH_KEY[:-1], good):
        async with (
            asyncio.timeout(DEFAULT_TIMEOUT),
            session.post(
                publish, json={"data": 1}, headers={"Authorization": f"Bearer {key}"}
            ) as resp,
        ):
            assert resp.status == 401
            answers.append(await resp.text())
    for path, status in (
        ("/readyz", 200),
        ("/healthz", 200),
        ("/api/chat-api/rooms/general/presence", 401),  # protected like the stats
        ("/metrics", 401),  # and so are the metrics
    ):
        async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(pod.base + path) as resp:
            assert resp.status == status, path
            answers.append(await resp.text())

    pod.wait_for_log(r"redis reconnect attempt \d+ failed")
    pod.stop()
    log = pod.log
    assert "refused a WebSocket" in log  # DEBUG lines were written, and checked
    secrets = [SECRET, STATS_TOKEN, REDIS_PASSWORD, PUBLISH_KEY, good, admin, *bad]
    # Signatures alone are secret enough to check for too.
    secrets += [t.rsplit(".", 1)[-1] for t in (good, admin) if t.rsplit(".", 1)[-1]]
    for secret in secrets:
        assert secret not in log, f"a secret in the log: {secret[:12]}..."
        for answer in answers:
            assert secret not in answer, f"a secret in an answer: {secret[:12]}..."
    assert "Traceback" not in log
    if log_format == "json":
        assert_json_lines(pod.log.splitlines(), pod="pod1")


def assert_json_lines(lines: list[str], *, pod: str) -> list[dict[str, Any]]:
    """Every line is one JSON object with the fields of LOG_FORMAT=json; the
    DEBUG lines of refusals carry their fields, and a malformed request is
    one DEBUG line without a traceback (``logfilter``)."""
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line, whoever wrote it
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message", "pod"} <= set(entry), line
        assert entry["pod"] == pod
        stamp = datetime.fromisoformat(entry["time"])
        assert stamp.utcoffset() == timedelta(0), line
        entries.append(entry)
    refusals = [e for e in entries if e["message"].startswith("refused a WebSocket from")]
    assert refusals, "no refusal was logged"
    for entry in refusals:
        assert entry["level"] == "DEBUG"
        assert entry["logger"] == "chat_api.auth"
        assert entry["status"] == 401
        assert entry["room"] == "general"
        assert entry["connection_id"]
    malformed = [e for e in entries if e["message"].startswith("refused a malformed HTTP request")]
    assert malformed, "no malformed request was logged"
    for entry in malformed:
        assert (entry["level"], entry["logger"]) == ("DEBUG", "aiohttp.server")
        assert "exception" not in entry
    redis = [e for e in entries if e["logger"] == "realtime.redis"]
    assert any("unreachable" in e["message"] for e in redis), "no Redis error was logged"
    (fanout,) = [e for e in entries if e["message"].startswith("cross-pod fan-out")]
    assert fanout["redis"].startswith("redis://chat:***@127.0.0.1:")
    (listening,) = [e for e in entries if "listening on" in e["message"]]
    assert listening["port"] == int(listening["message"].split(":")[2].split()[0])
    return entries


SECRET_SETTINGS = ("AUTH_JWT_SECRET", "STATS_TOKEN", "PUBLISH_API_KEY")


def secret_values(env: dict[str, str]) -> list[str]:
    """The secret parts of ``env``: whole secret settings, and the password of
    ``REDIS_URL`` (the rest of that URL is not secret and may be shown)."""
    found = [value for key, value in env.items() if key in SECRET_SETTINGS]
    if "REDIS_URL" in env:
        password = urlsplit(env["REDIS_URL"]).password
        assert password, f"this case has no password to hide: {env['REDIS_URL']}"
        found.append(password)
    assert found, f"this case has no secret to hide: {env}"
    return found


def test_secret_values_finds_the_redis_password() -> None:
    env = {"REDIS_URL": "redis://user:hunter2-redis-pw@127.0.0.1:6379/0", "PORT": "x"}
    assert secret_values(env) == ["hunter2-redis-pw"]


@pytest.mark.parametrize(
    "env",
    [
        {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": "short-secret-value"},
        {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": "x" * 40, "AUTH_JWKS_URL": "https://a/j"},
        {"REDIS_URL": "http://user:hunter2-redis-pw@127.0.0.1:6379/0"},
        {"REDIS_URL": "redis://user:hunter2-redis-pw@127.0.0.1:6379/0", "PORT": "x"},
        {"REDIS_URL": "redis://:hunter2-redis-pw@127.0.0.1:6379/0", "REDIS_CHANNEL_PREFIX": "a*"},
        {"STATS_TOKEN": "tok-hunter2", "PORT": "99999"},
        {"PUBLISH_API_KEY": "pub-hunter2", "SHUTDOWN_TIMEOUT": "0"},
    ],
)
def test_configuration_errors_do_not_show_secret_values(env: dict[str, str]) -> None:
    hidden = secret_values(env)
    with pytest.raises(ConfigError) as info:
        Config.load(env, env_file=None)
    for value in hidden:
        assert value not in str(info.value)
        assert value not in repr(info.value)
    result = subprocess.run(
        [sys.executable, "-m", "chat_api"],
        env={"PATH": "/usr/bin:/bin", "PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 2
    assert f"{info.value.key}:" in result.stderr  # the error was printed...
    for value in hidden:
        assert value not in result.stderr + result.stdout  # ...without the secret


def test_secrets_are_hidden_from_the_config_repr() -> None:
    config = Config.load(
        {
            "AUTH_ENABLED": "true",
            "AUTH_JWT_SECRET": SECRET,
            "STATS_TOKEN": STATS_TOKEN,
            "REDIS_URL": "redis://:hunter2-redis-pw@127.0.0.1:6379/0",
        },
        env_file=None,
    )
    for value in (SECRET, STATS_TOKEN, "hunter2-redis-pw"):
        assert value not in repr(config)
        assert value not in str(config)
