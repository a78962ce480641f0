"""Why a message costs more CPU at a low rate than at a high one.

    python -m bench.wakeups          # about 30 s

One local-only chat-api pod, one client (four in the sender's room), the same
frames sent two ways: back to back (the next frame goes as soon as the
replies are in, so the pod never sleeps) and paced (a pause after each
reply, so the pod falls asleep in ``epoll_wait`` and is woken for every
frame). The pod does the same work either way; the difference is the cost of
going to sleep and being woken, and of waking the client it writes to. On a
virtual machine that cost is large, and at a low message rate it is most of
the server CPU per message in the small-rooms workload.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import aiohttp

from .cluster import HOST, Cluster, cpu_seconds

FRAMES: tuple[tuple[str, str, int], ...] = (
    # name, frame, replies the sender waits for
    ("ping", '{"type":"ping"}', 1),
    ("message, no ack", '{"type":"message","data":"hello"}', 1),
    ("message with ack", '{"type":"message","data":"hello","ref":1}', 2),
)


async def measure(port: int, pid: int, count: int, pause: float) -> list[tuple[str, str, float]]:
    url = f"http://{HOST}:{port}/api/chat-api/ws/wakeups"
    rows = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = [await session.ws_connect(url) for _ in range(4)]
        for ws in sockets:
            await ws.receive(timeout=10)  # welcome
        sender = sockets[0]

        async def drain(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for _ in ws:
                pass

        readers = [asyncio.create_task(drain(ws)) for ws in sockets[1:]]
        for name, frame, replies in FRAMES:
            for label, gap in (("back to back", 0.0), (f"paced, {pause * 1e3:g} ms apart", pause)):
                before = cpu_seconds(pid)
                for _ in range(count):
                    await sender.send_str(frame)
                    for _ in range(replies):
                        await sender.receive(timeout=10)
                    if gap:
                        await asyncio.sleep(gap)  # the pod has nothing to do: it sleeps
                used = cpu_seconds(pid) - before
                rows.append((name, label, used / count * 1e6))
        for ws in sockets:
            await ws.close()
        await asyncio.wait(readers, timeout=10)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wakeups", description=__doc__)
    parser.add_argument("--count", type=int, default=3000, help="frames per case")
    parser.add_argument("--pause", type=float, default=0.0015, help="seconds between frames")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the pod started here is stopped by its PID
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = Cluster("chat-api", 1, Path(__file__).parent / "results" / "logs" / "wakeups")
    try:
        cluster.start()
        server = cluster.servers[0]
        rows = asyncio.run(measure(server.port, server.pid, args.count, args.pause))
    finally:
        cluster.stop()
    print("| frame | sent | pod CPU µs / frame |")
    print("|---|---|---|")
    for name, label, us in rows:
        print(f"| {name} | {label} | {us:.0f} |")


if __name__ == "__main__":
    main()
