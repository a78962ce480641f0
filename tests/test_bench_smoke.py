"""The benchmark harness still runs: ``python -m bench --quick`` on chat-api.

Not a timed test: it checks that the load generator, the runner and the
reports work end to end, and that nothing was lost, duplicated or reordered
per sender on the way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_runs_clean(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--systems",
        "chat-api",
        "--pods",
        "1",
        "--workloads",
        "fanout,ordering",
        "--out",
        str(tmp_path),
        "--name",
        "smoke",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the runner stops its servers on SIGTERM
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"bench --quick took too long:\n{out.decode(errors='replace')}")
    assert proc.returncode == 0, out.decode(errors="replace")
    results = json.loads((tmp_path / "smoke-results.json").read_text())
    fanout = results["workloads"]["fanout"]["runs"]["chat-api"][0]
    assert fanout["deliveries"] == fanout["deliveries_expected"] > 0
    assert fanout["duplicates"] == 0
    assert fanout["server_cpu_us_per_delivery"] > 0
    ordering = results["workloads"]["ordering"]["runs"]["chat-api"]
    assert ordering["fifo_violations"] == 0
    assert ordering["distinct_orders"] == 1  # one pod: everyone sees the same order
    assert (tmp_path / "smoke.md").read_text().startswith("| metric |")


@pytest.mark.slow
def test_bench_wakeups_runs() -> None:
    cmd = [sys.executable, "-m", "bench.wakeups", "--count", "50", "--pause", "0.001"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"bench.wakeups took too long:\n{out.decode(errors='replace')}")
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(rows) == 6, text  # 3 frames, back to back and paced
    assert all(float(row.rsplit("|", 2)[1]) >= 0 for row in rows), text
