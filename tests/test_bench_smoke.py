"""The benchmark harness still runs: ``python -m bench --quick`` on chat-api,
and the Django Channels peer serves the chat shape the load generator speaks.

Not timed tests: they check that the load generator, the runner and the
reports work end to end, and that nothing was lost, duplicated or reordered
per sender on the way. The peer's test needs the ``bench`` extra, which
``make test`` does not install: it skips without it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .redis_support import REDIS_SERVER, RedisServer

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
    assert fanout["pod_counters"]["gap_repairs"] == 0  # chat-api's own counts, over the run
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


def test_bench_scriptcost_runs(tmp_path: Path) -> None:
    old = tmp_path / "append.lua"  # an "earlier" script: this one, with its prelude
    for name in ("append.lua", "room_common.lua"):
        lua = ROOT / "src/realtime/backends/redis/lua" / name
        (tmp_path / name).write_text(lua.read_text())
    cmd = [sys.executable, "-m", "bench.scriptcost", "--calls", "20", "--fill", "1"]
    cmd += ["--against", str(old), "--layout", "streams", "--batch", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("append", "empty"))]
    rows += [line for line in done.stdout.splitlines() if line.startswith(("script", "PUBLISH"))]
    rows += [line for line in done.stdout.splitlines() if line.startswith("XADD")]
    assert len(rows) == 6, done.stdout
    numbers = [row.split("per message:")[0].split()[-2:] for row in rows]
    assert all(float(x) > 0 for pair in numbers for x in pair), done.stdout
    refreshes = [line for line in done.stdout.splitlines() if line.startswith("presence")]
    assert len(refreshes) == 2, done.stdout
    assert all(float(row.split("per room:")[1]) > 0 for row in refreshes), done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("system", ["django-channels", "django-channels-pubsub"])
def test_django_channels_peer_round_trip(system: str, tmp_path: Path) -> None:
    absent = [m for m in ("channels", "channels_redis", "django", "uvicorn") if not _has(m)]
    if absent:
        pytest.skip(
            f"the bench extra is not installed ({', '.join(absent)}): pip install -e '.[bench]'"
        )
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    from bench.cluster import Cluster
    from websockets.sync.client import connect

    cluster = Cluster(system, 1, tmp_path)
    try:
        cluster.start()  # its own redis-server, one pod; waits for its port
        url = f"ws://127.0.0.1:{cluster.ports[0]}/ws/chat/smoke/"
        with connect(url, open_timeout=10) as listener, connect(url, open_timeout=10) as sender:
            sender.send('{"type":"message","data":"~1.0.123~","ref":7}')
            frames = [sender.recv(timeout=10) for _ in range(2)]  # its ack and its message
            heard = listener.recv(timeout=10)
        assert cluster.alive()
    finally:
        cluster.stop()
    raw_ack = next(f for f in frames if '"ack"' in f)
    assert isinstance(raw_ack, str)
    assert raw_ack.startswith('{"type": "ack"')  # what the bench's client adapter looks for
    ack = json.loads(raw_ack)
    echoed = json.loads(next(f for f in frames if f is not raw_ack))
    message = json.loads(heard)
    assert ack["ref"] == 7
    assert message == echoed  # the whole room, sender included, gets the same message
    assert message["type"] == "message"
    assert message["id"] == ack["id"]
    assert message["room"] == "smoke"
    assert message["data"] == "~1.0.123~"  # the marker the load generator finds
    assert message["from"]
    assert message["ts"] > 0


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_repetitions_reverse_the_system_order() -> None:
    from bench.report import _repeated
    from bench.run import Settings, in_turn

    systems = {"a": 1, "b": 2, "c": 3}
    orders = ["".join(name for name, _ in in_turn(systems, rep)) for rep in range(3)]
    assert orders == ["abc", "cba", "abc"]
    assert _repeated(Settings().__dict__) == "lowest small-rooms rate"
    every = {**Settings().__dict__, "rooms_repeated": len(Settings.rooms_rates)}
    assert _repeated(every) == "small-rooms runs at every rate"


def test_the_profile_reads_redis_time_per_command_and_per_append_size(
    redis_server: RedisServer,
) -> None:
    from bench.profile import command_times, record_commands
    from bench.scriptcost import _append

    from realtime.backends.redis.scripts import APPEND

    client = redis_server.client()
    sha = client.script_load(APPEND.source)
    assert sha == APPEND.sha
    record_commands(client)
    one = _append(client, sha, "p1", layout="streams", batch=1)
    three = _append(client, sha, "p3", layout="streams", batch=3)
    for i in range(4):
        one(i)
        three(i)
    client.set("k", "v")
    text = command_times(client)
    client.close()
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert rows["script"][:2] == ["append", "8"], text  # calls of the append script
    assert (rows["xadd"][0], rows["publish"][0]) == ("16", "16"), text  # its inner commands
    assert rows["set"][0] == "1", text
    assert rows["1"][0] == rows["3"][0] == "4", text  # calls by messages per call
    assert "fit" in rows, text
    assert not {"config", "slowlog"} & set(rows), text
