"""Summaries of py-spy ``--format raw`` profiles (collapsed stacks), and of
what Redis spent on each command during a profiled run (its slow log)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from realtime.backends.redis.scripts import APPEND, SCRIPTS

SLOWLOG_ENTRIES = 100_000
"""Commands the slow log keeps during a profiled run (more than a run sends)."""


def summarize(raw: Path, top: int = 25) -> str:
    """The functions with the most samples, on their own (self) and with
    what they call (total), as a percentage of all samples."""
    own: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += n
        own[frames[-1]] += n
        by_package[_package(frames[-1])] += n
        for f in set(frames):
            total[f] += n
    if not samples:
        return f"{raw.name}: no samples\n"
    lines = [f"{raw.name}: {samples} samples", "", "self %  package (where the time is spent)"]
    lines += [f"{100 * n / samples:5.1f}  {p}" for p, n in by_package.most_common(12)]
    lines += ["", "self %  function"]
    lines += [f"{100 * n / samples:5.1f}  {f}" for f, n in own.most_common(top)]
    lines += ["", "total %  function"]
    lines += [f"{100 * n / samples:5.1f}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines) + "\n"


def _package(frame: str) -> str:
    """``fn (asyncio/base_events.py:1845)`` -> ``asyncio``; sockets' send and
    recv are shown apart, as they are mostly kernel time."""
    where = frame.rpartition(" (")[2].rstrip(")")
    if frame.startswith(("_SelectorSocketTransport.write ", "EpollSelector.select ")):
        return frame.split(" ", 1)[0] + " (syscall)"
    return where.split("/", 1)[0] if "/" in where else where.split(".py", 1)[0]


def record_commands(client: Any) -> None:
    """Have Redis log every command from now on (``slowlog-log-slower-than
    0``): its duration, name and first arguments. Costs Redis some time:
    only for profiled runs, not measured ones."""
    client.config_set("slowlog-max-len", SLOWLOG_ENTRIES)
    client.slowlog_reset()
    client.config_set("slowlog-log-slower-than", 0)


def command_times(client: Any) -> str:
    """What :func:`record_commands` logged, by command; the room-message
    script by messages per call, with the straight line through its means
    (µs per call = fixed + per message * messages). Stops the logging."""
    client.config_set("slowlog-log-slower-than", 10_000)
    entries = client.slowlog_get(SLOWLOG_ENTRIES)
    client.slowlog_reset()
    names = {script.sha: script.name for script in SCRIPTS}
    times: defaultdict[str, list[int]] = defaultdict(list)
    by_size: defaultdict[int, list[int]] = defaultdict(list)
    for entry in entries:
        args = entry["command"].split(b" ")
        name = args[0].decode().lower()
        if name == "evalsha" and len(args) > 2:
            sha = args[1].decode()
            name = f"script {names.get(sha, sha[:8])}"
            if sha == APPEND.sha:
                by_size[int(args[2]) // 4].append(entry["duration"])  # 4 keys a message
        elif name.startswith("slowlog") or name.startswith("config"):
            continue
        times[name].append(entry["duration"])
    if not times:
        return "Redis: no commands logged\n"
    lines = ["Redis: µs per command (slow log, every command of the run)", ""]
    lines.append(f"{'command':28} {'calls':>7} {'mean':>7} {'median':>7} {'total ms':>9}")
    for name, ds in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        ds.sort()
        lines.append(
            f"{name:28} {len(ds):7} {sum(ds) / len(ds):7.1f} {ds[len(ds) // 2]:7} "
            f"{sum(ds) / 1000:9.1f}"
        )
    if by_size:
        lines += ["", "append script by messages per call", ""]
        lines.append(f"{'messages':>8} {'calls':>7} {'mean µs':>8}")
        for size in sorted(by_size):
            ds = by_size[size]
            lines.append(f"{size:8} {len(ds):7} {sum(ds) / len(ds):8.1f}")
        fit = _line({k: sum(v) / len(v) for k, v in by_size.items()}, by_size)
        if fit is not None:
            fixed, per = fit
            lines += [
                "",
                f"fit (weighted by calls): {fixed:.1f} µs a call + {per:.1f} µs a message",
            ]
    return "\n".join(lines) + "\n"


def _line(means: dict[int, float], samples: dict[int, list[int]]) -> tuple[float, float] | None:
    """Least squares ``y = a + b x`` through ``means``, each point weighted by
    its number of calls; None with fewer than two sizes."""
    if len(means) < 2:
        return None
    w = {k: len(samples[k]) for k in means}
    total = sum(w.values())
    mx = sum(w[k] * k for k in means) / total
    my = sum(w[k] * means[k] for k in means) / total
    sxx = sum(w[k] * (k - mx) ** 2 for k in means)
    if sxx == 0:
        return None
    b = sum(w[k] * (k - mx) * (means[k] - my) for k in means) / sxx
    return my - b * mx, b
