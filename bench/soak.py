"""Soak test with faults: chat-api pods on a Redis topology, clients that
resume, faults on a seeded schedule, and a check that nothing acked was lost.

``python -m bench.soak --redis standalone|sentinel|cluster --duration 60``
(``make soak SOAK_ARGS="--redis cluster --duration 600"``) starts the
topology from ``redis-server`` (``bench/soak_faults.py``), 3 pods on it, and a
few dozen resuming clients (``bench/soak_client.py``), each in two of several
rooms (on a Cluster, rooms on every shard). The clients send at a steady,
bounded rate, half the messages with a key (``--unkeyed``: the share sent
without one, which are never resent and which the pods may append with a
plain ``XADD``); meanwhile a fault is injected every
``--fault-interval`` seconds or so (the kinds in a seeded shuffled cycle, the
targets and outage lengths seeded too), none in the last quarter of the run.
Then sending stops, every message still unacked gets its acks (resent as
needed, for at most ``--drain`` seconds), and the clients get what is still
on its way.

The checks (``bench/soak_check.py``): every acked message reached every
member of its room (rooms are held for the whole run), once, in offset
order; no offset names two messages; every skip was reported (a ``sync``
with ``complete: false``); every room delivered again after every fault;
every message sent with a key was acked in the end, and every one sent
without a key and never acked reached every member or none. The result,
with each fault's recovery time, goes to ``bench/results/soak-<topology>-seed<seed>.json`` (pod and
Redis logs under ``bench/results/logs/``), a one-line summary to stdout;
the exit code is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from .cluster import HOST
from .soak_check import Fault, check
from .soak_client import Delivery, ResumingClient
from .soak_faults import FAULT_ERRORS, KINDS, SoakPods, Topology

RESULTS = Path(__file__).parent / "results"
MAX_FAULTS = 10_000
POD_ENV = {
    # a lost or stalled Redis is noticed within a second or two
    "REDIS_HEARTBEAT_INTERVAL": "0.2",
    "REDIS_HEARTBEAT_TIMEOUT": "2.0",
    "REDIS_RECONNECT_MAX_DELAY": "0.5",
    "REDIS_WAIT_TIMEOUT": "0.5",
    "LOG_LEVEL": "INFO",
}
POD_COUNTERS = {
    "timeline": ("gap_repairs", "recovered", "lost", "epoch_changes", "duplicates_dropped"),
    "broadcaster": (
        "reconnects", "heartbeat_timeouts", "topology_changes", "redirected", "resent",
        "rewinds", "unreplicated", "publish_failures", "appended", "plain_appends",
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--redis", choices=sorted(KINDS), default="standalone")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pods", type=int, default=3)
    p.add_argument("--clients", type=int, default=30)
    p.add_argument("--rooms", type=int, default=6)
    p.add_argument("--rate", type=float, default=40.0, help="messages/s, all clients together")
    p.add_argument("--fault-interval", type=float, default=10.0, help="mean seconds between")
    p.add_argument("--drain", type=float, default=30.0, help="seconds at most for the last acks")
    p.add_argument(
        "--pod-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every pod (repeatable), e.g. REDIS_WAIT_REPLICAS=0",
    )
    p.add_argument(
        "--unkeyed",
        type=float,
        default=0.5,
        help="share of messages sent without a key (never resent; the pods may append "
        "them with a plain XADD): 0 to 1",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.clients < 1 or args.rooms < 1 or args.pods < 1 or args.rate <= 0:
        p.error("--clients, --rooms, --pods and --rate must be positive")
    if any("=" not in item for item in args.pod_env):
        p.error("--pod-env takes NAME=VALUE")
    if args.duration <= 0 or args.duration > 24 * 3600:
        p.error("--duration must be between 0 and 86400 seconds")
    return args


class Run:
    """One soak run: its pods, its clients, its schedule, its records."""

    def __init__(self, args: argparse.Namespace, topology: Topology, pods: SoakPods) -> None:
        self.args = args
        self.topology = topology
        self.pods = pods
        self.rng = random.Random(args.seed)
        self.rooms = topology.rooms(args.rooms)
        self.faults: list[Fault] = []
        self.fault_errors: list[str] = []
        self.submitted = 0
        self.clients: list[ResumingClient] = []
        self.t0 = 0.0

    def pick_url(self) -> str:
        ports = self.pods.live_ports() or self.pods.ports
        return f"http://{HOST}:{self.rng.choice(ports)}"

    def members(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {room: [] for room in self.rooms}
        for c in self.clients:
            for room in c.rooms:
                out[room].append(c.name)
        return out

    async def run(self) -> None:
        args = self.args
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            for i in range(args.clients):
                rooms = [self.rooms[i % len(self.rooms)]]
                if len(self.rooms) > 1:
                    rooms.append(self.rooms[(i + 1 + i // len(self.rooms)) % len(self.rooms)])
                    if rooms[1] == rooms[0]:
                        rooms.pop()
                rng = random.Random(f"{args.seed}-{i}")
                self.clients.append(ResumingClient(f"c{i}", rooms, self.pick_url, session, rng))
            end = time.monotonic() + args.duration + args.drain + 120
            runners = [asyncio.create_task(c.run(stop, end)) for c in self.clients]
            try:
                if not await self._until(self._all_live, 30):
                    raise RuntimeError("the clients did not all join their rooms within 30 s")
                self.t0 = time.monotonic()
                faults = asyncio.create_task(self._fault_loop())
                await self._send_loop()
                await faults
                await self._until(lambda: not any(c.pending for c in self.clients), args.drain)
                await self._until(self._all_delivered, 20)
            finally:
                stop.set()
                await asyncio.wait(runners, timeout=15)
                for task in runners:
                    task.cancel()

    def _all_live(self) -> bool:
        return all(s.live for c in self.clients for s in c.rooms.values())

    async def _until(self, cond: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            for c in self.clients:
                await c.resend_due()
            await asyncio.sleep(0.1)  # poll interval of the drain
        return bool(cond())

    def _all_delivered(self) -> bool:
        """Every member of every room has every message acked in it, and
        every unconfirmed one that some member has."""
        acked: dict[str, set[str]] = {room: set() for room in self.rooms}
        for c in self.clients:
            for key, ack in c.acks.items():
                acked[ack.room].add(key)
        rooms = {key: room for c in self.clients for key, room in c.unconfirmed_rooms()}
        for c in self.clients:
            for room, state in c.rooms.items():
                for e in state.events:
                    if isinstance(e, Delivery) and e.offset and e.key in rooms:
                        acked[room].add(e.key)
        for c in self.clients:
            for room, state in c.rooms.items():
                got = {e.key for e in state.events if isinstance(e, Delivery) and e.offset}
                if not acked[room] <= got:
                    return False
        return True

    async def _send_loop(self) -> None:
        """Round-robin over the clients at ``--rate`` in all, for ``--duration``."""
        args = self.args
        period = 1.0 / args.rate
        order = list(range(len(self.clients)))
        self.rng.shuffle(order)
        limit = int(args.duration * args.rate) + 1
        next_at = self.t0
        last_resend = self.t0
        for n in range(limit):
            now = time.monotonic()
            if now - self.t0 >= args.duration:
                break
            client = self.clients[order[n % len(order)]]
            rooms = list(client.rooms)
            room = rooms[(n // len(order)) % len(rooms)]
            key = f"s{args.seed}-{client.name}-{n}"
            keyed = int((n + 1) * args.unkeyed) == int(n * args.unkeyed)  # the share, spread
            await client.submit(room, key, {"k": key, "c": client.name, "n": n}, keyed=keyed)
            self.submitted += 1
            if now - last_resend > 0.5:
                last_resend = now
                for c in self.clients:
                    await c.resend_due()
            next_at = max(next_at + period, now - 1.0)  # steady: no burst after a stall
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _fault_loop(self) -> None:
        args = self.args
        kinds: list[str] = []
        quiet = max(5.0, min(30.0, args.duration / 4))
        for _ in range(MAX_FAULTS):
            wait = self.rng.uniform(0.5, 1.5) * args.fault_interval
            at = time.monotonic() + wait
            if at - self.t0 > args.duration - quiet:
                return
            if not kinds:
                kinds = list(KINDS[self.topology.kind])
                self.rng.shuffle(kinds)
            kind = kinds.pop(0)
            await asyncio.sleep(wait)  # the schedule: the next fault's time
            try:
                fault = await asyncio.to_thread(
                    self.topology.inject, kind, self.rng, self.pods, self.rooms
                )
            except FAULT_ERRORS as exc:  # the harness could not do it: the run fails
                self.fault_errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                print(f"[soak] fault {kind} failed: {exc}", flush=True)
                return
            self.faults.append(fault)
            print(
                f"[soak] {fault.t_start - self.t0:6.1f}s {kind} {fault.target}: {fault.detail} "
                f"({fault.t_end - fault.t_start:.1f}s)",
                flush=True,
            )


def pod_counters(pods: SoakPods) -> dict[str, int]:
    """The pods' own counts of repairs and losses (since each pod's last start)."""
    total: dict[str, int] = {}
    for port in pods.live_ports():
        url = f"http://{HOST}:{port}/api/chat-api/ws/stats"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        for block, names in POD_COUNTERS.items():
            for name in names:
                total[name] = total.get(name, 0) + int(body.get(block, {}).get(name) or 0)
    return total


def tracebacks(logdir: Path) -> int:
    return sum(p.read_text(errors="replace").count("Traceback") for p in logdir.glob("*.log"))


def result_of(run: Run, args: argparse.Namespace, counters: dict[str, int]) -> dict[str, Any]:
    members = run.members()
    events = {(c.name, room): s.events for c in run.clients for room, s in c.rooms.items()}
    acks = {k: a for c in run.clients for k, a in c.acks.items()}
    first_sent = {k: t for c in run.clients for k, t in c.first_sent.items()}
    unconfirmed = {key: room for c in run.clients for key, room in c.unconfirmed_rooms()}
    checks = check(members, events, acks, first_sent, run.faults, run.t0, unconfirmed)
    unacked = sorted({*first_sent} - {*acks} - {*unconfirmed})
    if unacked:
        checks["failures"].append("unacked")
    if run.fault_errors:
        checks["failures"].append("fault_errors")
    recoveries = [f["recovery_s"] for f in checks["faults"] if f["recovery_s"] is not None]
    return {
        "command": " ".join(["python -m bench.soak", *sys.argv[1:]]),
        "topology": args.redis,
        "seed": args.seed,
        "duration_s": args.duration,
        "pods": args.pods,
        "clients": args.clients,
        "rooms": run.rooms,
        "rate": args.rate,
        "pod_env": args.pod_env,
        "sent": run.submitted,
        "send_attempts": sum(c.sends for c in run.clients),
        "acked": len(acks),
        "unacked": unacked[:20],
        "unacked_count": len(unacked),
        "unkeyed_share": args.unkeyed,
        "unconfirmed_unkeyed": len(unconfirmed),
        "duplicate_acks": sum(a.duplicate for a in acks.values()),
        "unreplicated_acks": sum(not a.replicated for a in acks.values()),
        "reconnects": sum(c.connects - 1 for c in run.clients),
        "client_errors": _merged(c.errors for c in run.clients),
        "fault_errors": run.fault_errors,
        "recovery_s": {
            "max": max(recoveries, default=None),
            "median": statistics.median(recoveries) if recoveries else None,
        },
        "pod_counters": counters,
        "pod_log_tracebacks": tracebacks(run.pods.logdir),
        "checks": checks,
        "passed": not checks["failures"],
    }


def _merged(counts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def summary(r: dict[str, Any]) -> str:
    c = r["checks"]
    kinds: dict[str, int] = {}
    for f in c["faults"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    faults = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"
    rec = r["recovery_s"]
    rec_text = (
        f"recovery max {rec['max']}s median {rec['median']}s" if rec["max"] else "no recovery"
    )
    verdict = "PASS" if r["passed"] else "FAIL: " + ", ".join(c["failures"])
    return (
        f"soak {r['topology']} seed={r['seed']} {r['duration_s']:g}s: sent {r['sent']} "
        f"acked {r['acked']} delivered {c['delivered']}/{c['expected_deliveries']}; "
        f"{len(c['faults'])} faults ({faults}), {rec_text}; losses {c['losses']} "
        f"dups {c['duplicates']} order {c['order']} conflicts {c['conflicts']} "
        f"partial {c['partial']} (unconfirmed {r['unconfirmed_unkeyed']}) "
        f"unreported gaps {c['unreported_gaps']} (reported missing {c['reported_missing']}); "
        f"{verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every process started is stopped by PID
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    name = f"soak-{args.redis}-seed{args.seed}"
    logdir = args.out / "logs" / name
    topology = Topology.start(args.redis)
    env = {**POD_ENV, **dict(item.split("=", 1) for item in args.pod_env)}
    pods = SoakPods("chat-api", args.pods, logdir, redis_url=topology.url, extra_env=env)
    try:
        pods.start()
        run = Run(args, topology, pods)
        print(f"[soak] {args.redis}: {args.pods} pods, rooms {run.rooms}", flush=True)
        asyncio.run(run.run())
        counters = pod_counters(pods)
    finally:
        pods.stop()
        topology.save_logs(logdir)
        topology.close()
    result = result_of(run, args, counters)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(summary(result), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
