"""One load-generator process: its share of the connections of a run.

The runner starts several of these (``multiprocessing``, spawn) and steers
them through a run with small dict commands over a pipe:

``connect``  open the connections of the plan (bounded concurrency), report
             how many and how fast;
``send``     from a shared start instant, senders send at a fixed rate for a
             fixed time; report how many messages went to each room;
``collect``  wait (up to a grace period) until every receiver has every
             message sent to its room, then report counts, duplicates,
             latencies and orders;
``close``    close everything and exit.

Every loop here is bounded by a count or a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from multiprocessing.connection import Connection
from typing import Any

from .wsclient import DIALECTS, Tally, WsClient, connect

TICK = 0.001  # pacing granularity of the senders, seconds


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Worker:
    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.tally = Tally()
        self.receivers: list[WsClient] = []
        self.senders: list[tuple[int, WsClient]] = []
        self.others: list[WsClient] = []

    async def recv(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        msg: dict[str, Any] = await loop.run_in_executor(None, self.pipe.recv)
        return msg

    async def run(self) -> None:
        while True:
            cmd = await self.recv()
            kind = cmd["cmd"]
            if kind == "connect":
                reply = await self.connect(cmd)
            elif kind == "send":
                reply = await self.send(cmd)
            elif kind == "collect":
                reply = await self.collect(cmd)
            elif kind == "disconnect":
                await self.close()
                reply = {"ok": True}
            elif kind == "close":
                await self.close()
                self.pipe.send({"ok": True})
                return
            else:
                reply = {"error": f"unknown command {kind!r}"}
            self.pipe.send(reply)

    # -- phases ---------------------------------------------------------------

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        dialect = DIALECTS[cmd["dialect"]]
        host: str = cmd["host"]
        self.tally = Tally(record_order=cmd.get("record_order", False))
        limit = asyncio.Semaphore(cmd.get("concurrency", 64))
        failures: list[str] = []

        async def one(port: int, room: str, role: str, sender: int) -> None:
            async with limit:
                try:
                    client = await connect(
                        host, port, dialect, room, self.tally if role == "recv" else None
                    )
                except (OSError, TimeoutError) as exc:
                    failures.append(repr(exc))
                    return
            if role == "recv":
                self.receivers.append(client)
            elif role == "send":
                self.senders.append((sender, client))
            else:
                self.others.append(client)

        started = time.perf_counter()
        await asyncio.gather(*(one(*c) for c in cmd["conns"]))
        seconds = time.perf_counter() - started
        self.senders.sort(key=lambda pair: pair[0])
        return {
            "connected": len(self.receivers) + len(self.senders) + len(self.others),
            "failed": len(failures),
            "first_failure": failures[0] if failures else None,
            "seconds": seconds,
        }

    async def send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Send ``rate`` messages/s from each sender, spread evenly in time:
        message k of this worker goes at t0 + k / (rate * senders)."""
        t0: int = cmd["t0"]
        duration: float = cmd["duration"]
        rate: float = cmd["rate"]
        senders = self.senders
        n = len(senders)
        sent_by_room: dict[str, int] = {}
        if n == 0 or rate <= 0:
            return {"sent": sent_by_room, "intended": 0, "late_ms": 0.0}
        per_ns = rate * n / 1e9
        total = int(rate * n * duration)
        offset = cmd.get("phase", 0.0) / (rate * n) * 1e9  # spread workers apart
        k = 0
        late_ns = 0
        while k < total:
            now = time.monotonic_ns()
            due = min(total, int((now - t0 - offset) * per_ns) + 1) if now >= t0 else 0
            if due > k:
                late_ns = max(late_ns, now - int(t0 + offset + k / per_ns))
            while k < due:
                sender, client = senders[k % n]
                client.send_message(sender, k // n)
                k += 1
            if k < total:
                await asyncio.sleep(TICK if now >= t0 else (t0 - now) / 1e9)
        for i, (_, client) in enumerate(senders):
            count = total // n + (1 if i < total % n else 0)
            sent_by_room[client.room] = sent_by_room.get(client.room, 0) + count
        return {"sent": sent_by_room, "intended": total, "late_ms": late_ns / 1e6}

    async def collect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        expect: dict[str, int] = cmd["expect"]
        deadline = time.monotonic() + cmd["grace"]
        receivers = self.receivers

        def missing() -> bool:
            return any(c.received < expect.get(c.room, 0) for c in receivers)

        # polling plain counters is cheaper than an event per received frame
        while missing() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        tally = self.tally
        expected = sum(expect.get(c.room, 0) for c in receivers)
        received = sum(c.received for c in receivers)
        orders: list[int] = []
        fifo_violations = 0
        for c in receivers:
            if c.order is None:
                continue
            last: dict[int, int] = {}
            for key in c.order:
                sender, seq = key >> 32, key & 0xFFFFFFFF
                if seq < last.get(sender, -1):
                    fifo_violations += 1
                last[sender] = seq
            if c.received >= expect.get(c.room, 0):
                orders.append(hash(tuple(c.order)))
        all_clients = receivers + [c for _, c in self.senders] + self.others
        return {
            "expected": expected,
            "received": received,
            "dups": tally.dups,
            "latencies_us": tally.latencies_us.tobytes(),
            "orders": orders,
            "fifo_violations": fifo_violations,
            "acks": sum(c.acks for _, c in self.senders),
            "errors": sum(c.errors for c in all_clients),
            "closed_by_server": sum(1 for c in all_clients if c.closed.done()),
        }

    async def close(self) -> None:
        clients = self.receivers + [c for _, c in self.senders] + self.others
        for c in clients:
            c.close()
        if clients:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 5.0)
        for c in clients:
            c.abort()
        self.receivers, self.senders, self.others = [], [], []


def main(pipe: Connection) -> None:
    """Entry point of a load-generator process."""
    raise_nofile_limit()
    try:  # the load generator must outrun the servers: use the faster loop if present
        import uvloop
    except ImportError:
        asyncio.run(Worker(pipe).run())
    else:
        uvloop.run(Worker(pipe).run())
