"""Results of a run as JSON, a markdown table and a PNG plot."""

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
    v = m["versions"]
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
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; load average "
        f"{_load(m['loadavg_start'])} at start, {_load(m.get('loadavg_end'))} at the end. "
        f"Python {m['python']}, Redis {m['redis_server']}; chat-api {m['commit']} "
        f"(aiohttp {v.get('aiohttp')}, orjson {v.get('orjson')}, redis-py {v.get('redis')}, "
        f"hiredis {v.get('hiredis')}); python-socketio {v.get('python-socketio')} "
        f"(python-engineio {v.get('python-engineio')}) on uvicorn {v.get('uvicorn')} "
        f"with uvloop {v.get('uvloop')} and websockets {v.get('websockets')}"
        + _node(m.get("node") or {})
        + ".",
        f"{s['pods']} pods per system, each system with its own redis-server; "
        f"{s['workers']} load-generator processes per system on the same machine "
        f"({s.get('ladder_workers', s['workers'])} for the saturation ladder, where a step "
        f"fails only if it fails twice); "
        f"runs alternate between systems; {s['reps']} repetition(s) of the fan-out and "
        f"low-rate rooms runs (a range is min-max). Server CPU is utime+stime of the pod "
        f"processes from /proc over the run (Redis not included; it is in the JSON). "
        f"Run: `{results['command']}` at {results['started']}, {results['seconds']} s.",
    ]
    return "\n".join(lines) + "\n"


def _node(n: dict[str, Any]) -> str:
    if not n:
        return ""
    return (
        f"; Node {n.get('node')}, socket.io {n.get('socket.io')}, "
        f"@socket.io/redis-adapter {n.get('@socket.io/redis-adapter')}, "
        f"node-redis {n.get('redis')}"
    )


def _load(v: Any) -> str:
    return "?" if not v else "/".join(f"{x:.1f}" for x in v)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Bar charts of the headline numbers; False if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems: list[str] = results["systems"]
    rows = headline_rows(results)
    wanted = [
        ("server CPU µs / delivery", "fan-out: server CPU µs / delivery"),
        ("fan-out, 1 room", "p99 latency ms"),
        ("server CPU µs / message", "rooms: server CPU µs / message"),
        ("saturation", "saturation: max deliveries/s"),
        ("RSS KB / connection", "idle: RSS KB / connection"),
    ]
    panels = []
    for key, title in wanted:
        for label, vals, _ in rows:
            if key in label and (key != "fan-out, 1 room" or "p99" in label):
                panels.append(
                    (title if key != "fan-out, 1 room" else "fan-out: p99 latency ms", label, vals)
                )
                break
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    if len(panels) == 1:
        axes = [axes]
    colors = ["#2a7ab9", "#d9822b", "#5aa05a"]
    for ax, (title, _label, vals) in zip(axes, panels, strict=True):
        means = [statistics.mean(vals[s]) if vals.get(s) else 0.0 for s in systems]
        ax.bar(range(len(systems)), means, color=colors[: len(systems)])
        ax.set_xticks(range(len(systems)), [x.replace("-", "-\n", 1) for x in systems], fontsize=8)
        ax.set_title(title, fontsize=9)
        for i, m in enumerate(means):
            ax.text(
                i, m, f"{m:,.3g}" if m < 1000 else f"{m:,.0f}", ha="center", va="bottom", fontsize=8
            )
    fig.suptitle(
        " vs ".join(systems) + " (same machine, same run; ratios are the claim)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
