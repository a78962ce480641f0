"""A private ``redis-server`` process for tests that need to break Redis.

``RedisServer`` starts ``redis-server`` on a free port with persistence off,
waits until it answers PING, and can stop, kill, pause (SIGSTOP), resume
(SIGCONT) and restart it on the same port. Nothing here sleeps for a fixed
time: every wait is on a condition with a deadline.

A missing ``redis-server`` is a reason to skip (``RuntimeError`` from
``RedisServer()``); one that is installed but does not start is a failure
(``RedisStartError``, which no ``except RuntimeError`` turns into a skip), with
the server's own output in the message. The one exception: a TLS server from
a ``redis-server`` built without TLS is ``TlsUnsupported`` (a ``RuntimeError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

import redis

from realtime import RedisBackend

REDIS_SERVER = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
START_TIMEOUT = 10.0


class RedisStartError(Exception):
    """An installed redis-server did not start: a failure, never a skip."""


class TlsUnsupported(RuntimeError):
    """This redis-server was built without TLS (a reason to skip TLS tests)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on 127.0.0.1, started by the test suite."""

    def __init__(
        self,
        *,
        password: str | None = None,
        tls: bool = False,
        port: int = 0,
        extra: tuple[str, ...] = (),
    ) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH")
        self.password = password
        self.tls = tls
        self.port = port
        self.extra = extra
        """More ``redis-server`` arguments (``--cluster-enabled yes``, ``--replicaof``…)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="chat-api-redis-")
        self.socket_path = os.path.join(self._dir.name, "redis.sock")
        self.log_path = os.path.join(self._dir.name, "redis.log")
        self.ca_file = os.path.join(self._dir.name, "ca.pem")
        if tls:
            try:
                make_certificates(self._dir.name)
            except BaseException:
                self._dir.cleanup()
                raise

    # -- addresses ------------------------------------------------------------

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        query = f"?password={self.password}" if self.password else ""
        return f"unix://{self.socket_path}{query}"

    # -- process ----------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start on a free port (or, after a stop, on the same port as before)."""
        for _ in range(5):
            port = self.port or free_port()
            args = [
                REDIS_SERVER,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir.name,
                "--unixsocket", self.socket_path,
                "--unixsocketperm", "700",
                "--loglevel", "warning",
            ]  # fmt: skip
            if self.password:
                args += ["--requirepass", self.password, "--masterauth", self.password]
            args += list(self.extra)
            if self.tls:
                d = self._dir.name
                args[1:3] = ["--port", "0", "--tls-port", str(port)]
                args += [
                    "--tls-cert-file", os.path.join(d, "server.pem"),
                    "--tls-key-file", os.path.join(d, "server.key"),
                    "--tls-ca-cert-file", self.ca_file,
                    "--tls-auth-clients", "no",
                ]  # fmt: skip
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            if self._wait_ready(port):
                self.port = port
                return self
            self._reap()
            output = self.output()
            if self.tls and "tls-port" in output and "Bad directive" in output:
                self._dir.cleanup()  # nothing to stop: the server is gone
                raise TlsUnsupported(f"{REDIS_SERVER} was built without TLS")
            if "Address already in use" not in output:
                break  # not a port race: trying again would fail the same way
        message = f"{REDIS_SERVER} did not start:\n{self.output()[-2000:]}"
        self._dir.cleanup()
        raise RedisStartError(message)

    def output(self) -> str:
        """What redis-server printed (all its starts)."""
        try:
            with open(self.log_path, errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with self.client(port, timeout=1) as client:
                    if client.ping():
                        return True
            except redis.RedisError:
                pass
            time.sleep(0.02)  # polling interval while the server starts
        return False

    def _reap(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(START_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM and wait for the exit (SIGCONT first, in case it is paused)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(START_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: Redis vanishes without closing anything politely."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(START_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    # -- commands ---------------------------------------------------------------

    def client(self, port: int | None = None, *, timeout: float = 5) -> redis.Redis:
        tls: dict[str, Any] = {}
        if self.tls:
            tls = {"ssl": True, "ssl_ca_certs": self.ca_file}
        return redis.Redis(
            host="127.0.0.1",
            port=port or self.port,
            password=self.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **tls,
        )

    def command(self, *args: Any) -> Any:
        """Run one command on a fresh connection (closed afterwards)."""
        with self.client() as client:
            return client.execute_command(*args)

    def channels(self, pattern: str = "*") -> set[str]:
        """``PUBSUB CHANNELS pattern``, decoded."""
        return {c.decode() for c in self.command("PUBSUB", "CHANNELS", pattern)}

    def numsub(self, channel: str) -> int:
        reply = self.command("PUBSUB", "NUMSUB", channel)
        return int(reply[1])

    def kill_pubsub_clients(self) -> int:
        return int(self.command("CLIENT", "KILL", "TYPE", "pubsub"))


def make_certificates(directory: str) -> None:
    """A throw-away CA and a server certificate for 127.0.0.1, made with openssl."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not on PATH")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=chat-api test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    with open(os.path.join(directory, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", "server.pem",
            "-extfile", "san.ext")  # fmt: skip


@contextlib.contextmanager
def running_redis(**kwargs: Any) -> Any:
    server = RedisServer(**kwargs).start()
    try:
        yield server
    finally:
        server.close()


class ReplyCutter:
    """A TCP proxy in front of Redis that can lose a reply on purpose.

    Armed with a marker, the next connection whose client sends it gets that
    command through to Redis; Redis's answer is read and dropped, and the
    client's connection is closed. The command ran; the client cannot know.
    """

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = 0
        self.cut = 0
        self._marker: bytes | None = None
        self._hold = False
        self._swallow = False
        self._drop = False
        self._then: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> ReplyCutter:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(
        self, marker: bytes, *, hold: bool = False, swallow: bool = False, drop: bool = False
    ) -> None:
        """Lose the answer to the next command holding ``marker``: cut the
        connection then (the default), or, with ``hold``, keep it open and
        forward nothing more (the client waits for an answer that never comes).
        With ``swallow``, the command itself is lost: the connection is cut
        before Redis gets it (it never ran; the client cannot know). With
        ``drop``, the command is lost and so is everything the client sends
        after it, the connection kept open: as if the client died just
        before sending it."""
        self._marker = marker
        self._hold = hold
        self._swallow = swallow
        self._drop = drop
        self._then = []

    def then(self, marker: bytes) -> None:
        """Once the armed marker has been met, lose the answer to the next
        command holding ``marker`` too (cutting that connection): a second
        fault right after the first."""
        self._then.append(marker)

    def _met(self) -> None:
        """The armed marker was met: arm the next one (``then``), if any."""
        self._marker = None
        if self._then:
            self._marker = self._then.pop(0)
            self._hold = self._swallow = self._drop = False

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        cutting = asyncio.Event()

        dropping = hold = False

        async def upstream() -> None:
            nonlocal dropping, hold
            while data := await client_r.read(65536):
                if dropping:
                    continue
                if self._marker is not None and self._marker in data:
                    drop, swallow, hold = self._drop, self._swallow, self._hold
                    self._met()
                    if drop:
                        self.cut += 1
                        dropping = True
                        continue
                    if swallow:
                        self.cut += 1
                        client_w.transport.abort()
                        server_w.transport.abort()
                        return
                    cutting.set()
                server_w.write(data)
            server_w.close()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if cutting.is_set():  # the marked command's answer: lose it
                    self.cut += 1
                    if hold:
                        await asyncio.Event().wait()  # until the test stops the proxy
                    break
                client_w.write(data)
            client_w.transport.abort()
            server_w.transport.abort()

        try:
            await asyncio.gather(upstream(), downstream())
        except (OSError, asyncio.CancelledError):
            client_w.transport.abort()
            server_w.transport.abort()
        finally:
            self._tasks.discard(task)


def quick_broadcaster(url: str, pod_id: str, channel_prefix: str, **kwargs: Any) -> RedisBackend:
    """A ``RedisBackend`` with heartbeat and backoff short enough for tests."""
    return RedisBackend(
        url,
        pod_id=pod_id,
        channel_prefix=channel_prefix,
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
        reconnect_max_delay=0.5,
        **kwargs,
    )
