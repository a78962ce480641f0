"""The servers under test: a private redis-server and N pods of one system.

Everything listens on 127.0.0.1 on ports picked free by the kernel; each
process is started here, waited for by polling it (``System.ready``), and
stopped by its PID. ``SYSTEMS`` is the table of systems under test: one
entry each (command line, environment, ready check, which client adapter).
``cpu_seconds`` and ``rss_kb`` read a PID's CPU time and RSS from ``/proc``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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


def http_status(url: str) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


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


REDIS_SERVER = os.environ.get("BENCH_REDIS_SERVER") or "redis-server"
"""The redis-server binary every system's Redis runs: ``BENCH_REDIS_SERVER``
names another (a newer Redis built elsewhere), else the one on PATH."""


def start_redis(logdir: Path, name: str = "redis") -> Process:
    port = free_port()
    proc = _spawn(
        name,
        [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        dict(os.environ),
        port,
        logdir,
    )
    wait_until(lambda: port_open(port), 10, name)
    return proc


POD_TIMELINE_COUNTERS = ("gap_repairs", "recovered", "history_reads", "lost", "duplicates_dropped")
POD_BACKEND_COUNTERS = ("batches", "flush_waits", "appended", "resent")
"""The counters of chat-api's stats that a run records (``pod_counters``)."""

NODE_PEER = ROOT / "bench" / "peers" / "node"
ASGI_EXAMPLE = ROOT / "examples" / "fastapi_chat.py"


@dataclass(frozen=True)
class PodArgs:
    """What one pod of a system is started with."""

    name: str  # also its pod id
    port: int
    redis_url: str  # "" when the system runs without Redis


@dataclass(frozen=True)
class System:
    """One system under test: how to start a pod, when it is ready, which
    client adapter (``bench/wsclient.py``) speaks to it.

    Adding a system is one entry in ``SYSTEMS``."""

    name: str
    dialect: str
    command: Callable[[PodArgs], list[str]]
    env: Callable[[PodArgs], dict[str, str]] = lambda _: {}
    ready: Callable[[int], bool] = lambda port: port_open(port)
    # its own redis-server always, or only when pods share rooms (more than one)
    redis: Literal["always", "shared"] = "always"
    # why the system cannot run here, or None when it can
    missing: Callable[[], str | None] = lambda: None
    # the workloads the default run gives it (None: all); a system named in
    # --systems runs every workload asked for
    workloads: tuple[str, ...] | None = None


def _chat_api_env(p: PodArgs) -> dict[str, str]:
    return {
        "HOST": HOST,
        "PORT": str(p.port),
        "POD_ID": p.name,
        "REDIS_URL": p.redis_url,
        "LOG_LEVEL": "WARNING",
        # the limiter still runs on every frame, but 4 senders must be able
        # to drive the saturation ladder (300+ messages/s each)
        "RATE_LIMIT_PER_SECOND": "1000000",
        "RATE_LIMIT_BURST": "1000000",
    }


def _peer(script: str, *extra: str) -> Callable[[PodArgs], list[str]]:
    """The command line of a Python peer in bench/peers/."""

    def command(p: PodArgs) -> list[str]:
        return [
            sys.executable,
            str(ROOT / "bench" / "peers" / script),
            "--port",
            str(p.port),
            "--redis",
            p.redis_url,
            "--pod-id",
            p.name,
            *extra,
        ]

    return command


def _node(p: PodArgs) -> list[str]:
    return [
        "node",
        str(NODE_PEER / "server.js"),
        "--port",
        str(p.port),
        "--redis",
        p.redis_url,
        "--pod-id",
        p.name,
    ]


def _uvicorn(app: str) -> Callable[[PodArgs], list[str]]:
    def command(p: PodArgs) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            HOST,
            "--port",
            str(p.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]

    return command


def _modules_missing(*modules: str) -> str | None:
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return f"{', '.join(absent)} not installed (pip install -e '.[bench]')"
    return None


