"""``make demo-cluster``: a private redis-server and two chat-api pods.

Starts ``redis-server`` on a free port (persistence off, data in a temporary
directory) and two pods on 127.0.0.1:8001 and :8002 sharing it, prints their
logs prefixed with their names, and on Ctrl-C (or SIGTERM) stops the pods
gracefully, then Redis. Set ``DEMO_PORTS`` (e.g. ``9001,9002,9003``) for other
or more pods, ``REDIS_SERVER`` for another redis-server binary.
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
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pump(name: str, stream: IO[str]) -> None:
    with stream:
        for line in stream:
            sys.stdout.write(f"{name:>6} | {line}")
            sys.stdout.flush()


def spawn(name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # Ctrl-C reaches this script only; it stops the rest in order
    )
    assert proc.stdout is not None
    threading.Thread(target=pump, args=(name, proc.stdout), daemon=True).start()
    return proc


def wait_for_redis(port: int, proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("demo-cluster: redis-server exited at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)  # polling while redis-server starts
    raise SystemExit("demo-cluster: redis-server did not answer PING")


def main() -> int:
    server = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if server is None:
        print("demo-cluster: redis-server is not on PATH", file=sys.stderr)
        return 1
    ports = [int(p) for p in os.environ.get("DEMO_PORTS", "8001,8002").split(",") if p.strip()]
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    with tempfile.TemporaryDirectory(prefix="chat-api-demo-") as data:
        redis_port = free_port()
        redis = spawn(
            "redis",
            [server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", data, "--loglevel", "warning"],
        )  # fmt: skip
        pods: list[subprocess.Popen[str]] = []
        try:
            wait_for_redis(redis_port, redis)
            url = f"redis://127.0.0.1:{redis_port}/0"
            print(f"demo-cluster: redis-server on {url}", flush=True)
            for i, port in enumerate(ports, 1):
                env = {
                    **os.environ,
                    "REDIS_URL": url,
                    "PORT": str(port),
                    "POD_ID": f"pod{i}",
                    "PYTHONUNBUFFERED": "1",
                }
                pods.append(spawn(f"pod{i}", [sys.executable, "-m", "chat_api"], env))
            pages = "  ".join(f"http://127.0.0.1:{port}/" for port in ports)
            print(f"demo-cluster: open {pages} — Ctrl-C stops everything", flush=True)
            while not stop.is_set():
                if any(p.poll() is not None for p in [redis, *pods]):
                    print("demo-cluster: a process exited; stopping the rest", flush=True)
                    break
                stop.wait(0.5)
        finally:
            for proc in pods:
                if proc.poll() is None:
                    proc.terminate()
            for proc in pods:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if redis.poll() is None:
                redis.terminate()
            redis.wait(10)
    print("demo-cluster: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
