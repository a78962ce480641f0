"""The ``chat-api`` console script: serve (the default), token, chat, --help, --version.

Run as a user runs it (the installed script, in a directory of its own with
or without a ``.env``); the token it prints is presented to a real pod.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import jwt
import pytest

from .conftest import PodFactory
from .support import DEFAULT_TIMEOUT, connect

SCRIPT = str(Path(sys.executable).with_name("chat-api"))
SECRET = "cli-secret-" + os.urandom(24).hex()


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "STATS_"))}
    return subprocess.run(
        [SCRIPT, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


def test_help_lists_the_commands_and_version_comes_from_the_package(tmp_path: Path) -> None:
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("serve", "token", "chat"):
        assert command in result.stdout
    result = run("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"chat-api {importlib.metadata.version('chat-api')}"
    assert run("token", "--help", cwd=tmp_path).returncode == 0
    bad = run("frobnicate", cwd=tmp_path)
    assert bad.returncode == 2
    assert "invalid choice" in bad.stderr


def test_token_without_a_secret_says_so_and_prints_nothing(tmp_path: Path) -> None:
    result = run("token", "--sub", "ada", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "AUTH_JWT_SECRET is not set" in result.stderr
    short = run("token", "--sub", "ada", cwd=tmp_path, env={"AUTH_JWT_SECRET": "x" * 40})
    assert short.returncode == 0  # 40 bytes are enough for HS256 ...
    too_short = run(
        "token",
        "--sub",
        "ada",
        "--algorithm",
        "HS512",
        cwd=tmp_path,
        env={"AUTH_JWT_SECRET": "x" * 40},
    )
    assert too_short.returncode == 2  # ... not for HS512
    assert "at least 64 bytes" in too_short.stderr
    assert SECRET not in too_short.stderr


def test_token_uses_the_pods_settings_from_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"AUTH_JWT_SECRET={SECRET}\nAUTH_AUDIENCE=chat\nAUTH_ISSUER=https://id.example\n"
        "AUTH_NAME_CLAIM=display\nAUTH_ROOMS_CLAIM=allowed\nAUTH_ADMIN_CLAIM=ops\n"
        "AUTH_JWT_ALGORITHMS=HS384\n"
    )
    result = run(
        "token", "--sub", "ada", "--name", "Ada L.", "--rooms", "general, team-*", "--admin",
        "--ttl", "600", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    token = result.stdout.strip()
    assert result.stdout == token + "\n"  # only the token
    assert jwt.get_unverified_header(token)["alg"] == "HS384"
    claims = jwt.decode(
        token, SECRET, algorithms=["HS384"], audience="chat", issuer="https://id.example"
    )
    assert claims["sub"] == "ada"
    assert claims["display"] == "Ada L."
    assert claims["allowed"] == ["general", "team-*"]
    assert claims["ops"] is True
    assert 590 <= claims["exp"] - claims["iat"] <= 600


async def test_a_pod_with_the_same_dotenv_admits_the_token(
    tmp_path: Path, pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    (tmp_path / ".env").write_text(
        f"AUTH_ENABLED=true\nAUTH_JWT_SECRET={SECRET}\nAUTH_AUDIENCE=chat-api\n"
    )
    made = run("token", "--sub", "ada", "--name", "Ada", "--rooms", "general", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    admin = run("token", "--sub", "ops", "--admin", cwd=tmp_path).stdout.strip()
    pod = pod_factory(cwd=tmp_path)
    ws, welcome = await connect(session, pod.ws_url("general", access_token=token))
    assert welcome["user"] == {"id": "ada", "name": "Ada"}
    await ws.close()
    async with session.get(pod.ws_url("other", access_token=token)) as resp:
        assert resp.status == 403  # the rooms claim
    headers = {"Authorization": f"Bearer {admin}"}
    async with session.get(f"{pod.base}/metrics", headers=headers, timeout=DEFAULT_TIMEOUT) as resp:
        assert resp.status == 200


@pytest.mark.skipif(
    importlib.util.find_spec("chat_api.client") is not None, reason="the client is installed"
)
def test_chat_without_the_client_says_it_is_not_available(tmp_path: Path) -> None:
    result = run("chat", "--help", cwd=tmp_path)
    assert result.returncode == 2
    assert "not available" in result.stderr
