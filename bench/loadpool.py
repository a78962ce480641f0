"""A pool of load-generator processes and one measured run over it."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from . import loadgen
from .cluster import HOST, RUNNING, Cluster, cpu_seconds
from .peerlog import LogMarks


@dataclass(frozen=True)
class Conn:
    """One client connection of a layout: which pod, room and role."""

    pod: int
    room: str
    role: str  # "send", "recv" or "idle"
    sender: int = 0


class LoadPool:
    """``workers`` load-generator processes driven in lock-step."""

    def __init__(self, workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[BaseProcess] = []
        self.runs = 0  # runs made over this pool, for their room names
        for _ in range(workers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=loadgen.main, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)

    def ask(self, commands: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        for pipe, cmd in zip(self.pipes, commands, strict=True):
            pipe.send(cmd)
        deadline = time.monotonic() + timeout
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"load generator did not answer within {timeout:.0f}s")
            replies.append(pipe.recv())
        return replies

    def ask_all(self, cmd: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        return self.ask([cmd] * len(self.pipes), timeout)

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs if p.pid is not None)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send({"cmd": "close"})
        for pipe in self.pipes:
            with contextlib.suppress(OSError, EOFError):
                if pipe.poll(10):
                    pipe.recv()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def percentile(sorted_values: array[int] | list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return float(sorted_values[i])


def settle(cluster: Cluster, timeout: float = 15.0) -> None:
    """Wait (bounded) until the servers of ``cluster`` and of every other
    system's running cluster are idle: a system still working off its last
    run's backlog would bill it to the next run, its own or another's (they
    share the machine)."""
    clusters = [cluster, *(c for c in RUNNING if c is not cluster)]

    def busy() -> float:
        return sum(c.cpu() for c in clusters if c.alive())

    deadline = time.monotonic() + timeout
    last = busy()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = busy()
        if now - last < 0.02 * len(clusters):
            return
        last = now


def measured_run(
    pool: LoadPool,
    cluster: Cluster,
    layout: list[Conn],
    *,
    rate_per_sender: float,
    duration: float,
    record_order: bool = False,
    grace: float = 3.0,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Connect ``layout``, send for ``duration``, collect, close; the numbers.

    Each run has rooms of its own (``layout``'s names with a prefix per run):
    nothing a run leaves in a server or its Redis (a group still holding a
    crashed consumer, a room's history) is met by the next one."""
    workers = len(pool.pipes)
    shares = _shares(pool, cluster, sorted(layout, key=lambda c: c.role != "send"))
    settle(cluster)
    marks = LogMarks([srv.log for srv in cluster.servers])
    started = time.perf_counter()
    connected = pool.ask(
        [
            {
                "cmd": "connect",
                "dialect": cluster.spec.dialect,
                "host": HOST,
                "conns": share,
                "record_order": record_order,
                "concurrency": 32,
            }
            for share in shares
        ],
        timeout=120,
    )
    connect_s = time.perf_counter() - started
    failed = sum(r["failed"] for r in connected)
    result: dict[str, Any] = {
        "system": cluster.system,
        "connections": sum(r["connected"] for r in connected),
        "connect_failures": failed,
        "connect_s": round(connect_s, 3),
    }
    if failed:
        result["first_connect_failure"] = next(r["first_failure"] for r in connected if r["failed"])
    spy = None
    if profile is not None:  # sample the first pod while it works
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(cluster.servers[0].pid),
                "--format",
                "raw",
                "--output",
                str(profile),
                "--duration",
                str(int(duration) + 1),
                "--rate",
                "250",
                "--nonblocking",
                "--function",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    cluster.redis_commands(reset=True)
    pods0 = cluster.pod_counters()
    cpu0, redis0, gen0 = cluster.cpu(), cluster.redis_cpu(), pool.cpu()
    wall0 = time.perf_counter()
    t0 = time.monotonic_ns() + 200_000_000
    sent = pool.ask(
        [
            {"cmd": "send", "t0": t0, "duration": duration, "rate": rate_per_sender, "phase": i}
            for i in range(workers)
        ],
        timeout=duration + 30,
    )
    expect: dict[str, int] = {}
    for r in sent:
        for room, n in r["sent"].items():
            expect[room] = expect.get(room, 0) + n
    collected = pool.ask_all({"cmd": "collect", "expect": expect, "grace": grace}, grace + 30)
    cpu1, redis1, gen1 = cluster.cpu(), cluster.redis_cpu(), pool.cpu()
    wall = time.perf_counter() - wall0
    commands = cluster.redis_commands()
    pods1 = cluster.pod_counters()

    messages = sum(expect.values())
    expected = sum(r["expected"] for r in collected)
    received = sum(r["received"] for r in collected)
    lat: array[int] = array("q")
    for r in collected:
        part: array[int] = array("q")
        part.frombytes(r["latencies_us"])
        lat.extend(part)
    lat_sorted = sorted(lat)
    server_cpu = cpu1 - cpu0
    redis_cpu = redis1 - redis0
    # Redis's CPU per room message, and the room messages per second one
    # Redis core would carry at that cost
    redis_us = 1e6 * redis_cpu / messages if messages and cluster.redis else None
    orders = [h for r in collected for h in r["orders"]]
    result.update(
        messages=messages,
        intended=sum(r["intended"] for r in sent),
        sender_late_ms=round(max(r["late_ms"] for r in sent), 1),
        deliveries_expected=expected,
        deliveries=received,
        loss_pct=round(100.0 * (expected - received) / expected, 4) if expected else 0.0,
        duplicates=sum(r["dups"] for r in collected),
        deliveries_per_s=round(received / duration),
        latency_ms={
            "p50": percentile(lat_sorted, 0.50) / 1000,
            "p99": percentile(lat_sorted, 0.99) / 1000,
            "max": percentile(lat_sorted, 1.0) / 1000,
        },
        server_cpu_s=round(server_cpu, 3),
        server_cpu_us_per_delivery=round(1e6 * server_cpu / received, 2) if received else None,
        server_cpu_us_per_message=round(1e6 * server_cpu / messages, 1) if messages else None,
        server_cpu_cores=round(server_cpu / wall, 3),
        redis_cpu_s=round(redis_cpu, 3),
        redis_cpu_us_per_message=round(redis_us, 2) if redis_us else None,
        redis_bound_messages_per_s=round(1e6 / redis_us) if redis_us else None,
        # Redis's time in commands (the rest of redis_cpu_s is its network
        # I/O and event loop), per command, per room message
        redis_command_us_per_message={
            name: round(v["usec"] / messages, 2)
            for name, v in sorted(commands.items(), key=lambda kv: -kv[1]["usec"])
        }
        if messages
        else {},
        # and how many calls of each, per room message (a script's inner
        # commands are counted inside it and again on their own)
        redis_command_calls_per_message={
            name: round(v["calls"] / messages, 3)
            for name, v in sorted(commands.items(), key=lambda kv: -kv[1]["usec"])
        }
        if messages
        else {},
        # chat-api's own counts over the run (history repairs, batches...)
        pod_counters={k: v - pods0.get(k, 0) for k, v in pods1.items()},
        loadgen_cpu_cores=round((gen1 - gen0) / wall, 3),
        acks=sum(r["acks"] for r in collected),
        errors=sum(r["errors"] for r in collected),
        closed_by_server=sum(r["closed_by_server"] for r in collected),
        servers_alive=cluster.alive(),
        peer_log=marks.scan(),  # what the servers logged from connect to collect
    )
    if record_order:
        result["distinct_orders"] = len(set(orders))
        result["complete_receivers"] = len(orders)
        result["fifo_violations"] = sum(r["fifo_violations"] for r in collected)
    pool.ask_all({"cmd": "disconnect"}, 30)
    # the servers handle the closes after the clients are gone: what they log
    # doing it (a consumer failing to leave its group) is the run's teardown
    settle(cluster, timeout=10)
    result["peer_log_teardown"] = marks.scan()
    if spy is not None:
        spy.wait(30)
    return result


