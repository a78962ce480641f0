"""Summaries of py-spy ``--format raw`` profiles (collapsed stacks)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


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
