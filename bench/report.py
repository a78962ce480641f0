"""Results of a run as JSON, a markdown table and a PNG plot.

``write_reports`` writes all three where it is told (``bench/results/`` for
every run, ``docs/`` too with ``--publish``); ``update_readme`` puts the
table between the README's bench-table markers (``--publish`` only)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = tuple[str, dict[str, list[float]], str]  # label, values per system, unit/format hint


def _runs_metric(
    runs: dict[str, list[dict[str, Any]]], get: Callable[[dict[str, Any]], Any]
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for system, rs in runs.items():
        vals = [get(r) for r in rs]
        out[system] = [float(v) for v in vals if v is not None]
    return out


def _log(r: dict[str, Any], key: str) -> Any:
    """A count from a run's ``peer_log`` (None in results made before it)."""
    return (r.get("peer_log") or {}).get(key)


def _redis_us(r: dict[str, Any]) -> float | None:
    """Redis CPU µs per room message (computed for results made before the
    runner did it)."""
    if "redis_cpu_us_per_message" in r:
        return r["redis_cpu_us_per_message"]  # type: ignore[no-any-return]
    cpu, n = r.get("redis_cpu_s"), r.get("messages")
    return 1e6 * cpu / n if cpu and n else None


def _redis_bound(r: dict[str, Any]) -> float | None:
    us = _redis_us(r)
    return round(1e6 / us) if us else None


def _redis_and_failure_rows(tag: str, runs: dict[str, list[dict[str, Any]]]) -> list[Row]:
    """Redis's cost per room message, the Redis-bound rate, and what failed."""
    rows: list[Row] = [
        (
            f"{tag}: Redis CPU µs / room message",
            _runs_metric(runs, _redis_us),
            "lower",
        ),
        (
            f"{tag}: Redis-bound room messages / s (one Redis core)",
            _runs_metric(runs, _redis_bound),
            "higher",
        ),
        (
            f"{tag}: errors logged by the servers",
            _runs_metric(runs, lambda r: _log(r, "exceptions")),
            "none",
        ),
    ]
    optional: list[Row] = [
        (
            f"{tag}: full queues a group send skipped ('over capacity', logged)",
            _runs_metric(runs, lambda r: _log(r, "over_capacity_channels")),
            "none",
        ),
        (
            f"{tag}: connections closed by the server",
            _runs_metric(runs, lambda r: r.get("closed_by_server")),
            "none",
        ),
        (
            f"{tag}: connections that failed to open",
            _runs_metric(runs, lambda r: r.get("connect_failures")),
            "none",
        ),
    ]
    # shown only where some system had some
    rows += [row for row in optional if any(any(v) for v in row[1].values())]
    return rows


def headline_rows(results: dict[str, Any]) -> list[Row]:
    w = results["workloads"]
    rows: list[Row] = []
    if "fanout" in w:
        runs = w["fanout"]["runs"]
        rate = w["fanout"]["target_deliveries_per_s"]
        tag = f"fan-out, 1 room x {results['settings']['fanout_receivers']}, {rate:,}/s"
        rows += [
            (f"{tag}: server CPU µs / delivery", _runs_metric(runs, _cpu_delivery), "lower"),
            (
                f"{tag}: p50 latency ms",
                _runs_metric(runs, lambda r: r["latency_ms"]["p50"]),
                "lower",
            ),
            (
                f"{tag}: p99 latency ms",
                _runs_metric(runs, lambda r: r["latency_ms"]["p99"]),
                "lower",
            ),
            (
                f"{tag}: max latency ms",
                _runs_metric(runs, lambda r: r["latency_ms"]["max"]),
                "lower",
            ),
            (f"{tag}: loss %", _runs_metric(runs, lambda r: r["loss_pct"]), "none"),
            (f"{tag}: duplicates", _runs_metric(runs, lambda r: r["duplicates"]), "none"),
            *_redis_and_failure_rows(tag, runs),
        ]
    if "rooms" in w:
        rooms = w["rooms"]
        for key, block in rooms["by_rate"].items():
            runs = block["runs"]
            tag = f"{rooms['rooms']} rooms x {rooms['members']}, {int(key):,} deliveries/s"
            rows += [
                (f"{tag}: server CPU µs / message", _runs_metric(runs, _cpu_message), "lower"),
                (
                    f"{tag}: p99 latency ms",
                    _runs_metric(runs, lambda r: r["latency_ms"]["p99"]),
                    "lower",
                ),
                (f"{tag}: loss %", _runs_metric(runs, lambda r: r["loss_pct"]), "none"),
                *_redis_and_failure_rows(tag, runs),
            ]
    if "saturation" in w:
        best = w["saturation"]["max_sustained_deliveries_per_s"]
        label = "saturation: max deliveries/s (≤0.1% loss, p99 ≤ 250 ms)"
        rows.append((label, {k: [float(v)] for k, v in best.items()}, "higher"))
    if "idle" in w:
        runs1 = {k: [v] for k, v in w["idle"]["runs"].items()}
        n = w["idle"]["connections"]
        rows += [
            (
                f"idle, {n:,} connections: RSS KB / connection",
                _runs_metric(runs1, lambda r: r["kb_per_connection"]),
                "lower",
            ),
            (
                f"idle, {n:,} connections: connects / s",
                _runs_metric(runs1, lambda r: r["connects_per_s"]),
                "higher",
            ),
        ]
    if "ordering" in w:
        runs1 = {k: [v] for k, v in w["ordering"]["runs"].items()}
        rows += [
            (
                "ordering, 2 senders on 2 pods: distinct orders seen",
                _runs_metric(runs1, lambda r: r["distinct_orders"]),
                "none",
            ),
            (
                "ordering: per-sender FIFO violations",
                _runs_metric(runs1, lambda r: r["fifo_violations"]),
                "none",
            ),
        ]
    return rows


