"""``make demo-cluster``: a private redis-server and two chat-api pods.

Starts ``redis-server`` on a free port (persistence off, data in a temporary
directory) and two pods on 127.0.0.1:8001 and :8002 sharing it, prints their
logs prefixed with their names, and on Ctrl-C (or SIGTERM) stops the pods
gracefully, then Redis. Set ``DEMO_PORTS`` (e.g. ``9001,9002,9003``) for other
or more pods, ``REDIS_SERVER`` for another redis-server binary, and
``DEMO_REDIS=sentinel`` (a primary, a replica and three sentinels) or
``DEMO_REDIS=cluster`` (a Redis Cluster of three primaries and three
replicas) instead of one server — all from ``redis-server``, with the
test suite's launchers (``tests/redis_topologies.py``).

If a pod (or Redis) fails to start or exits on its own, the rest are stopped
and the script exits 1, printing the last lines that process wrote.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

TAIL = 20
"""Lines of a failed process's output repeated at the end."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Process:
    """A child process whose output is printed with its name, and whose last
    lines are kept."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.tail: deque[str] = deque(maxlen=TAIL)
        self.proc = spawn(args, env)
        assert self.proc.stdout is not None
        self._pump = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._pump.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.tail.append(line.rstrip("\n"))
                sys.stdout.write(f"{self.name:>6} | {line}")
                sys.stdout.flush()

    def report(self) -> None:
        """Say that it exited, with its last lines."""
        self._pump.join(2)  # what it wrote before exiting
        print(
            f"demo-cluster: {self.name} exited with code {self.proc.returncode}; its last lines:",
            file=sys.stderr,
            flush=True,
        )
        for line in self.tail:
            print(f"{self.name:>6} | {line}", file=sys.stderr, flush=True)


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # Ctrl-C reaches this script only; it stops the rest in order
    )
    return proc


def wait_for_redis(port: int, redis: Process, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if redis.proc.poll() is not None:
            redis.report()
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)  # polling while redis-server starts
    print("demo-cluster: redis-server did not answer PING", file=sys.stderr)
    return False


def main() -> int:
    server = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if server is None:
        print("demo-cluster: redis-server is not on PATH", file=sys.stderr)
        return 1
    ports = [int(p) for p in os.environ.get("DEMO_PORTS", "8001,8002").split(",") if p.strip()]
    kind = os.environ.get("DEMO_REDIS", "standalone")
    if kind not in ("standalone", "sentinel", "cluster"):
        print("demo-cluster: DEMO_REDIS must be standalone, sentinel or cluster", file=sys.stderr)
        return 1
    if kind != "standalone":
        return topology_demo(kind, ports)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    with tempfile.TemporaryDirectory(prefix="chat-api-demo-") as data:
        redis_port = free_port()
        redis = Process(
            "redis",
            [server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", data, "--loglevel", "warning"],
        )  # fmt: skip
        pods: list[Process] = []
        failed = False
        try:
            if not wait_for_redis(redis_port, redis):
                return 1
            url = f"redis://127.0.0.1:{redis_port}/0"
            print(f"demo-cluster: redis-server on {url}", flush=True)
            pods = start_pods(url, ports)
            failed = watch([redis, *pods], stop)
        finally:
            stop_pods(pods)
            if redis.proc.poll() is None:
                redis.proc.terminate()
            redis.proc.wait(10)
    print("demo-cluster: stopped" + (" (a process failed)" if failed else ""), flush=True)
    return 1 if failed else 0


def start_pods(url: str, ports: list[int]) -> list[Process]:
    pods = []
    for i, port in enumerate(ports, 1):
        env = {
            **os.environ,
            "REDIS_URL": url,
            "PORT": str(port),
            "POD_ID": f"pod{i}",
            "PYTHONUNBUFFERED": "1",
        }
        pods.append(Process(f"pod{i}", [sys.executable, "-m", "chat_api"], env))
    pages = "  ".join(f"http://127.0.0.1:{port}/" for port in ports)
    print(f"demo-cluster: open {pages} — Ctrl-C stops everything", flush=True)
    return pods


def watch(processes: list[Process], stop: threading.Event) -> bool:
    """Until Ctrl-C, or until a process exits (then True, with its last lines)."""
    while not stop.is_set():
        exited = [p for p in processes if p.proc.poll() is not None]
        if exited:
            for process in exited:
                process.report()
            print("demo-cluster: stopping the rest", file=sys.stderr, flush=True)
            return True
        stop.wait(0.2)
    return False


def stop_pods(pods: list[Process]) -> None:
    for process in pods:
        if process.proc.poll() is None:
            process.proc.terminate()
    for process in pods:
        try:
            process.proc.wait(15)
        except subprocess.TimeoutExpired:
            process.proc.kill()
            process.proc.wait()


def topology_demo(kind: str, ports: list[int]) -> int:
    """The pods on a Sentinel set or a Cluster (made as the test suite makes them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import redis
    from tests.redis_support import RedisStartError
    from tests.redis_topologies import RedisCluster, SentinelSet

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"demo-cluster: starting a Redis {kind}…", flush=True)
    try:
        topology = SentinelSet().start() if kind == "sentinel" else RedisCluster().start()
    except (RedisStartError, RuntimeError, OSError, redis.RedisError) as exc:  # say why, exit 1
        print(f"demo-cluster: the Redis {kind} did not start: {exc}", file=sys.stderr)
        return 1
    pods: list[Process] = []
    failed = False
    try:
        print(f"demo-cluster: REDIS_URL={topology.url}", flush=True)
        pods = start_pods(topology.url, ports)
        failed = watch(pods, stop)
    finally:
        stop_pods(pods)
        topology.close()
    print("demo-cluster: stopped" + (" (a process failed)" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
