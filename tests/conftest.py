"""Fixtures: real chat-api processes and redis-server processes on free ports,
and an HTTP session."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import aiohttp
import pytest

from .redis_support import REDIS_SERVER, RedisServer
from .support import TRANSPORTS, Pod

PodFactory = Callable[..., Pod]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``contract`` (the protocol's contract) run on every
    transport: their pods are served by aiohttp, and again by the ASGI
    transport under uvicorn."""
    if "transport" in metafunc.fixturenames and metafunc.definition.get_closest_marker("contract"):
        metafunc.parametrize("transport", TRANSPORTS, indirect=True)


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> str:
    """What serves this test's pods (``aiohttp`` unless the test is a
    contract test, which runs on each); ``aiohttp_only`` tests skip ASGI."""
    name: str = getattr(request, "param", "aiohttp")
    marker = request.node.get_closest_marker("aiohttp_only")
    if name != "aiohttp" and marker is not None:
        pytest.skip(f"aiohttp transport only: {marker.args[0]}")
    return name


@pytest.fixture
def pod_factory(transport: str) -> Iterator[PodFactory]:
    """Start pods with ``pod_factory(env, name=..., cwd=..., transport_name=...)``;
    all are stopped afterwards. ``cwd`` is where the pod looks for a ``.env``
    (default: tests/, which has none)."""
    pods: list[Pod] = []

    def start(
        env: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        transport_name: str | None = None,
    ) -> Pod:
        pod = Pod(
            env,
            name=name or f"pod{len(pods) + 1}",
            cwd=cwd,
            transport=transport_name or transport,
        )
        pods.append(pod)
        return pod.start()

    yield start
    for pod in pods:
        pod.kill()


@pytest.fixture
def pod(pod_factory: PodFactory) -> Pod:
    """One local-only pod."""
    return pod_factory()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# -- Redis ---------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, for tests that stop or break it."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def shared_redis_url() -> Iterator[str]:
    """A Redis no test breaks: ``TEST_REDIS_URL`` if set, else one private server."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH and TEST_REDIS_URL is not set")
    server = RedisServer().start()
    yield server.url
    server.close()


@pytest.fixture
def channel_prefix(request: pytest.FixtureRequest) -> str:
    """A channel prefix of this test's own, so tests never hear each other."""
    return f"t-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".translate(
        str.maketrans("[]* ?", "(),__")
    )


def redis_pod_env(url: str, prefix: str, **extra: str) -> dict[str, str]:
    """Pod settings for a cluster test: short heartbeat and backoff, so
    failures are detected and healed within a second or two."""
    return {
        "REDIS_URL": url,
        "REDIS_CHANNEL_PREFIX": prefix,
        "REDIS_HEARTBEAT_INTERVAL": "0.2",
        "REDIS_HEARTBEAT_TIMEOUT": "1.0",
        "REDIS_RECONNECT_MAX_DELAY": "0.5",
        **extra,
    }