def _cpu_delivery(r: dict[str, Any]) -> float | None:
    return r["server_cpu_us_per_delivery"] if r["deliveries"] else None


def _cpu_message(r: dict[str, Any]) -> float | None:
    return r["server_cpu_us_per_message"] if r["deliveries"] else None


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "-"

    def one(v: float) -> str:
        if v == int(v) and abs(v) >= 10:
            return f"{int(v):,}"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"

    lo, hi = min(vals), max(vals)
    return one(lo) if lo == hi else f"{one(lo)}-{one(hi)}"


def markdown(results: dict[str, Any]) -> str:
    systems: list[str] = results["systems"]
    m = results["machine"]
    ours, peers = systems[0], systems[1:]
    head = "| metric | " + " | ".join(systems) + " |"
    head += "".join(f" {ours} ÷ {p} |" for p in peers)
    sep = "|---|" + "---|" * (len(systems) + len(peers))
    lines = [head, sep]
    sat = results["workloads"].get("saturation", {})
    # a lower bound: the ladder ran out, or the load generator set the limit
    at_least = {k for k, v in sat.get("ladder_top_reached", {}).items() if v}
    at_least |= {k for k, v in sat.get("stopped_by_loadgen", {}).items() if v}
    for label, vals, hint in headline_rows(results):
        cells = [_fmt(vals.get(s, [])) for s in systems]
        if label.startswith("saturation"):
            cells = [
                ("≥ " if s in at_least else "") + c for s, c in zip(systems, cells, strict=True)
            ]
        line = f"| {label} | " + " | ".join(cells) + " |"
        for p in peers:
            a, b = vals.get(ours, []), vals.get(p, [])
            if hint != "none" and a and b and statistics.mean(b) != 0:
                x = statistics.mean(a) / statistics.mean(b)
                line += f" {x:.2f} |" if x >= 0.1 else f" {x:.3f} |"
            else:
                line += " |"
        lines.append(line)
    s = results["settings"]
    for system in systems:
        if sat.get("ladder_top_reached", {}).get(system):
            lines += ["", f"Saturation: {system} passed the top step of the ladder (≥)."]
        elif sat.get("stopped_by_loadgen", {}).get(system):
            lines += [
                "",
                f"Saturation: at {system}'s first failing step the load generator's senders "
                f"ran more than 100 ms late, so the shared machine, not the server alone, "
                f"set the limit (≥).",
            ]
    lines += _plan_notes(results)
    lines += _failure_notes(results)
    lines += [
        "",
        "Redis CPU µs / room message: the system's own redis-server, utime+stime over the "
        "run, divided by the room messages sent (one message to a room, whatever its "
        "size). Redis-bound: 1,000,000 ÷ that, the room messages per second one Redis "
        "core would carry at that cost (Redis runs commands on one thread), so the "
        "rate at which Redis, not the pods, becomes the limit. A system that refuses "
        "or drops messages spends less Redis per message sent: read these rows with "
        "its loss.",
    ]
    if any(x.startswith("django-channels") for x in systems):
        lines += [
            "",
            "Django Channels (`bench/peers/django_channels.py`): the Channels tutorial's "
            "`AsyncWebsocketConsumer` (group_add on connect, group_send on receive) on "
            "uvicorn; `django-channels` uses channels_redis's default `RedisChannelLayer`, "
            "`django-channels-pubsub` its `RedisPubSubChannelLayer`. Both keep "
            "channels_redis's documented defaults (capacity 100, expiry 60 s, "
            "group_expiry 86,400 s, msgpack) and redis-py's default connection pool "
            "(100 connections): the defaults a team gets. Nothing was tuned.",
        ]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; load average "
        f"{_load(m['loadavg_start'])} at start, {_load(m.get('loadavg_end'))} at the end. "
        f"Python {m['python']}, Redis {m['redis_server']}; " + _versions(results) + ".",
        f"{s['pods']} pods per system, each system with its own redis-server; "
        f"{s['workers']} load-generator processes per system on the same machine "
        f"({s.get('ladder_workers', s['workers'])} for the saturation ladder, where a step "
        f"fails only if it fails twice); "
        f"runs alternate between systems (the order reversed at each repetition), each "
        f"run in rooms of its own; {s['reps']} repetition(s) of the fan-out run and of "
        f"the {_repeated(s)} (a range is min-max). "
        f"Server CPU is utime+stime of the pod processes from /proc over the run (Redis "
        f"not included: it has rows of its own). "
        f"Run: `{results['command']}` at {results['started']}, {results['seconds']} s.",
    ]
    return "\n".join(lines) + "\n"


