"""Scale evidence for Redis Cluster, and the price of waiting for replicas.

``python -m bench.topologies`` (``make bench-topologies``) runs two things,
each side by side with the same workload on one standalone Redis:

1. **Sharding.** A 3-shard Cluster (3 primaries, 3 replicas) and 6 chat-api
   pods; a few thousand rooms, each hosted by one pod (its sender and its
   receiver connect there), the pods hosting unequal shares (1 to 6 parts).
   Reported per pod: its rooms, the channels it subscribes, its links per
   shard, and the pub/sub bytes it read; per shard: Redis CPU per room message
   and its share of the load. The claim under test: a pod's subscriptions are
   its rooms, its pub/sub bytes follow its rooms (not the total traffic), the
   shards carry load within ±25 % of each other, and each shard has one link
   per pod.
2. **Durability.** The ack latency of a room message (send → ack) on a
   Sentinel set (a primary, a replica, 3 sentinels), with
   ``REDIS_WAIT_REPLICAS=1`` (the default there) and ``0``.

Figures, not assertions: results in ``bench/results/topologies.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from tests.redis_support import RedisServer
from tests.redis_topologies import RedisCluster, SentinelSet

from .cluster import HOST, Cluster, cpu_seconds
from .loadpool import Conn, LoadPool, measured_run

RESULTS = Path(__file__).parent / "results"
PODS = 6


def _stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/api/chat-api/ws/stats", timeout=10) as r:
        body: dict[str, Any] = json.load(r)
    return body


def layout(rooms: int) -> tuple[list[Conn], list[int]]:
    """Rooms dealt to the pods in unequal shares (pod i hosts i+1 parts);
    each room's sender and receiver on its pod."""
    parts = list(range(1, PODS + 1))
    owners: list[int] = []
    for pod, weight in enumerate(parts):
        owners += [pod] * round(rooms * weight / sum(parts))
    conns: list[Conn] = []
    for r, pod in enumerate(owners):
        conns.append(Conn(pod, f"t{r}", "send", r + 1))
        conns.append(Conn(pod, f"t{r}", "recv"))
    return conns, [owners.count(p) for p in range(PODS)]