def _node_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (NODE_PEER / "node_modules").is_dir():
        return f"its npm packages are not installed (cd {NODE_PEER.relative_to(ROOT)} && npm ci)"
    return None


def _asgi_missing() -> str | None:
    if not ASGI_EXAMPLE.is_file():
        return f"{ASGI_EXAMPLE.relative_to(ROOT)} does not exist"
    return _modules_missing("uvicorn", "fastapi")


BASELINE_ENV = "BENCH_BASELINE_SRC"
"""The ``src/`` directory of another checkout (an earlier commit, say) whose
chat-api the ``chat-api-baseline`` system runs, for before/after figures in
one run: ``git worktree add /tmp/base <rev>``, then
``BENCH_BASELINE_SRC=/tmp/base/src``."""


BASELINE_SETTINGS = "BENCH_BASELINE_SETTINGS"
"""Settings for the ``chat-api-baseline`` pods only, ``NAME=value`` pairs
separated by spaces (``REDIS_FLUSH_DELAY=0.005``): with
``BENCH_BASELINE_SRC`` pointing at this checkout's ``src/``, the same code
with another setting, side by side in one run."""


def _baseline_env(p: PodArgs) -> dict[str, str]:
    settings = dict(
        pair.split("=", 1) for pair in os.environ.get(BASELINE_SETTINGS, "").split() if "=" in pair
    )
    return {**_chat_api_env(p), **settings, "PYTHONPATH": os.environ.get(BASELINE_ENV, "")}


def _baseline_missing() -> str | None:
    src = os.environ.get(BASELINE_ENV, "")
    if not src:
        return f"{BASELINE_ENV} is not set (the src/ of the checkout to compare with)"
    if not (Path(src) / "chat_api" / "__main__.py").is_file():
        return f"{BASELINE_ENV}={src} has no chat_api package"
    return None


def _readyz(port: int) -> bool:
    return http_status(f"http://{HOST}:{port}/readyz") == 200


def _readyz_or_serving(port: int) -> bool:
    """Ready when /readyz says so; an app that mounts no /readyz (404) is
    ready once it answers HTTP at all."""
    return http_status(f"http://{HOST}:{port}/readyz") in (200, 404)


# the new Python peers skip the saturation ladder and the ordering run in the
# default run: with them the default run stays near 12 minutes
_SHORT = ("fanout", "rooms", "idle")

SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System(
            "chat-api",
            dialect="chat-api",
            command=lambda _: [sys.executable, "-m", "chat_api"],
            env=_chat_api_env,
            ready=_readyz,
            redis="shared",
        ),
        System(
            "chat-api-baseline",
            dialect="chat-api",
            command=lambda _: [sys.executable, "-m", "chat_api"],
            env=_baseline_env,
            ready=_readyz,
            redis="shared",
            missing=_baseline_missing,
        ),
        System(
            "chat-api-asgi",
            dialect="chat-api",
            command=_uvicorn("examples.fastapi_chat:app"),
            env=_chat_api_env,
            ready=_readyz_or_serving,
            redis="shared",
            missing=_asgi_missing,
            workloads=(*_SHORT, "ordering"),
        ),
        System(
            "python-socketio",
            dialect="socketio",
            command=_peer("socketio_server.py"),
            missing=lambda: _modules_missing("socketio", "uvicorn"),
        ),
        System("node-socketio", dialect="socketio", command=_node, missing=_node_missing),
        System(
            "django-channels",
            dialect="django-channels",
            command=_peer("django_channels.py", "--layer", "core"),
            missing=lambda: _modules_missing("channels", "channels_redis", "django", "uvicorn"),
            workloads=_SHORT,
        ),
        System(
            "django-channels-pubsub",
            dialect="django-channels",
            command=_peer("django_channels.py", "--layer", "pubsub"),
            missing=lambda: _modules_missing("channels", "channels_redis", "django", "uvicorn"),
            workloads=_SHORT,
        ),
    )
}


def node_peer_ready() -> bool:
    """The Node peer runs only where node and its npm packages are installed."""
    return _node_missing() is None