WORKLOAD_NAMES = {
    "fanout": "fan-out",
    "rooms": "small rooms",
    "saturation": "saturation",
    "idle": "idle",
    "ordering": "ordering",
}


def _plan_notes(results: dict[str, Any]) -> list[str]:
    """Which systems sat out which workloads, and which did not run at all."""
    systems: list[str] = results["systems"]
    plan: dict[str, list[str]] = results.get("plan") or {}
    ran = [w for w in results["workloads"] if w in plan]
    out = []
    partial = {x: [w for w in ran if x in plan[w]] for x in systems}
    groups: dict[tuple[str, ...], list[str]] = {}
    for x, ws in partial.items():
        if len(ws) < len(ran):
            groups.setdefault(tuple(ws), []).append(x)
    for ws, xs in groups.items():
        names = ", ".join(WORKLOAD_NAMES.get(w, w) for w in ws) or "nothing"
        out += [
            "",
            f"{' and '.join(xs)} ran {names} only (the default run gives the newer peers "
            f"the fan-out, small-rooms and idle workloads, to stay near 12 minutes; "
            f"`--systems` runs a named system in every workload); '-' is a workload "
            f"a system did not run.",
        ]
    for x, why in (results.get("skipped") or {}).items():
        out += ["", f"Not run: {x} ({why})."]
    return out


def _run_blocks(results: dict[str, Any]) -> list[tuple[str, dict[str, list[dict[str, Any]]]]]:
    """Every measured run of the results, by workload (and rate)."""
    w = results["workloads"]
    blocks = []
    if "fanout" in w:
        blocks.append(("fan-out", w["fanout"]["runs"]))
    for key, block in w.get("rooms", {}).get("by_rate", {}).items():
        blocks.append((f"small rooms at {int(key):,} deliveries/s", block["runs"]))
    if "saturation" in w:
        blocks.append(("saturation", w["saturation"]["steps"]))
    for name in ("idle", "ordering"):
        if name in w:
            blocks.append((name, {k: [v] for k, v in w[name]["runs"].items()}))
    return blocks


def _failure_notes(results: dict[str, Any]) -> list[str]:
    """What failed, from the pods' logs and the clients' view, per workload."""
    out = []
    blocks = _run_blocks(results)
    if not any("peer_log" in r for _, runs in blocks for rs in runs.values() for r in rs):
        return []  # results made before the pods' logs were read
    for label, runs in blocks:
        for system, rs in runs.items():
            bits = []
            during = _log_summary([r.get("peer_log") for r in rs])
            if during:
                bits.append(during)
            refused = sum(r.get("connect_failures", 0) for r in rs)
            if refused:
                first = next(r["first_connect_failure"] for r in rs if r.get("connect_failures"))
                bits.append(f"{refused:,} connections failed to open (first: `{first}`)")
            closed = sum(r.get("closed_by_server", 0) for r in rs)
            if closed:
                bits.append(f"{closed:,} connections closed by the server")
            if any(not r.get("servers_alive", True) for r in rs):
                bits.append("a pod died")
            after = _log_summary([r.get("peer_log_teardown") for r in rs])
            if after:
                bits.append(f"while the clients disconnected: {after}")
            if bits:
                n = f"{len(rs)} runs" if len(rs) > 1 else "1 run"
                out.append(f"- {system}, {label} ({n}): " + "; ".join(bits) + ".")
    if not out:
        return ["", "Failures: none (no errors in the pods' logs, no pod died)."]
    return [
        "",
        "Failures (from the pods' logs and the clients; the bench counts them and goes on):",
        "",
        *out,
    ]


