"""Random and malformed frames thrown at a live pod (hypothesis), then a
check that the pod still serves two healthy clients and that its stats and
log are sane.

Each example opens its own connection, sends a few frames, and after each
one a ``ping`` probe: frames are handled in order, so the ``pong`` proves the
frame was handled and the connection is usable, and every frame before it
must have been answered. A frame that breaks a policy must instead close the
connection with one of the documented codes. Bounded: a fixed number of
examples, a deadline per example and a wall-clock budget for the lot.
"""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close
from websockets.sync.client import ClientConnection, connect

from .conftest import PodFactory
from .support import DEFAULT_TIMEOUT, Pod

MAX_BYTES = 4096
BUDGET_S = 25.0
CLOSE_CODES = {1003, 1007, 1008, 1009}

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: beyond 64 bits too
    | st.floats()  # NaN and infinities become invalid JSON
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=24,
)
rooms = st.sampled_from(["general", "other", "r.1", "a*", "a b", "", "x" * 65]) | values
frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "join", "leave", "ping", "presence"]) | values},
    optional={
        "data": values,
        "room": rooms,
        "ref": st.integers(-10, 10) | st.text(max_size=140) | values,
        "from": values,
        "since": st.integers(-5, 10**20) | values,
        "history": st.integers(-5, 10**20) | values,
        "epoch": st.text(max_size=80) | values,
    },
)
actions = st.one_of(
    st.tuples(st.just("json"), frames),
    st.tuples(st.just("json"), values),
    st.tuples(st.just("text"), st.text(max_size=200)),
    st.tuples(st.just("raw"), st.binary(max_size=64)),  # as a text frame: maybe not UTF-8
    st.tuples(st.just("binary"), st.binary(max_size=64)),
    st.tuples(st.just("deep"), st.integers(1, 3000)),
    st.tuples(st.just("big"), st.integers(0, MAX_BYTES)),
)


def payload(kind: str, value: Any) -> str | bytes:
    if kind == "json":
        return json.dumps(value)
    if kind == "deep":
        return '{"type": "message", "data": ' + "[" * value + "]" * value + "}"
    if kind == "big":
        return '{"type": "message", "data": "' + "x" * (MAX_BYTES + value) + '"}'
    return value  # type: ignore[no-any-return]


def play(pod: Pod, steps: list[tuple[str, Any]]) -> None:
    with connect(
        pod.ws_url("general"),
        compression=None,
        proxy=None,
        open_timeout=DEFAULT_TIMEOUT,
        close_timeout=2,
        max_size=None,
    ) as ws:
        assert json.loads(ws.recv(timeout=DEFAULT_TIMEOUT))["type"] == "welcome"
        for n, (kind, value) in enumerate(steps):
            data = payload(kind, value)
            closed: Close | None = None
            try:
                if kind == "raw":
                    ws.send(data, text=True)
                else:
                    ws.send(data)
                answers = probe(ws, f"probe-{n}")
            except ConnectionClosed as exc:
                closed = exc.rcvd or Close(0, "closed without a close frame")
            if closed is not None:
                assert closed.code in CLOSE_CODES, (kind, closed)
                return
            assert kind != "binary", "a binary frame did not close the connection"
            assert answers >= 1, f"{kind} {data!r:.80} went unanswered"


def probe(ws: ClientConnection, ref: str) -> int:
    """Send a ping; count the frames before its pong; check each is sane."""
    ws.send(json.dumps({"type": "ping", "ref": ref}))
    answers = 0
    while True:
        raw = ws.recv(timeout=DEFAULT_TIMEOUT)
        frame = json.loads(raw)
        assert isinstance(frame, dict), raw
        assert isinstance(frame.get("type"), str), raw
        if frame == {"type": "pong", "ref": ref}:
            return answers
        if frame["type"] == "error":
            assert frame["code"] != "internal_error"
            assert len(frame["message"]) < 300
        answers += 1


def get_stats(pod: Pod) -> dict[str, Any]:
    with urllib.request.urlopen(
        f"{pod.base}/api/chat-api/ws/stats", timeout=DEFAULT_TIMEOUT
    ) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


@pytest.mark.slow
def test_fuzzed_frames_never_hurt_the_pod(pod_factory: PodFactory) -> None:
    pod = pod_factory(
        {
            "MAX_MESSAGE_BYTES": str(MAX_BYTES),
            # High enough that the frames themselves are what gets tested.
            "RATE_LIMIT_PER_SECOND": "1000",
            "RATE_LIMIT_BURST": "1000",
        }
    )
    ends = time.monotonic() + BUDGET_S
    played = [0]

    @settings(
        max_examples=400,
        deadline=timedelta(seconds=5),
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(st.lists(actions, min_size=1, max_size=5))
    def fuzz(steps: list[tuple[str, Any]]) -> None:
        if time.monotonic() > ends:
            return  # over the budget: the remaining examples pass trivially
        play(pod, steps)
        played[0] += 1

    fuzz()
    assert played[0] >= 20

    # Two healthy clients still talk.
    url = pod.ws_url("general")
    with (
        connect(url, proxy=None, open_timeout=DEFAULT_TIMEOUT) as a,
        connect(url, proxy=None, open_timeout=DEFAULT_TIMEOUT) as b,
    ):
        for ws in (a, b):
            assert json.loads(ws.recv(timeout=DEFAULT_TIMEOUT))["type"] == "welcome"
        a.send(json.dumps({"type": "message", "data": {"text": "still fine"}}))
        frame = json.loads(b.recv(timeout=DEFAULT_TIMEOUT))
        assert frame["type"] == "message"
        assert frame["data"] == {"text": "still fine"}

        # Every fuzzing connection is gone, and left its rooms.
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while (stats := get_stats(pod))["connections"]["open"] != 2:
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)  # polling interval
        assert stats["rooms"] == {"general": 2}
        assert stats["connections"]["accepted"] == played[0] + 2
        assert stats["errors_sent"] > 0
        assert stats["slow_client_disconnects"] == 0

    assert "Traceback" not in pod.log
    assert " ERROR " not in pod.log
    assert pod.proc is not None
    assert pod.proc.poll() is None