def _sampled_run(
    pool: LoadPool, cluster: Cluster, conns: list[Conn], rate: float, seconds: float
) -> tuple[dict[str, Any], list[int]]:
    """``measured_run``, and the most channels each pod had subscribed meanwhile."""
    peaks = [0] * len(cluster.ports)
    done = threading.Event()

    def sample() -> None:  # each pod's subscriptions while the rooms are up
        while not done.wait(0.5):
            for i, port in enumerate(cluster.ports):
                with contextlib.suppress(OSError):
                    peaks[i] = max(peaks[i], _stats(port)["broadcaster"]["subscribed_channels"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = measured_run(pool, cluster, conns, rate_per_sender=rate, duration=seconds)
    finally:
        done.set()
        sampler.join()
    return result, peaks


def _one_topology(
    kind: str, args: argparse.Namespace, logdir: Path, pool: LoadPool, wait: str = "auto"
) -> dict[str, Any]:
    conns, hosted = layout(args.rooms)
    rate = args.rate / sum(c.role == "send" for c in conns)
    topology: RedisCluster | RedisServer
    if kind == "cluster":
        topology = RedisCluster().start()
        nodes = {n.port: n for n in topology.nodes}
        primaries = topology.primaries()
    else:
        topology = RedisServer().start()
        nodes = {topology.port: topology}
        primaries = [topology.port]
    cluster = Cluster(
        "chat-api",
        PODS,
        logdir / f"{kind}-wait-{wait}",
        redis_url=topology.url,
        extra_env={"REDIS_WAIT_REPLICAS": wait},
    )
    try:
        cluster.start()
        pids = {p: nodes[p].proc.pid for p in primaries if nodes[p].proc is not None}
        cpu0 = {p: cpu_seconds(pid) for p, pid in pids.items()}
        before = [_stats(port)["broadcaster"]["received_bytes"] for port in cluster.ports]
        result, peaks = _sampled_run(pool, cluster, conns, rate, args.seconds)
        shard_cpu = {p: cpu_seconds(pid) - cpu0[p] for p, pid in pids.items()}
        after = [_stats(port)["broadcaster"] for port in cluster.ports]
        links = {}
        if isinstance(topology, RedisCluster):
            for p in primaries:
                links[p] = topology.command(p, "CLIENT", "LIST").decode().count(":link")
    finally:
        cluster.stop()
        topology.close()
    messages = result["messages"]
    mean = statistics.mean(shard_cpu.values())
    read = [after[i]["received_bytes"] - before[i] for i in range(PODS)]
    return {
        "messages": messages,
        "loss_pct": result["loss_pct"],
        "p99_ms": result["latency_ms"]["p99"],
        "redis_cpu_us_per_message": round(1e6 * sum(shard_cpu.values()) / messages, 2),
        "per_shard": {
            str(p): {
                "cpu_us_per_message": round(1e6 * shard_cpu[p] / messages, 2),
                "share_vs_mean": round(shard_cpu[p] / mean, 2) if mean else None,
                "links": links.get(p),
            }
            for p in primaries
        },
        "per_pod": [
            {
                "rooms": hosted[i],
                "peak_channels": peaks[i],
                "pubsub_bytes": read[i],
                "bytes_per_room": round(read[i] / max(1, hosted[i])),
            }
            for i in range(PODS)
        ],
    }


def sharding(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    _, hosted = layout(args.rooms)
    out: dict[str, Any] = {"rooms": sum(hosted), "hosted": hosted, "rate": args.rate}
    pool = LoadPool(2)
    try:
        for name, kind, wait in (
            ("cluster", "cluster", "auto"),
            ("cluster_no_wait", "cluster", "0"),
            ("standalone", "standalone", "auto"),
        ):
            out[name] = _one_topology(kind, args, logdir, pool, wait)
            print(f"[topologies] sharding {name}: {json.dumps(out[name])}", flush=True)
    finally:
        pool.close()
    return out


async def _ack_latencies(port: int, count: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"ws://{HOST}:{port}/api/chat-api/ws/latency")
        await ws.receive()  # welcome
        latencies = []
        for n in range(count):
            started = time.perf_counter()
            await ws.send_str(json.dumps({"type": "message", "data": n, "ref": n}))
            while True:
                frame = json.loads((await ws.receive(timeout=10)).data)
                if frame.get("type") == "ack" and frame.get("ref") == n:
                    break
            latencies.append((time.perf_counter() - started) * 1000)
        await ws.close()
        return latencies


def durability(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sentinels = SentinelSet().start()
    try:
        for replicas in ("1", "0"):
            cluster = Cluster(
                "chat-api",
                1,
                logdir / f"wait{replicas}",
                redis_url=sentinels.url,
                extra_env={"REDIS_WAIT_REPLICAS": replicas},
            )
            try:
                cluster.start()
                lat = sorted(asyncio.run(_ack_latencies(cluster.ports[0], args.acks)))
                out[f"wait_replicas={replicas}"] = {
                    "acks": len(lat),
                    "p50_ms": round(lat[len(lat) // 2], 3),
                    "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 3),
                }
                print(f"[topologies] durability {replicas}: {out[f'wait_replicas={replicas}']}")
            finally:
                cluster.stop()
    finally:
        sentinels.close()
    return out


def report(results: dict[str, Any]) -> str:
    lines = ["# Redis topologies", ""]
    s = results["sharding"]
    lines += [
        f"{s['rooms']} rooms, one pod each (shares {s['hosted']}), {PODS} pods, "
        f"{s['rate']} room messages/s.",
        "",
        "| | Cluster (3 shards), waiting for a replica | Cluster, REDIS_WAIT_REPLICAS=0 "
        "| one Redis |",
        "|---|---|---|---|",
    ]
    for label, key in (
        ("Redis CPU µs / room message, all primaries", "redis_cpu_us_per_message"),
        ("loss %", "loss_pct"),
        ("p99 ms", "p99_ms"),
    ):
        row = [str(s[name][key]) for name in ("cluster", "cluster_no_wait", "standalone")]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "| shard | Redis CPU µs / room message | load ÷ mean | links (one per pod) |",
        "|---|---|---|---|",
    ]
    for port, shard in s["cluster"]["per_shard"].items():
        lines.append(
            f"| {port} | {shard['cpu_us_per_message']} | {shard['share_vs_mean']} "
            f"| {shard['links']} |"
        )
    lines += [
        "",
        "| pod | rooms hosted | channels subscribed (peak) | pub/sub bytes read | bytes / room |",
        "|---|---|---|---|---|",
    ]
    for i, pod in enumerate(s["cluster"]["per_pod"]):
        lines.append(
            f"| {i + 1} | {pod['rooms']} | {pod['peak_channels']} | {pod['pubsub_bytes']} "
            f"| {pod['bytes_per_room']} |"
        )
    d = results["durability"]
    lines += [
        "",
        "Ack latency of a room message, one at a time, on a Sentinel set:",
        "",
        "| | p50 ms | p99 ms |",
        "|---|---|---|",
    ]
    for name, row in d.items():
        lines.append(f"| {name} | {row['p50_ms']} | {row['p99_ms']} |")
    lines += ["", f"Run: `{' '.join(['python -m bench.topologies', *sys.argv[1:]])}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.topologies", description=__doc__)
    parser.add_argument("--rooms", type=int, default=2100)
    parser.add_argument("--rate", type=float, default=1500.0, help="room messages/s in all")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--acks", type=int, default=400)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logdir = args.out / "logs" / "topologies"
    results = {"sharding": sharding(args, logdir), "durability": durability(args, logdir)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "topologies.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (args.out / "topologies.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
