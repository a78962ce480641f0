"""The soak test with faults (``bench/soak.py``): its checks catch what they
should, and a short run on each Redis topology passes them.

The checks are pure functions over what the clients recorded, so each kind
of failure is shown to be caught on a made-up record (a loss, a duplicate,
a reorder, a silent gap, two messages at one offset, a room that never
recovers) and a reported gap to be excused. The runs are real: ``python -m
bench.soak`` with its own ``redis-server`` processes, 3 pods, 30 resuming
clients and faults injected, about 35 s per topology.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bench.soak_check import Fault, check
from bench.soak_client import Ack, Delivery, Sync
from bench.soak_faults import KINDS

from .redis_support import REDIS_SERVER

ROOT = Path(__file__).resolve().parent.parent
E1, E2 = "e1", "e2"


def msg(t: float, key: str, offset: int, epoch: str = E1) -> Delivery:
    return Delivery(t, epoch, offset, key)


def ack(offset: int, epoch: str = E1) -> Ack:
    return Ack("r", epoch, offset, 0.0, duplicate=False, replicated=True)


def run_check(
    a: list[Delivery | Sync],
    b: list[Delivery | Sync],
    acked: dict[str, Ack],
    faults: list[Fault] | None = None,
) -> dict[str, Any]:
    first_sent = {key: float(i) for i, key in enumerate(sorted(acked))}
    return check(
        {"r": ["a", "b"]}, {("a", "r"): a, ("b", "r"): b}, acked, first_sent, faults or [], 0
    )


THREE = {"k1": ack(1), "k2": ack(2), "k3": ack(3)}


def clean() -> list[Delivery | Sync]:
    return [msg(1, "k1", 1), msg(2, "k2", 2), msg(3, "k3", 3)]


def test_a_clean_record_passes() -> None:
    result = run_check(clean(), clean(), THREE)
    assert result["failures"] == []
    assert (result["delivered"], result["expected_deliveries"]) == (6, 6)


def test_an_acked_message_a_member_never_got_is_a_loss_and_a_silent_gap() -> None:
    result = run_check(clean(), [msg(1, "k1", 1), msg(3, "k3", 3)], THREE)
    assert result["losses"] == 1
    assert result["unreported_gaps"] == 1
    assert result["examples"]["losses"] == ["b/r: k2 acked at e1:2"]


def test_a_gap_reported_by_a_sync_is_counted_not_failed() -> None:
    window = Sync(2.5, {"type": "sync", "complete": False, "reason": "window_exceeded", "lost": 1})
    result = run_check(clean(), [msg(1, "k1", 1), window, msg(3, "k3", 3)], THREE)
    assert result["failures"] == []
    assert (result["reported_missing"], result["reported_gaps"], result["lost_in_syncs"]) == (
        1,
        1,
        1,
    )
    assert result["reported_syncs"] == {"window_exceeded": 1}


def test_an_epoch_change_needs_its_sync() -> None:
    moved = [msg(1, "k1", 1), msg(4, "k4", 4, E2)]
    acked = {"k1": ack(1), "k2": ack(2), "k4": ack(4, E2)}
    silent = run_check([msg(1, "k1", 1), msg(2, "k2", 2), msg(4, "k4", 4, E2)], moved, acked)
    assert silent["failures"] == ["losses", "unreported_gaps"]
    changed = Sync(3, {"type": "sync", "complete": False, "reason": "epoch_changed", "epoch": E2})
    told = run_check(
        [msg(1, "k1", 1), msg(2, "k2", 2), changed, msg(4, "k4", 4, E2)],
        [moved[0], changed, moved[1]],
        acked,
    )
    assert told["failures"] == []
    assert told["reported_missing"] == 1


def test_duplicates_reorders_and_conflicts_are_caught() -> None:
    twice = [*clean(), msg(4, "k2", 2)]
    assert run_check(clean(), twice, THREE)["duplicates"] == 1
    swapped = [msg(1, "k1", 1), msg(2, "k3", 3), msg(3, "k2", 2)]
    assert run_check(clean(), swapped, THREE)["order"] == 1
    other = [msg(1, "k1", 1), msg(2, "kx", 2), msg(3, "k3", 3)]
    assert run_check(clean(), other, THREE)["conflicts"] == 1


def test_an_unconfirmed_unkeyed_message_must_reach_every_member_or_none() -> None:
    """Sent without a key and never acked: its sender cannot know whether it
    was stored, but the room must agree: every member has it, or none."""
    unconfirmed = {"k2": "r"}
    first_sent = {"k1": 0.0, "k2": 1.0, "k3": 2.0}
    acked = {"k1": ack(1), "k3": ack(3)}

    def run(a: list[Delivery | Sync], b: list[Delivery | Sync]) -> dict[str, Any]:
        events = {("a", "r"): a, ("b", "r"): b}
        return check({"r": ["a", "b"]}, events, acked, first_sent, [], 0, unconfirmed)

    assert run(clean(), clean())["failures"] == []
    none = [msg(1, "k1", 1), msg(3, "k3", 2)]  # not stored: offsets go on without it
    assert run(none, none)["failures"] == []
    partial = run(clean(), [msg(1, "k1", 1), msg(3, "k3", 3)])
    assert "partial" in partial["failures"]
    assert partial["examples"]["partial"] == ["r: k2 at [('e1', 2)] missed by ['b']"]


def test_recovery_is_the_slowest_members_first_new_message_after_the_fault() -> None:
    fault = Fault("pod_kill", "pod1", 1.5, 1.6)
    late = [msg(1, "k1", 1), msg(2, "k2", 2), msg(9, "k3", 3)]
    result = run_check(clean(), late, THREE, [fault])
    assert result["faults"][0]["recovery_s"] == 7.5  # k3, first sent at 2.0, reached b at 9
    never = run_check(clean(), [msg(1, "k1", 1)], {"k1": ack(1), "k2": ack(2)}, [fault])
    assert "unrecovered" in never["failures"]


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("topology", ["standalone", "sentinel", "cluster"])
def test_a_short_soak_with_faults_loses_nothing(topology: str, tmp_path: Path) -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (the soak starts its own Redis processes)")
    cmd = [
        sys.executable, "-m", "bench.soak", "--redis", topology, "--duration", "30",
        "--fault-interval", "4", "--seed", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=170)
    except subprocess.TimeoutExpired:
        proc.terminate()  # its finally blocks stop the pods and Redis
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"the soak took too long:\n{out.decode(errors='replace')}")
    text = out.decode(errors="replace")
    result = json.loads((tmp_path / f"soak-{topology}-seed1.json").read_text())
    checks = result["checks"]
    assert proc.returncode == 0, f"{text}\n{json.dumps(checks['examples'], indent=1)}"
    assert result["passed"]
    assert checks["failures"] == []
    # half sent without a key: those are never resent, so some may end unconfirmed
    assert result["acked"] + result["unconfirmed_unkeyed"] == result["sent"] > 500
    assert result["unkeyed_share"] == 0.5
    # the plain XADD path ran under the faults (a Cluster keeps the script, and so do
    # pods waiting for a replica: REDIS_WAIT_REPLICAS is auto, 1 under Sentinel)
    if topology == "standalone":
        assert result["pod_counters"]["plain_appends"] > 0, result["pod_counters"]
    assert checks["delivered"] >= checks["expected_deliveries"] > 0
    kinds = [f["kind"] for f in checks["faults"]]
    assert len(kinds) >= 2, text
    assert set(kinds) & (set(KINDS[topology]) - {"pod_kill"}), text  # Redis itself failed too
    assert all(f["recovery_s"] is not None for f in checks["faults"])
