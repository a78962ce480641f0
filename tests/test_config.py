"""Config.load(): parsing, validation, and docs that stay in step with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from chat_api.config import Config, ConfigError, redact_url

from .conftest import PodFactory
from .support import connect

ROOT = Path(__file__).resolve().parent.parent


def _example() -> dict[str, tuple[str, str]]:
    """``NAME -> (default, comment line above it)`` from .env.example."""
    entries: dict[str, tuple[str, str]] = {}
    comment = ""
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith("# "):
            comment = line[2:]
        elif "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            entries[name] = (value, comment)
    return entries


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def test_defaults_are_local_only_on_localhost_8000() -> None:
    config = Config.load({}, env_file=None)
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.local_only
    assert config.pod_id  # generated


def test_env_example_lists_every_setting_with_its_default_and_help() -> None:
    example = _example()
    for f in Config.settings():
        name = f.metadata["env"]
        assert name in example, f"{name} missing from .env.example"
        value, comment = example[name]
        assert value == _shown(f.default), f"{name}: .env.example says {value!r}"
        assert comment == f.metadata["help"], f"{name}: comment differs from the field's help"
    assert set(example) == {f.metadata["env"] for f in Config.settings()}


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for f in Config.settings():
        name = f.metadata["env"]
        assert re.search(rf"^\| `{name}` \|", readme, re.M), f"{name} missing from README table"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"AUTH_ENABLED": "maybe"}, "AUTH_ENABLED"),
        ({"MAX_MESSAGE_BYTES": "10"}, "MAX_MESSAGE_BYTES"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"REDIS_URL": "http://example"}, "REDIS_URL"),
        ({"REDIS_CHANNEL_PREFIX": "a*b"}, "REDIS_CHANNEL_PREFIX"),
        ({"WS_PING_INTERVAL": "nan"}, "WS_PING_INTERVAL"),
        ({"REDIS_FLUSH_DELAY": "-0.001"}, "REDIS_FLUSH_DELAY"),
        ({"REDIS_FLUSH_DELAY": "2"}, "REDIS_FLUSH_DELAY"),
        # the drain delay counts against the shutdown timeout
        ({"SHUTDOWN_DRAIN_DELAY": "10", "SHUTDOWN_TIMEOUT": "10"}, "SHUTDOWN_DRAIN_DELAY"),
        (
            {"REDIS_HEARTBEAT_INTERVAL": "5", "REDIS_HEARTBEAT_TIMEOUT": "5"},
            "REDIS_HEARTBEAT_TIMEOUT",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env, env_file=None)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}:")


def test_environment_overrides_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=9001\nHOST=127.0.0.2\n")
    config = Config.load({"PORT": "9002"}, env_file=env_file)
    assert (config.host, config.port) == ("127.0.0.2", 9002)


def test_redis_password_is_hidden() -> None:
    config = Config.load({"REDIS_URL": "redis://user:s3cret@127.0.0.1:6379/0"}, env_file=None)
    assert "s3cret" not in repr(config)
    assert redact_url(config.redis_url) == "redis://user:***@127.0.0.1:6379/0"


def test_bad_value_stops_the_process_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chat_api"],
        env={"PATH": "/usr/bin:/bin", "PORT": "nope"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT / "tests",
    )
    assert result.returncode == 2
    assert "PORT" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_pod_reads_dot_env_from_its_working_directory_and_the_environment_wins(
    pod_factory: PodFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(
        "# settings for this test\nMAX_ROOMS_PER_CONNECTION=3\nMAX_MESSAGE_BYTES=2048\n"
    )
    pod = pod_factory({"MAX_MESSAGE_BYTES": "4096"}, cwd=tmp_path)
    ws, welcome = await connect(session, pod.ws_url("general"))
    assert welcome["limits"] == {"max_message_bytes": 4096, "max_rooms": 3}
    await ws.close()
    # The same pod started elsewhere (tests/, no .env) has the defaults.
    plain = pod_factory({"MAX_MESSAGE_BYTES": "4096"})
    ws, welcome = await connect(session, plain.ws_url("general"))
    assert welcome["limits"] == {"max_message_bytes": 4096, "max_rooms": 10}
    await ws.close()
