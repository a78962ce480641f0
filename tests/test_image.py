"""The container image, built from the Dockerfile and run for real.

A real Docker daemon (started here as root when none runs and dockerd is
installed), an image built on a Debian base made with debootstrap (no image
registry is reachable; the Dockerfile's apt path gives it Python), two
containers on the host's network sharing a real redis-server started from
the host's binary, and real WebSocket clients: a message crosses pods, the
health check turns healthy, the service runs as non-root as PID 1, and
``docker stop`` gives its client close 1001 and the container exit code 0.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import aiohttp
import pytest

from .conftest import redis_pod_env
from .docker_support import (
    BuiltImage,
    Docker,
    DockerDaemon,
    DockerUnavailable,
    build_image,
    debian_base_image,
    remove_images,
)
from .redis_support import RedisServer, free_port
from .support import connect, eventually, recv, recv_type, send

# The first run on a machine debootstraps (~0.5-3 min) and builds (~1-2 min).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    try:
        daemon = DockerDaemon.ensure()
    except DockerUnavailable as exc:
        pytest.skip(f"no Docker engine: {exc}")
    try:
        yield daemon.docker
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def image(docker: Docker) -> Iterator[BuiltImage]:
    try:
        base = debian_base_image(docker)
    except DockerUnavailable as exc:
        pytest.skip(f"no base image: {exc}")
    built = build_image(docker, f"chat-api-test/chat-api:{uuid.uuid4().hex[:12]}", base)
    try:
        yield built
    finally:
        # The base image stays cached; what this build made goes.
        remove_images(docker, [*built.created, built.tag])


@dataclass
class Container:
    docker: Docker
    id: str
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, room: str) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat-api/ws/{room}"

    def state(self, field: str) -> str:
        return self.docker.inspect(self.id, f"{{{{.State.{field}}}}}")

    def logs(self) -> str:
        result = self.docker.run("logs", self.id, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str) -> str:
        return self.docker.run("exec", self.id, *command).stdout


class Containers:
    """Containers started by one test, each removed afterwards by its id."""

    def __init__(self, docker: Docker, image: str) -> None:
        self.docker = docker
        self.image = image
        self.started: list[Container] = []

    def run(self, env: Mapping[str, str]) -> Container:
        port = free_port()
        args = ["run", "--detach", "--network", "host", "--label", "chat-api-test=image"]
        for key, value in {"HOST": "127.0.0.1", "PORT": str(port), **env}.items():
            args += ["--env", f"{key}={value}"]
        container = Container(self.docker, self.docker.run(*args, self.image).stdout.strip(), port)
        self.started.append(container)
        return container

    def remove_all(self) -> None:
        for container in self.started:
            self.docker.run("rm", "--force", container.id, check=False)


@pytest.fixture
def containers(docker: Docker, image: BuiltImage) -> Iterator[Containers]:
    made = Containers(docker, image.tag)
    try:
        yield made
    finally:
        made.remove_all()


async def wait_ready(session: aiohttp.ClientSession, container: Container) -> None:
    async def ready() -> bool:
        if await asyncio.to_thread(container.state, "Running") != "true":
            raise AssertionError(f"container exited:\n{await asyncio.to_thread(container.logs)}")
        try:
            async with session.get(f"{container.base}/readyz") as resp:
                return resp.status == 200 and (await resp.json())["link_up"] is True
        except aiohttp.ClientConnectionError:
            return False

    await eventually(ready, timeout=30)


async def test_image_serves_two_pods_over_redis_and_stops_with_1001_and_exit_0(
    containers: Containers,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    env = redis_pod_env(redis_server.url, channel_prefix, SHUTDOWN_TIMEOUT="5")
    a = await asyncio.to_thread(containers.run, {**env, "POD_ID": "image-a"})
    b = await asyncio.to_thread(containers.run, {**env, "POD_ID": "image-b"})
    await wait_ready(session, a)
    await wait_ready(session, b)

    # Non-root, and the service itself is PID 1 (exec-form entrypoint).
    assert (await asyncio.to_thread(a.exec, "id", "-u")).strip() != "0"
    status = await asyncio.to_thread(a.exec, "cat", "/proc/1/status")
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert "0" not in uids, status
    cmdline = (await asyncio.to_thread(a.exec, "cat", "/proc/1/cmdline")).split("\0")
    assert cmdline[0].endswith("/python3"), cmdline
    assert cmdline[1] == "/opt/chat-api/bin/chat-api", cmdline

    # A message crosses pods.
    ws_a, welcome_a = await connect(session, a.ws_url("x"))
    ws_b, welcome_b = await connect(session, b.ws_url("x"))
    assert (welcome_a["pod"], welcome_b["pod"]) == ("image-a", "image-b")

    async def both_subscribed() -> bool:
        return redis_server.numsub(f"{channel_prefix}:room:x") == 2

    await eventually(both_subscribed)
    await send(ws_a, {"type": "message", "data": {"text": "from a"}})
    frame = await recv_type(ws_b, "message")
    assert (frame["room"], frame["data"]) == ("x", {"text": "from a"})

    # The image's own HEALTHCHECK (first run after its 10 s interval).
    async def healthy() -> bool:
        states = [await asyncio.to_thread(c.state, "Health.Status") for c in (a, b)]
        return states == ["healthy", "healthy"]

    await eventually(healthy, timeout=45, interval=0.5)

    # docker stop: SIGTERM to PID 1 -> close 1001 to the client -> exit 0.
    stopping = asyncio.create_task(
        asyncio.to_thread(containers.docker.run, "stop", "--time", "20", a.id, timeout=40)
    )
    try:
        while True:
            msg = await recv(ws_a, timeout=20)
            if not isinstance(msg, dict):
                break
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert msg.data == 1001
    finally:
        await stopping
    assert await asyncio.to_thread(a.state, "ExitCode") == "0"
    logs = await asyncio.to_thread(a.logs)
    assert "stopped" in logs, logs
    assert "Traceback" not in logs, logs

    # The other pod carries on.
    await send(ws_b, {"type": "message", "data": "still here"})
    assert (await recv_type(ws_b, "message"))["data"] == "still here"
    await ws_b.close()
