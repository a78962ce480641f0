"""Random and malformed frames thrown at a live pod (hypothesis), then a
check that the pod still serves two healthy clients and that its stats and
log are sane.

Each example opens its own connection, sends a few frames, and after each
one a ``ping`` probe: frames are handled in order, so the ``pong`` proves the
frame was handled and the connection is usable, and every frame before it
must have been answered. A frame that breaks a policy must instead close the
connection with the code documented for it (``expected_close``), and only
that one: binary 1003, text that is not UTF-8 1007, over the size limit 1009,
a flood 1008. After such a frame the client sends nothing more and reads
until the close. Bounded: a fixed number of examples, a deadline per example
and a wall-clock budget for the lot.
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
from .support import DEFAULT_TIMEOUT, OP_TEXT, Pod, client_frame

MAX_BYTES = 4096
BUDGET_S = 25.0
RATE, BURST, MAX_REFUSED = 50, 50, 20
"""A few frames per example stay far under the burst; a flood goes over it."""
REASONS = {
    1003: "binary frames are not supported; send JSON text frames",
    1008: "rate limit exceeded",
}

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
    # ping frames in one write: the burst, then more than MAX_REFUSED over it
    st.tuples(st.just("flood"), st.integers(BURST + MAX_REFUSED + 30, 3 * BURST)),
)


def payload(kind: str, value: Any) -> str | bytes:
    if kind == "json":
        return json.dumps(value)
    if kind == "deep":
        depth: int = value
        return '{"type": "message", "data": ' + "[" * depth + "]" * depth + "}"
    if kind == "big":
        extra: int = value
        return '{"type": "message", "data": "' + "x" * (MAX_BYTES + extra) + '"}'
    if kind == "flood":
        return b"".join(
            client_frame(OP_TEXT, b'{"type": "ping", "ref": %d}' % n) for n in range(value)
        )
    return value  # type: ignore[no-any-return]


def expected_close(kind: str, data: str | bytes) -> int | None:
    """The close code this frame must get; None: it must be answered and
    leave the connection open."""
    if kind == "binary":
        return 1003
    if kind == "flood":
        return 1008
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_BYTES:
        return 1009
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert kind == "raw", kind  # the only kind sent as undecoded bytes
        return 1007
    return None


def play(pod: Pod, steps: list[tuple[str, Any]]) -> int:
    """Play one example on a fresh connection; returns the floods played."""
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
            expected = expected_close(kind, data)
            if kind == "flood":
                assert isinstance(data, bytes)
                ws.socket.sendall(data)  # one write: the pod reads it all at once
            elif kind == "raw":
                ws.send(data, text=True)
            else:
                ws.send(data)
            if expected is not None:
                closed = read_until_closed(ws)
                assert closed.code == expected, (kind, f"{data!r:.80}", closed)
                if expected in REASONS:
                    assert closed.reason == REASONS[expected], closed
                return int(kind == "flood")
            try:
                answers = probe(ws, f"probe-{n}")
            except ConnectionClosed as exc:
                raise AssertionError(f"{kind} {data!r:.80} closed the connection: {exc}") from None
            assert answers >= 1, f"{kind} {data!r:.80} went unanswered"
    return 0


def read_until_closed(ws: ClientConnection) -> Close:
    """Read (and check) what arrives until the pod closes; the close frame it
    sent (code 1006 if none came)."""
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while True:
        try:
            raw = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            return exc.rcvd or Close(1006, "closed without a close frame")
        frame = json.loads(raw)
        assert isinstance(frame, dict), raw
        assert isinstance(frame.get("type"), str), raw


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
            "RATE_LIMIT_PER_SECOND": str(RATE),
            "RATE_LIMIT_BURST": str(BURST),
            "RATE_LIMIT_MAX_REFUSED": str(MAX_REFUSED),
        }
    )
    ends = time.monotonic() + BUDGET_S
    played = [0]
    floods = [0]

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
        floods[0] += play(pod, steps)
        played[0] += 1

    fuzz()
    # enough examples ran to mean something (a loaded CI machine plays ~20
    # in the budget; an idle one far more)
    assert played[0] >= 10

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
        assert stats["policy_closes"] == {"rate_limit": floods[0], "token_expired": 0}

    assert "Traceback" not in pod.log
    assert " ERROR " not in pod.log
    assert pod.proc is not None
    assert pod.proc.poll() is None