def _log_summary(logs: list[dict[str, Any] | None]) -> str:
    by: dict[str, int] = {}
    samples: list[str] = []
    crashes = sends = full = 0
    for lg in logs:
        if not lg:
            continue
        for k, n in lg["by_exception"].items():
            by[k] = by.get(k, 0) + n
        samples += [x for x in lg["samples"] if x not in samples]
        crashes += lg["asgi_crashes"]
        sends += lg["over_capacity_sends"]
        full += lg["over_capacity_channels"]
    bits = []
    if by:
        kinds = ", ".join(f"{n:,} x `{k}`" for k, n in sorted(by.items(), key=lambda kv: -kv[1]))
        bits.append(f"{sum(by.values()):,} exceptions ({kinds})")
    if crashes:
        bits.append(f"{crashes:,} consumers killed ('Exception in ASGI application')")
    if sends:
        bits.append(
            f"{sends:,} group sends skipped {full:,} full queues ('N of M channels over "
            f"capacity in group'; a queue is a pod's, so at least as many deliveries lost)"
        )
    if samples:
        bits.append("e.g. `" + samples[0][:160] + "`")
    return ", ".join(bits)


def _versions(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m["versions"]
    systems = set(results["systems"])
    parts = [
        f"chat-api {m['commit']} (aiohttp {v.get('aiohttp')}, orjson {v.get('orjson')}, "
        f"redis-py {v.get('redis')}, hiredis {v.get('hiredis')})"
    ]
    if "chat-api-asgi" in systems:
        parts.append(
            f"chat-api-asgi on uvicorn {v.get('uvicorn')} (FastAPI {v.get('fastapi')}, "
            f"Starlette {v.get('starlette')})"
        )
    if "python-socketio" in systems:
        parts.append(
            f"python-socketio {v.get('python-socketio')} (python-engineio "
            f"{v.get('python-engineio')}) on uvicorn {v.get('uvicorn')} with uvloop "
            f"{v.get('uvloop')} and websockets {v.get('websockets')}"
        )
    if systems & {"django-channels", "django-channels-pubsub"}:
        parts.append(
            f"Channels {v.get('channels')}, channels_redis {v.get('channels-redis')}, "
            f"Django {v.get('django')}, asgiref {v.get('asgiref')}, msgpack "
            f"{v.get('msgpack')} on uvicorn {v.get('uvicorn')}"
        )
    node = m.get("node") or {}
    if "node-socketio" in systems and node:
        parts.append(
            f"Node {node.get('node')}, socket.io {node.get('socket.io')}, "
            f"@socket.io/redis-adapter {node.get('@socket.io/redis-adapter')}, "
            f"node-redis {node.get('redis')}"
        )
    return "; ".join(parts)


def _repeated(s: dict[str, Any]) -> str:
    """Which small-rooms rates were repeated (``--reps`` repeats them all)."""
    rates = list(s.get("rooms_rates", ()))
    count = s.get("rooms_repeated", 1)
    if count >= len(rates):
        return "small-rooms runs at every rate"
    return "lowest small-rooms rate" if count == 1 else f"{count} lowest small-rooms rates"


def _load(v: Any) -> str:
    return "?" if not v else "/".join(f"{x:.1f}" for x in v)


COLORS = {
    "chat-api": "#2a7ab9",
    "chat-api-asgi": "#8cbde6",
    "python-socketio": "#d9822b",
    "node-socketio": "#5aa05a",
    "django-channels": "#8e44ad",
    "django-channels-pubsub": "#c27ba0",
}


def _color(system: str, i: int) -> str:
    return COLORS.get(system, ["#777777", "#aaaaaa", "#444444"][i % 3])


def _mean(vals: list[float] | None) -> float | None:
    return statistics.mean(vals) if vals else None


def _by_workload(
    results: dict[str, Any], get: Callable[[dict[str, Any]], Any]
) -> list[tuple[str, dict[str, float | None]]]:
    """One metric of the fan-out and each small-rooms rate, per system."""
    w = results["workloads"]
    groups: list[tuple[str, dict[str, list[dict[str, Any]]]]] = []
    if "fanout" in w:
        groups.append(("fan-out", w["fanout"]["runs"]))
    for key, block in w.get("rooms", {}).get("by_rate", {}).items():
        groups.append((f"rooms\n{int(key):,}/s", block["runs"]))
    return [
        (label, {k: _mean(v) for k, v in _runs_metric(runs, get).items()}) for label, runs in groups
    ]


def plot(results: dict[str, Any], path: Path) -> bool:
    """The headline numbers as bar charts; False if matplotlib is missing.

    Top: one bar per system for fan-out CPU and p99, small-rooms CPU at the
    lowest rate, saturation and idle memory. Below, grouped by workload (the
    fan-out and every small-rooms rate): loss, Redis CPU per room message,
    and the Redis-bound rate."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    systems: list[str] = results["systems"]
    rows = headline_rows(results)

    def first(*keys: str) -> dict[str, list[float]] | None:
        for label, vals, _ in rows:
            if all(k in label for k in keys):
                return vals
        return None

    singles = [
        ("fan-out: server CPU µs / delivery", first("fan-out", "server CPU µs / delivery")),
        ("fan-out: p99 latency ms", first("fan-out", "p99 latency ms")),
        ("rooms (lowest rate): server CPU µs / message", first("rooms", "server CPU µs")),
        ("saturation: max deliveries/s", first("saturation")),
        ("idle: RSS KB / connection", first("RSS KB / connection")),
    ]
    singles = [(t, v) for t, v in singles if v is not None]
    grouped = [
        ("loss %", _by_workload(results, lambda r: r["loss_pct"])),
        (
            "Redis CPU µs / room message",
            _by_workload(results, _redis_us),
        ),
        (
            "Redis-bound: room messages / s one Redis core carries",
            _by_workload(results, _redis_bound),
        ),
    ]
    grouped = [(t, g) for t, g in grouped if g]
    if not singles and not grouped:
        return False

    fig = plt.figure(figsize=(16, 4.0 + 3.6 * len(grouped)))
    grid = fig.add_gridspec(1 + len(grouped), max(1, len(singles)))
    for i, (title, vals) in enumerate(singles):
        ax = fig.add_subplot(grid[0, i])
        means = [_mean(vals.get(x)) for x in systems]
        ax.bar(
            range(len(systems)),
            [m or 0.0 for m in means],
            color=[_color(x, j) for j, x in enumerate(systems)],
        )
        ax.set_xticks(range(len(systems)), [x.replace("-", "-\n") for x in systems], fontsize=7)
        ax.set_title(title, fontsize=9)
        for j, m in enumerate(means):
            text = "n/a" if m is None else (f"{m:,.3g}" if m < 1000 else f"{m:,.0f}")
            ax.text(j, m or 0.0, text, ha="center", va="bottom", fontsize=7)
    for row, (title, groups) in enumerate(grouped, start=1):
        ax = fig.add_subplot(grid[row, :])
        width = 0.8 / len(systems)
        for j, x in enumerate(systems):
            xs = [g + (j - (len(systems) - 1) / 2) * width for g in range(len(groups))]
            ys = [vals.get(x) for _, vals in groups]
            ax.bar(
                [a for a, b in zip(xs, ys, strict=True) if b is not None],
                [b for b in ys if b is not None],
                width=width,
                color=_color(x, j),
                label=x,
            )
            for a, b in zip(xs, ys, strict=True):
                if b is not None:
                    text = f"{b:,.3g}" if b < 1000 else f"{b:,.0f}"
                    ax.text(a, b, text, ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
        ax.set_title(title, fontsize=9)
        top = max((v or 0.0 for _, vals in groups for v in vals.values()), default=0.0)
        ax.set_ylim(0, top * 1.3 if top > 0 else 1.0)
        if top >= 1000:
            ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        if row == 1:
            ax.legend(fontsize=7, ncol=len(systems), loc="upper left")
    fig.suptitle(
        " vs ".join(systems) + " (same machine, same run; ratios are the claim)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_reports(results: dict[str, Any], out: Path, name: str) -> list[Path]:
    js, md, png = out / f"{name}-results.json", out / f"{name}.md", out / f"{name}.png"
    js.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text(markdown(results))
    return [js, md, png] if plot(results, png) else [js, md]


BEGIN, END = "<!-- bench-table -->", "<!-- /bench-table -->"


def update_readme(readme: Path, results: dict[str, Any]) -> bool:
    """Put the headline table between the README's bench-table markers."""
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return False
    table = markdown(results)
    readme.write_text(text[: start + len(BEGIN)] + "\n" + table + text[end:])
    return True
