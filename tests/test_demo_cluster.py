"""``make demo-cluster``: Redis and two pods come up together, and Ctrl-C
stops all of them cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from .redis_support import REDIS_SERVER, free_port
from .support import connect, eventually, recv_type, send

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo_cluster.py"


class Output:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                with self._lock:
                    self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.text())) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}x {pattern!r} in:\n{self.text()}")
            time.sleep(0.05)  # polling interval

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Demo:
    """``scripts/demo_cluster.py`` running on two free ports."""

    def __init__(self, redis: str = "standalone") -> None:
        self.ports = [free_port(), free_port()]
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT)],
            env={**os.environ, "DEMO_PORTS": ",".join(map(str, self.ports)), "DEMO_REDIS": redis},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = Output(self.proc)

    def ctrl_c(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self.output.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(params=["standalone", "sentinel", "cluster"])
def demo(request: pytest.FixtureRequest) -> Iterator[Demo]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    running = Demo(request.param)
    yield running
    running.kill()


async def test_demo_cluster_runs_two_linked_pods_and_stops_on_ctrl_c(
    demo: Demo, session: aiohttp.ClientSession
) -> None:
    output = demo.output
    output.wait_for(r"redis link connected", count=2, timeout=60)
    output.wait_for(r"listening on", count=2)
    a, _ = await connect(session, f"ws://127.0.0.1:{demo.ports[0]}/api/chat-api/ws/general")
    b, _ = await connect(session, f"ws://127.0.0.1:{demo.ports[1]}/api/chat-api/ws/general")

    async def a_probe_arrives() -> bool:  # once pod 2's subscription is confirmed
        await send(a, {"type": "message", "data": "probe"})
        try:
            return (await recv_type(b, "message", timeout=0.3))["data"] == "probe"
        except TimeoutError:
            return False

    await eventually(a_probe_arrives)
    await a.close()
    await b.close()
    assert demo.ctrl_c() == 0
    text = output.text()
    assert text.count("chat_api: stopped") == 2, text
    assert "demo-cluster: stopped" in text
    assert "Traceback" not in text


def test_a_pod_that_cannot_start_makes_it_exit_non_zero_with_the_pods_last_lines() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(SCRIPT)],
            env={**os.environ, "DEMO_PORTS": f"{free_port()},{busy}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "demo-cluster: pod2 exited with code 1; its last lines:" in result.stderr
    assert "cannot start" in result.stderr  # the pod's own line, repeated at the end
    assert "demo-cluster: stopped (a process failed)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