RUNNING: list[Cluster] = []
"""Every cluster started and not yet stopped (all systems of a workload)."""


@dataclass
class Cluster:
    """Redis plus ``pods`` server processes of one system."""

    system: str
    pods: int
    logdir: Path
    redis_url: str = ""
    """A Redis started elsewhere (a Sentinel set, a Cluster) instead of our own."""
    extra_env: dict[str, str] = field(default_factory=dict)
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

    @property
    def spec(self) -> System:
        return SYSTEMS[self.system]

    def _start(self) -> Cluster:
        self.logdir.mkdir(parents=True, exist_ok=True)
        spec = self.spec
        why_not = spec.missing()
        if why_not:
            raise RuntimeError(f"{self.system} cannot run: {why_not}")
        if not self.redis_url and (spec.redis == "always" or self.pods > 1):
            self.redis = start_redis(self.logdir, f"{self.system}-redis")
        for i in range(self.pods):
            self.servers.append(self._start_pod(i))
        for srv in self.servers:
            wait_until(
                lambda srv=srv: self._check_alive(srv) and spec.ready(srv.port),  # type: ignore[misc]
                20,
                srv.name,
            )
        return self

    def _check_alive(self, srv: Process) -> bool:
        """A pod that exits while starting fails at once, with its log's tail."""
        if srv.popen.poll() is not None:
            tail = srv.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{srv.name} exited with {srv.popen.returncode}:\n{tail}")
        return True

    def _start_pod(self, i: int) -> Process:
        port = free_port()
        name = f"{self.system}-pod{i + 1}"
        redis_url = f"redis://{HOST}:{self.redis.port}/0" if self.redis else self.redis_url
        args = PodArgs(name=name, port=port, redis_url=redis_url)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONDEVMODE", None)
        env.update(self.spec.env(args))
        env.update(self.extra_env)
        return _spawn(name, self.spec.command(args), env, port, self.logdir)

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def cpu(self) -> float:
        return sum(cpu_seconds(s.pid) for s in self.servers)

    def redis_cpu(self) -> float:
        return cpu_seconds(self.redis.pid) if self.redis else 0.0

    def pod_counters(self) -> dict[str, int]:
        """chat-api's own counts, summed over the pods (its stats route):
        history repairs and batches, to tell where a run's time went. Empty
        for the peers, and for an app that does not serve the route."""
        if self.spec.dialect != "chat-api":
            return {}
        total: dict[str, int] = {}
        for srv in self.servers:
            url = f"http://{HOST}:{srv.port}/api/chat-api/ws/stats"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    stats = json.loads(r.read())
            except (urllib.error.URLError, OSError, ValueError):
                return {}
            timeline = stats.get("timeline") or {}
            backend = stats.get("broadcaster") or {}
            for name, value in (
                *((k, timeline.get(k)) for k in POD_TIMELINE_COUNTERS),
                *((k, backend.get(k)) for k in POD_BACKEND_COUNTERS),
            ):
                if isinstance(value, int):
                    total[name] = total.get(name, 0) + value
        return total

    def redis_client(self) -> Any:
        """A redis-py client of the system's own Redis (the caller closes it)."""
        assert self.redis is not None, "this system runs without Redis"
        import redis

        return redis.Redis(host=HOST, port=self.redis.port, socket_timeout=5)

    def redis_commands(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """Redis's own account of where its time went (``INFO commandstats``:
        calls and microseconds per command, since the last reset); with
        ``reset``, start counting afresh. Empty without a Redis."""
        if self.redis is None:
            return {}
        import redis

        client = redis.Redis(host=HOST, port=self.redis.port, socket_timeout=5)
        try:
            if reset:
                client.config_resetstat()
                return {}
            info = client.info("commandstats")
        finally:
            client.close()
        return {
            name.removeprefix("cmdstat_"): {"calls": v["calls"], "usec": v["usec"]}
            for name, v in info.items()
        }

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
