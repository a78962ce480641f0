"""What the servers under test wrote to their logs during a run.

A server that fails part-way does not stop the bench: a consumer killed by
an exception closes its socket (the load generator counts the close and the
loss), and the failure itself is in the pod's log. ``LogMarks`` remembers
where each pod's log ended; ``LogMarks.scan()`` reads what was written since
and counts:

- Python tracebacks, by the exception that ended each chain
  (``redis.exceptions.MaxConnectionsError`` ...), and how many were an ASGI
  server's "Exception in ASGI application" (a consumer or handler killed);
- channels_redis's "N of M channels over capacity in group G" lines: the
  default layer refused that group message for N queues that were full
  (capacity 100). Its "channels" here are its queues in Redis, one per pod
  process, each carrying the message for all of that pod's members of the
  group: the deliveries lost are at least N, and often more.

Node's errors are not parsed (they have no traceback form); a Node pod that
dies is still seen as ``servers_alive: false``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

OVER_CAPACITY = re.compile(r"(\d+) of (\d+) channels over capacity in group (\S+)")
EXCEPTION_LINE = re.compile(r"([A-Za-z_][\w.]*)(?::\s?(.*))?$")
CHAIN_MARKERS = ("During handling of the above exception", "The above exception was the direct")
TRACEBACK = "Traceback (most recent call last):"
ASGI_CRASH = "Exception in ASGI application"
MAX_READ = 64 << 20  # bytes of log per pod per scan; a flood of lines is cut here
SAMPLES = 3


def scan_text(text: str) -> dict[str, Any]:
    """Count the failures in a piece of log (see the module docstring)."""
    exceptions: Counter[str] = Counter()
    samples: list[str] = []
    over_sends = over_channels = asgi_crashes = 0
    in_traceback = chained = expect = False
    last: str | None = None  # the exception line of the chain so far

    def end_chain() -> None:
        nonlocal in_traceback, chained, last
        if last is not None:
            m = EXCEPTION_LINE.match(last)
            exceptions[m.group(1) if m else "?"] += 1
            if len(samples) < SAMPLES and last not in samples:
                samples.append(last[:300])
        in_traceback, chained, last = False, False, None

    for line in text.splitlines():
        if line.startswith(TRACEBACK):
            if in_traceback and not chained:
                end_chain()  # a new record, not a chained exception
            # the first unindented line after the frames is the exception
            in_traceback, chained, expect = True, False, True
            continue
        if in_traceback:
            if not line.strip() or line[0] in " \t":
                continue  # frames and source lines; blank lines inside a chain
            if expect:
                last, expect = line, False
                continue
            if line.startswith(CHAIN_MARKERS):
                chained = True
                continue
            end_chain()  # the chain ended; this line is a new record
        if ASGI_CRASH in line:
            asgi_crashes += 1
        m = OVER_CAPACITY.search(line)
        if m:
            over_sends += 1
            over_channels += int(m.group(1))
    if in_traceback:
        end_chain()
    return {
        "exceptions": sum(exceptions.values()),
        "by_exception": dict(exceptions.most_common()),
        "asgi_crashes": asgi_crashes,
        "over_capacity_sends": over_sends,
        "over_capacity_channels": over_channels,
        "samples": samples,
    }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts of several pods' logs added up."""
    by: Counter[str] = Counter()
    samples: list[str] = []
    for p in parts:
        by.update(p["by_exception"])
        samples += [s for s in p["samples"] if s not in samples]
    return {
        "exceptions": sum(p["exceptions"] for p in parts),
        "by_exception": dict(by.most_common()),
        "asgi_crashes": sum(p["asgi_crashes"] for p in parts),
        "over_capacity_sends": sum(p["over_capacity_sends"] for p in parts),
        "over_capacity_channels": sum(p["over_capacity_channels"] for p in parts),
        "samples": samples[:SAMPLES],
        "truncated": any(p.get("truncated") for p in parts),
    }


class LogMarks:
    """Where each log ended when it was marked."""

    def __init__(self, logs: list[Path]) -> None:
        self.logs = logs
        self.offsets = [self._size(p) for p in logs]

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def scan(self) -> dict[str, Any]:
        """The failures written since the mark (or the last scan)."""
        parts = []
        for i, path in enumerate(self.logs):
            start, end = self.offsets[i], self._size(path)
            text = ""
            truncated = False
            if end > start:
                with path.open("rb") as f:
                    f.seek(start)
                    data = f.read(min(end - start, MAX_READ))
                truncated = end - start > MAX_READ
                text = data.decode(errors="replace")
            self.offsets[i] = end
            part = scan_text(text)
            part["truncated"] = truncated
            parts.append(part)
        return merge(parts)


def failures_brief(log: dict[str, Any]) -> str:
    """One line for the runner's progress log; empty when nothing failed."""
    bits = []
    if log["exceptions"]:
        kinds = ", ".join(f"{k.rsplit('.', 1)[-1]} x{n}" for k, n in log["by_exception"].items())
        bits.append(f"{log['exceptions']} exceptions ({kinds})")
    if log["asgi_crashes"]:
        bits.append(f"{log['asgi_crashes']} consumers crashed")
    if log["over_capacity_channels"]:
        bits.append(
            f"{log['over_capacity_sends']} group sends refused for "
            f"{log['over_capacity_channels']} full queues (over capacity)"
        )
    return "; ".join(bits)
