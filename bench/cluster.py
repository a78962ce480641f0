"""The servers under test: a private redis-server and N pods of one system.

Everything listens on 127.0.0.1 on ports picked free by the kernel; each
process is started here, waited for by polling its port, and stopped by its
PID. ``ProcStat`` reads CPU time and RSS of a PID from ``/proc``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after "pid (comm)": state is field 3, utime 14, stime 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KB


def wait_until(check: object, timeout: float, what: str) -> None:
    """Poll ``check()`` every 50 ms until it is true or ``timeout`` passes."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not up after {timeout:.0f}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)


def _spawn(name: str, args: list[str], env: dict[str, str], port: int, logdir: Path) -> Process:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    return Process(name, popen, port, log)


def start_redis(logdir: Path, name: str = "redis") -> Process:
    port = free_port()
    proc = _spawn(
        name,
        ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        dict(os.environ),
        port,
        logdir,
    )
    wait_until(lambda: port_open(port), 10, name)
    return proc


SYSTEMS = ("chat-api", "python-socketio", "node-socketio")
NODE_PEER = ROOT / "bench" / "peers" / "node"


def node_peer_ready() -> bool:
    """The Node peer runs only where node and its npm packages are installed."""
    return shutil.which("node") is not None and (NODE_PEER / "node_modules").is_dir()


RUNNING: list[Cluster] = []
"""Every cluster started and not yet stopped (all systems of a workload)."""


@dataclass
class Cluster:
    """Redis plus ``pods`` server processes of one system."""

    system: str
    pods: int
    logdir: Path
    redis: Process | None = None
    servers: list[Process] = field(default_factory=list)

    def start(self) -> Cluster:
        """Start Redis (if needed) and the pods; on failure, stop what started."""
        RUNNING.append(self)
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Cluster:
        self.logdir.mkdir(parents=True, exist_ok=True)
        needs_redis = self.system != "chat-api" or self.pods > 1
        if needs_redis:
            self.redis = start_redis(self.logdir, f"{self.system}-redis")
        for i in range(self.pods):
            self.servers.append(self._start_pod(i))
        for srv in self.servers:
            if self.system == "chat-api":
                url = f"http://{HOST}:{srv.port}/readyz"
                wait_until(lambda url=url: http_ok(url), 20, srv.name)  # type: ignore[misc]
            else:
                wait_until(lambda p=srv.port: port_open(p), 20, srv.name)  # type: ignore[misc]
        return self

    def _start_pod(self, i: int) -> Process:
        port = free_port()
        name = f"{self.system}-pod{i + 1}"
        redis_url = f"redis://{HOST}:{self.redis.port}/0" if self.redis else ""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONDEVMODE", None)
        if self.system == "chat-api":
            env.update(
                HOST=HOST,
                PORT=str(port),
                POD_ID=name,
                REDIS_URL=redis_url,
                LOG_LEVEL="WARNING",
                # the limiter still runs on every frame, but 4 senders must be
                # able to drive the saturation ladder (300+ messages/s each)
                RATE_LIMIT_PER_SECOND="1000000",
                RATE_LIMIT_BURST="1000000",
            )
            args = [sys.executable, "-m", "chat_api"]
        elif self.system == "python-socketio":
            args = [
                sys.executable,
                str(ROOT / "bench" / "peers" / "socketio_server.py"),
                "--port",
                str(port),
                "--redis",
                redis_url,
                "--pod-id",
                name,
            ]
        elif self.system == "node-socketio":
            args = [
                "node",
                str(NODE_PEER / "server.js"),
                "--port",
                str(port),
                "--redis",
                redis_url,
                "--pod-id",
                name,
            ]
        else:
            raise ValueError(f"unknown system {self.system!r}")
        return _spawn(name, args, env, port, self.logdir)

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def cpu(self) -> float:
        return sum(cpu_seconds(s.pid) for s in self.servers)

    def redis_cpu(self) -> float:
        return cpu_seconds(self.redis.pid) if self.redis else 0.0

    def rss_kb(self) -> int:
        return sum(rss_kb(s.pid) for s in self.servers)

    def alive(self) -> bool:
        return all(s.popen.poll() is None for s in self.servers)

    def stop(self) -> None:
        if self in RUNNING:
            RUNNING.remove(self)
        for srv in self.servers:
            srv.stop()
        if self.redis is not None:
            self.redis.stop()