def _shares(pool: LoadPool, cluster: Cluster, layout: list[Conn]) -> list[list[Any]]:
    """``layout`` dealt round-robin over the pool's workers, its rooms named
    for this run."""
    pool.runs += 1
    tag = f"k{pool.runs}-"
    shares: list[list[Any]] = [[] for _ in pool.pipes]
    for i, c in enumerate(layout):
        shares[i % len(shares)].append((cluster.ports[c.pod], tag + c.room, c.role, c.sender))
    return shares


def measured_connect(
    pool: LoadPool, cluster: Cluster, layout: list[Conn], settle_first: bool = True
) -> dict[str, Any]:
    """Open ``layout`` (idle connections); connect rate and RSS per connection."""
    shares = _shares(pool, cluster, layout)
    if settle_first:
        settle(cluster)
    marks = LogMarks([srv.log for srv in cluster.servers])
    rss0 = cluster.rss_kb()
    started = time.perf_counter()
    replies = pool.ask(
        [
            {"cmd": "connect", "dialect": cluster.spec.dialect, "host": HOST, "conns": share}
            for share in shares
        ],
        timeout=300,
    )
    seconds = time.perf_counter() - started
    settle(cluster, timeout=5)
    rss1 = cluster.rss_kb()
    connected = sum(r["connected"] for r in replies)
    failed = sum(r["failed"] for r in replies)
    result = {
        "system": cluster.system,
        "connections": connected,
        "connect_failures": failed,
        "connect_s": round(seconds, 3),
        "connects_per_s": round(connected / seconds) if seconds else None,
        "rss_before_kb": rss0,
        "rss_after_kb": rss1,
        "kb_per_connection": round((rss1 - rss0) / connected, 2) if connected else None,
        "servers_alive": cluster.alive(),
        "peer_log": marks.scan(),
    }
    if failed:
        result["first_connect_failure"] = next(r["first_failure"] for r in replies if r["failed"])
    pool.ask_all({"cmd": "disconnect"}, 60)
    settle(cluster, timeout=10)
    result["peer_log_teardown"] = marks.scan()
    return result
