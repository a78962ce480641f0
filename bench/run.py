"""The benchmark runner: chat-api against its peers, in one run.

    python -m bench                # the default run, about 12 minutes
    python -m bench --quick        # about a minute; checks that the harness works
    python -m bench --workloads fanout,idle --systems chat-api,django-channels
    python -m bench --publish      # the default run, and its results into docs/

For each workload, every system runs side by side (each on its own Redis and
pods, each with its own load-generator processes) and their runs alternate,
the order reversed at every repetition (A B C C B A ...), so drift of a
shared machine hits all alike and no system always runs first. ``--reps N``
repeats every run N times (by default only the fan-out and the lowest
small-rooms rate are repeated, twice). The claim is
the ratio between systems measured in the same run, not the absolute numbers.
Results go to ``bench/results/benchmarks-results.json``, ``benchmarks.md``
and ``benchmarks.png`` (git-ignored); only ``--publish`` writes
``docs/benchmarks*`` and the README's table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from .cluster import NODE_PEER, REDIS_SERVER, ROOT, SYSTEMS, Cluster, node_peer_ready
from .loadgen import raise_nofile_limit
from .loadpool import Conn, LoadPool, measured_connect, measured_run
from .peerlog import failures_brief
from .profile import command_times, record_commands, summarize

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"


@dataclass(frozen=True)
class Settings:
    pods: int = 2
    # load-generator processes per system: one per core for the latency
    # workloads (more processes than cores add their own scheduling delay to
    # every system's latency), more for the saturation ladder's throughput
    workers: int = 2
    ladder_workers: int = 4
    reps: int = 2
    fanout_receivers: int = 200
    fanout_senders: int = 4
    fanout_rate: int = 20_000  # deliveries/s
    fanout_seconds: float = 10.0
    rooms: int = 500
    room_members: int = 4
    rooms_rates: tuple[int, ...] = (2_000, 4_000, 6_000, 20_000)  # deliveries/s
    rooms_repeated: int = 1  # how many of the lowest rates get ``reps`` runs; the rest one
    # (``--reps`` repeats every rate)
    rooms_seconds: float = 8.0
    ladder: tuple[int, ...] = (
        2_500,
        5_000,
        10_000,
        20_000,
        40_000,
        60_000,
        80_000,
        100_000,
        120_000,
        150_000,
        200_000,
        250_000,
    )
    ladder_seconds: float = 5.0
    idle_connections: int = 5_000
    order_receivers: int = 40
    order_messages: int = 600  # per sender
    order_rate: int = 200  # messages/s per sender


_T = TypeVar("_T")

QUICK = Settings(
    reps=1,
    workers=2,
    ladder_workers=2,
    fanout_receivers=20,
    fanout_senders=2,
    fanout_rate=2_000,
    fanout_seconds=2.0,
    rooms=20,
    rooms_rates=(600,),
    rooms_seconds=2.0,
    ladder=(2_000, 4_000),
    ladder_seconds=2.0,
    idle_connections=200,
    order_receivers=6,
    order_messages=100,
    order_rate=100,
)

# saturation: the most deliveries/s with at most this loss and p99
MAX_LOSS_PCT = 0.1
MAX_P99_MS = 250.0
LOADGEN_LATE_MS = 100.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- layouts --------------------------------------------------------------------


def in_turn(clusters: dict[str, _T], rep: int) -> list[tuple[str, _T]]:
    """The systems in the order of repetition ``rep``: as given, then
    reversed, and so on (A B C, C B A, A B C ...)."""
    order = list(clusters.items())
    return order[::-1] if rep % 2 else order


def fanout_layout(s: Settings, receivers: int | None = None) -> list[Conn]:
    n = s.fanout_receivers if receivers is None else receivers
    conns = [Conn(i % s.pods, "fanout", "send", i + 1) for i in range(s.fanout_senders)]
    conns += [Conn(i % s.pods, "fanout", "recv") for i in range(n)]
    return conns


def rooms_layout(s: Settings) -> list[Conn]:
    conns = []
    for r in range(s.rooms):
        room = f"r{r}"
        conns.append(Conn(r % s.pods, room, "send", r + 1))
        conns += [Conn((r + j) % s.pods, room, "recv") for j in range(1, s.room_members)]
    return conns


def order_layout(s: Settings) -> list[Conn]:
    conns = [Conn(i % s.pods, "order", "send", i + 1) for i in range(2)]
    conns += [Conn(i % s.pods, "order", "recv") for i in range(s.order_receivers)]
    return conns


def idle_layout(s: Settings) -> list[Conn]:
    return [Conn(i % s.pods, f"idle{i % 50}", "idle") for i in range(s.idle_connections)]


# -- workloads --------------------------------------------------------------------


class Bench:
    def __init__(
        self,
        s: Settings,
        systems: list[str],
        logdir: Path,
        plan: dict[str, list[str]] | None = None,
    ) -> None:
        self.s = s
        self.systems = systems
        self.logdir = logdir
        # the systems of each workload (default: all of them in every one)
        self.plan = plan or {}
        self.current = ""

    def _with_clusters(
        self,
        body: Callable[[dict[str, tuple[Cluster, LoadPool]]], dict[str, Any]],
        workers: int | None = None,
    ) -> dict[str, Any]:
        """Start the cluster and load generators of every system of the
        current workload, run ``body``, and stop all of it whatever happens."""
        with contextlib.ExitStack() as stack:
            clusters = {}
            for system in self.plan.get(self.current, self.systems):
                cluster = Cluster(system, self.s.pods, self.logdir / system)
                stack.callback(cluster.stop)
                cluster.start()
                pool = LoadPool(workers or self.s.workers)
                stack.callback(pool.close)
                clusters[system] = (cluster, pool)
            return body(clusters)
        raise AssertionError("unreachable")

    def fanout(self) -> dict[str, Any]:
        s = self.s
        rate = s.fanout_rate / s.fanout_receivers / s.fanout_senders

        def body(clusters: dict[str, tuple[Cluster, LoadPool]]) -> dict[str, Any]:
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in clusters}
            for rep in range(s.reps):
                for system, (cluster, pool) in in_turn(clusters, rep):
                    r = measured_run(
                        pool,
                        cluster,
                        fanout_layout(s),
                        rate_per_sender=rate,
                        duration=s.fanout_seconds,
                    )
                    log(f"fanout rep {rep + 1} {system}: {brief(r)}")
                    runs[system].append(r)
            return {"target_deliveries_per_s": s.fanout_rate, "runs": runs}

        return self._with_clusters(body)

    def rooms(self) -> dict[str, Any]:
        s = self.s
        receivers = s.room_members - 1

        def body(clusters: dict[str, tuple[Cluster, LoadPool]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for target in s.rooms_rates:
                rate = target / receivers / s.rooms  # messages/s per sender (one per room)
                runs: dict[str, list[dict[str, Any]]] = {k: [] for k in clusters}
                repeated = target in s.rooms_rates[: s.rooms_repeated]
                for rep in range(s.reps if repeated else 1):
                    for system, (cluster, pool) in in_turn(clusters, rep):
                        r = measured_run(
                            pool,
                            cluster,
                            rooms_layout(s),
                            rate_per_sender=rate,
                            duration=s.rooms_seconds,
                        )
                        log(f"rooms {target}/s rep {rep + 1} {system}: {brief(r)}")
                        runs[system].append(r)
                out[str(target)] = {"target_deliveries_per_s": target, "runs": runs}
            return {"rooms": s.rooms, "members": s.room_members, "by_rate": out}

        return self._with_clusters(body)

    def saturation(self) -> dict[str, Any]:
        s = self.s

        def body(clusters: dict[str, tuple[Cluster, LoadPool]]) -> dict[str, Any]:
            steps: dict[str, list[dict[str, Any]]] = {k: [] for k in clusters}
            best: dict[str, int] = {k: 0 for k in clusters}
            limited: dict[str, bool] = {k: False for k in clusters}
            going = set(clusters)
            for target in s.ladder:
                rate = target / s.fanout_receivers / s.fanout_senders
                for system, (cluster, pool) in clusters.items():
                    if system not in going:
                        continue
                    # a step fails only if it fails twice: one scheduling
                    # hiccup of the shared machine must not end the ladder
                    for attempt in (1, 2):
                        r = measured_run(
                            pool,
                            cluster,
                            fanout_layout(s),
                            rate_per_sender=rate,
                            duration=s.ladder_seconds,
                        )
                        r["target_deliveries_per_s"] = target
                        r["attempt"] = attempt
                        ok = (
                            r["loss_pct"] <= MAX_LOSS_PCT
                            and r["latency_ms"]["p99"] <= MAX_P99_MS
                            and r["servers_alive"]
                        )
                        if ok or not r["servers_alive"]:
                            break
                        log(f"saturation {target}/s {system}: failed once, again: {brief(r)}")
                    r["sustained"] = ok
                    # senders that fell this far behind mean the load generator
                    # (or the shared machine) set the limit, not the server
                    r["loadgen_limited"] = r["sender_late_ms"] > LOADGEN_LATE_MS
                    log(f"saturation {target}/s {system}: {'ok' if ok else 'FAIL'} {brief(r)}")
                    steps[system].append(r)
                    if ok:
                        best[system] = target
                    else:
                        going.discard(system)
                        limited[system] = r["loadgen_limited"]
                if not going:
                    break
            top = s.ladder[-1]
            return {
                "criteria": {"max_loss_pct": MAX_LOSS_PCT, "max_p99_ms": MAX_P99_MS},
                "max_sustained_deliveries_per_s": best,
                "ladder_top_reached": {k: best[k] == top for k in best},
                "stopped_by_loadgen": limited,
                "steps": steps,
            }

        return self._with_clusters(body, workers=s.ladder_workers)

    def idle(self) -> dict[str, Any]:
        def body(clusters: dict[str, tuple[Cluster, LoadPool]]) -> dict[str, Any]:
            runs = {}
            for system, (cluster, pool) in clusters.items():
                r = measured_connect(pool, cluster, idle_layout(self.s))
                failed = failures_brief(r["peer_log"])
                log(
                    f"idle {system}: {r['connections']} connected ({r['connect_failures']} "
                    f"failed), {r['connects_per_s']} connects/s, {r['kb_per_connection']} KB "
                    f"RSS per connection" + (f"; FAILURES: {failed}" if failed else "")
                )
                runs[system] = r
            return {"connections": self.s.idle_connections, "runs": runs}

        return self._with_clusters(body)

    def ordering(self) -> dict[str, Any]:
        s = self.s

        def body(clusters: dict[str, tuple[Cluster, LoadPool]]) -> dict[str, Any]:
            runs = {}
            for system, (cluster, pool) in clusters.items():
                r = measured_run(
                    pool,
                    cluster,
                    order_layout(s),
                    rate_per_sender=s.order_rate,
                    duration=s.order_messages / s.order_rate,
                    record_order=True,
                )
                log(
                    f"ordering {system}: {r['distinct_orders']} distinct orders over "
                    f"{r['complete_receivers']} receivers, fifo violations "
                    f"{r['fifo_violations']}, {brief(r)}"
                )
                runs[system] = r
            return {"senders": 2, "receivers": s.order_receivers, "runs": runs}

        return self._with_clusters(body)

    def profile(self) -> dict[str, Any]:
        """chat-api only, with py-spy sampling its first pod and Redis
        logging every command (its slow log): fan-out at the set rate, then
        the low-rate rooms workload. Not a measurement."""
        s = self.s
        out = self.logdir.parent
        bench = Bench(s, ["chat-api"], self.logdir)

        def body(clusters: dict[str, tuple[Cluster, LoadPool]]) -> dict[str, Any]:
            cluster, pool = clusters["chat-api"]
            runs = {}
            for name, layout, rate, seconds in (
                (
                    "fanout",
                    fanout_layout(s),
                    s.fanout_rate / s.fanout_receivers / s.fanout_senders,
                    s.fanout_seconds,
                ),
                (
                    "rooms",
                    rooms_layout(s),
                    s.rooms_rates[0] / (s.room_members - 1) / s.rooms,
                    s.rooms_seconds,
                ),
            ):
                raw = out / f"profile-{name}.raw"
                redis = cluster.redis_client()
                record_commands(redis)
                r = measured_run(
                    pool, cluster, layout, rate_per_sender=rate, duration=seconds, profile=raw
                )
                log(f"profile {name}: {brief(r)}")
                summary = summarize(raw) + "\n" + command_times(redis)
                redis.close()
                (out / f"profile-{name}.txt").write_text(summary)
                print(summary)
                runs[name] = r
            return runs

        return bench._with_clusters(body)


def brief(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    line = (
        f"{r['deliveries']}/{r['deliveries_expected']} delivered, loss {r['loss_pct']}%, "
        f"dups {r['duplicates']}, "
        f"p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} max {lat['max']:.1f} ms, "
        f"server CPU {r['server_cpu_us_per_delivery']} us/delivery "
        f"{r['server_cpu_us_per_message']} us/message ({r['server_cpu_cores']} cores), "
        f"Redis {r['redis_cpu_us_per_message']} us/message "
        f"({_commands(r)}), "
        f"loadgen {r['loadgen_cpu_cores']} cores, sender late {r['sender_late_ms']} ms"
    )
    pods = r.get("pod_counters") or {}
    if pods.get("gap_repairs"):
        line += f", gap repairs {pods['gap_repairs']} (recovered {pods.get('recovered', 0)})"
    failed = failures_brief(r["peer_log"])
    if r["connect_failures"]:
        failed += f"{'; ' if failed else ''}{r['connect_failures']} connects failed"
        failed += f" (first: {r.get('first_connect_failure')})"
    if r["closed_by_server"]:
        failed += f"{'; ' if failed else ''}{r['closed_by_server']} closed by the server"
    if not r["servers_alive"]:
        failed += f"{'; ' if failed else ''}A POD DIED"
    return line + (f"; FAILURES: {failed}" if failed else "")


# -- machine ---------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": redis.split()[2].removeprefix("v=") if redis else None,
        "versions": {
            d: _version(d)
            for d in (
                "chat-api",
                "aiohttp",
                "orjson",
                "redis",
                "hiredis",
                "python-socketio",
                "python-engineio",
                "uvicorn",
                "uvloop",
                "websockets",
                "channels",
                "channels-redis",
                "django",
                "asgiref",
                "msgpack",
                "fastapi",
                "starlette",
            )
        },
        "node": _node_versions(),
        "commit": commit,
        "loadavg_start": os.getloadavg(),
    }


def _node_versions() -> dict[str, str | None]:
    if not node_peer_ready():
        return {}
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    out: dict[str, str | None] = {"node": node.removeprefix("v")}
    for pkg in ("socket.io", "@socket.io/redis-adapter", "redis"):
        try:
            meta = json.loads((NODE_PEER / "node_modules" / pkg / "package.json").read_text())
            out[pkg] = meta.get("version")
        except OSError:
            out[pkg] = None
    return out


WORKLOADS = ("fanout", "rooms", "saturation", "idle", "ordering", "profile")
DEFAULT_WORKLOADS = WORKLOADS[:-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness")
    parser.add_argument(
        "--systems",
        default=None,
        help="comma-separated; default: every system that can run here "
        f"({', '.join(SYSTEMS)}); a system named here runs every workload asked for",
    )
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    parser.add_argument("--pods", type=int, default=None)
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repeat every fan-out and small-rooms run this many times (default: "
        f"{Settings.reps} runs of the fan-out and of the lowest rate, one of the others)",
    )
    parser.add_argument("--workers", type=int, default=None, help="load-generator processes")
    parser.add_argument(
        "--rooms-rates",
        default=None,
        help="comma-separated deliveries/s of the small-rooms workload (default "
        + ",".join(str(r) for r in Settings.rooms_rates)
        + ")",
    )
    parser.add_argument("--out", default=None, help=f"where results go (default {RESULTS})")
    parser.add_argument("--name", default="benchmarks", help="file name stem of the results")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also write the results to docs/benchmarks* and the README's table "
        "(a full run only: not with --quick or fewer workloads)",
    )
    args = parser.parse_args(argv)

    workloads = [x for x in args.workloads.split(",") if x]
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if args.publish:
        if args.quick:
            parser.error("--publish takes a full run: its toy numbers stay in bench/results/")
        if set(workloads) != set(DEFAULT_WORKLOADS):
            parser.error("--publish takes every default workload (the README table has them all)")
        if args.rooms_rates is not None:
            parser.error("--publish takes the default small-rooms rates")
        if args.out is not None or args.name != "benchmarks":
            parser.error("--publish writes docs/benchmarks*; --out and --name are for other runs")

    s = QUICK if args.quick else Settings()
    if args.pods is not None:
        s = Settings(**{**s.__dict__, "pods": args.pods})
    if args.workers is not None:
        s = Settings(**{**s.__dict__, "workers": args.workers})
    if args.rooms_rates is not None:
        try:
            rates = tuple(int(x) for x in args.rooms_rates.split(",") if x)
        except ValueError:
            parser.error(f"--rooms-rates: not a list of integers: {args.rooms_rates!r}")
        if not rates or min(rates) <= 0:
            parser.error("--rooms-rates: give one or more rates above 0")
        s = Settings(**{**s.__dict__, "rooms_rates": rates})
    if args.reps is not None:
        if args.reps < 1:
            parser.error("--reps: give 1 or more")
        s = Settings(**{**s.__dict__, "reps": args.reps, "rooms_repeated": len(s.rooms_rates)})

    named = args.systems is not None
    wanted = [x for x in args.systems.split(",") if x] if named else list(SYSTEMS)
    for x in wanted:
        if x not in SYSTEMS:
            parser.error(f"unknown system {x!r}; choose from {', '.join(SYSTEMS)}")
    skipped: dict[str, str] = {}
    for x in wanted:
        why_not = SYSTEMS[x].missing()
        if why_not:
            skipped[x] = why_not
            log(f"skipping {x}: {why_not}")
    systems = [x for x in SYSTEMS if x in wanted and x not in skipped]
    if not systems:
        parser.error("no system to run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    plan = {w: [x for x in systems if _runs(x, w, named)] for w in workloads}

    # SIGTERM unwinds like Ctrl-C, so every server started is stopped by PID
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = raise_nofile_limit()
    out = Path(args.out) if args.out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    logdir = RESULTS / "logs"
    results: dict[str, Any] = {
        "settings": s.__dict__,
        "systems": systems,
        "skipped": skipped,
        "plan": plan,
        "machine": machine(),
        "nofile_limit": nofile,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "workloads": {},
        "workload_seconds": {},
    }
    bench = Bench(s, systems, logdir, plan)
    t0 = time.perf_counter()
    for w in workloads:
        if not plan[w]:
            log(f"workload {w}: no system runs it")
            continue
        log(f"workload {w}: {', '.join(plan[w])}")
        bench.current = w
        t1 = time.perf_counter()
        results["workloads"][w] = getattr(bench, w)()
        results["workload_seconds"][w] = round(time.perf_counter() - t1, 1)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["machine"]["loadavg_end"] = os.getloadavg()

    if workloads == ["profile"]:  # not a measurement: leave the results alone
        log(f"done in {results['seconds']}s: bench/results/profile-*.txt")
        return

    from .report import update_readme, write_reports

    paths = write_reports(results, out, args.name)
    if args.publish:
        paths += write_reports(results, DOCS, args.name)
        if update_readme(ROOT / "README.md", results):
            paths.append(ROOT / "README.md")
    log(f"done in {results['seconds']}s: " + ", ".join(str(p) for p in paths))
    print((out / f"{args.name}.md").read_text())


def _runs(system: str, workload: str, named: bool) -> bool:
    """Whether ``system`` runs ``workload``: a system named in --systems runs
    every workload asked for; otherwise its entry says which it runs."""
    chosen = SYSTEMS[system].workloads
    return named or chosen is None or workload in chosen


def dump(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def _commands(r: dict[str, Any]) -> str:
    """The three commands Redis spent most time in, per room message."""
    top = list(r.get("redis_command_us_per_message", {}).items())[:3]
    return ", ".join(f"{name} {us}" for name, us in top) or "no commands"
