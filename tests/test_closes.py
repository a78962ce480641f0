"""Closes decided by the server, seen from the wire: raw-socket clients that
misbehave on purpose (stop reading, never answer a close, keep sending, send
what RFC 6455 forbids) against a real pod.

What the TCP connection does is read without disturbing it: ``tcp_state``
asks the kernel (``TCP_INFO``) whether the peer has sent FIN or RST, so a
client that "never reads" really never reads.

Close code 1011 (``internal error``) is sent only when handling a frame
raises something other than a protocol error, which is a bug, and no client
input we know of reaches one (``test_fuzz`` checks that none of its frames
does): ``test_internal_error`` plants one, in a pod served in its process.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from typing import Any

import aiohttp
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from .conftest import PodFactory
from .support import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Pod,
    RawFrame,
    client_frame,
    connect,
    get_json,
    raw_ws_connect,
    read_frame,
    read_until_close,
    recv,
    send,
)

TCP_ESTABLISHED = 1
TOO_SLOW = (1013, "client too slow: send buffer full")


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (1: established; after the peer's
    FIN: close-wait; after its RST: close), read without reading any data."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0]


def server_side_owned(sock: socket.socket) -> bool:
    """Whether the server's end of this (loopback) connection still belongs
    to a process. A server that closes a socket whose client does not read
    leaves the unsent bytes to the kernel: the socket lives on, orphaned
    (inode 0 in /proc/net/tcp), and the client sees nothing until it reads."""
    client = f"0100007F:{sock.getsockname()[1]:04X}"
    server = f"0100007F:{sock.getpeername()[1]:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == (server, client):
                return fields[9] != "0"
    return False


def wait_until_cut(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server lets go of the TCP connection: it sent FIN or
    RST, or it closed its socket (which the kernel may still be flushing)."""
    started = time.monotonic()
    while tcp_state(sock) == TCP_ESTABLISHED and server_side_owned(sock):
        assert time.monotonic() - started < timeout, "the connection was never cut"
        time.sleep(0.01)  # polling interval
    return time.monotonic() - started


async def stats(session: aiohttp.ClientSession, pod: Pod) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
    return result


async def drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Read and drop frames until the socket closes (a sender must read its
    own echoes, or it becomes a slow client too)."""
    while isinstance(await recv(ws, timeout=60), dict):
        pass


async def make_slow(
    session: aiohttp.ClientSession, pod: Pod, stuck: socket.socket | None = None
) -> None:
    """Flood room ``general`` until the pod has dropped one slow client."""
    sender, _ = await connect(session, pod.ws_url("general"))
    reader = asyncio.create_task(drain(sender))
    try:
        async with asyncio.timeout(60):
            for _ in range(200):  # bounded: kernel buffers hold a few MB at most
                for _ in range(50):
                    await send(sender, {"type": "message", "data": "x" * 4000})
                if (await stats(session, pod))["slow_client_disconnects"]:
                    return
        raise AssertionError("no client was dropped as too slow")
    finally:
        await sender.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def assert_text_frames(frames: list[RawFrame]) -> None:
    """Whole JSON text frames, the first a welcome (no frame cut in half)."""
    assert frames, "nothing arrived"
    for frame in frames:
        assert frame.opcode == OP_TEXT, frame
        assert isinstance(json.loads(frame.payload), dict)
    assert json.loads(frames[0].payload)["type"] == "welcome"


SLOW_ENV = {"SEND_BUFFER_BYTES": "65536", "RATE_LIMIT_PER_SECOND": "0"}


# -- 1013: a client that fell behind -------------------------------------------------


async def test_a_client_that_stops_reading_finds_1013_and_its_reason_on_the_wire(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    # Long enough a close timeout that the client surely reads all before the cut.
    pod = pod_factory({**SLOW_ENV, "WS_CLOSE_TIMEOUT": "60"})
    stuck = raw_ws_connect(pod.port, "/api/chat-api/ws/general", rcvbuf=4096)
    try:
        await make_slow(session, pod)
        # Now it reads everything: what it was sent, then the close frame.
        frames, close = await asyncio.to_thread(read_until_close, stuck)
        assert close is not None, "the stream ended without a close frame"
        assert close.close == TOO_SLOW
        assert_text_frames(frames)
        stuck.sendall(client_frame(OP_CLOSE, close.payload))  # its answer: the handshake
        assert await asyncio.to_thread(stuck.recv, 1) == b""  # then the server's FIN
    finally:
        stuck.close()
    s = await stats(session, pod)
    assert s["slow_client_disconnects"] == 1
    assert s["rooms"] == {}


@pytest.mark.slow
async def test_a_client_that_never_reads_again_is_cut_after_ws_close_timeout(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    close_timeout = 4.0
    pod = pod_factory({**SLOW_ENV, "WS_CLOSE_TIMEOUT": str(close_timeout)})
    stuck = raw_ws_connect(pod.port, "/api/chat-api/ws/general", rcvbuf=4096)
    try:
        await make_slow(session, pod)
        # It gets the close timeout to read its buffer, and no more. (Seen
        # from here a little after the pod decided: a loose lower bound.)
        cut_after = await asyncio.to_thread(wait_until_cut, stuck, close_timeout + 10)
        assert close_timeout / 4 <= cut_after < close_timeout + 5, cut_after
    finally:
        stuck.close()


async def test_1013_reaches_a_client_that_is_still_sending(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({**SLOW_ENV, "WS_CLOSE_TIMEOUT": "60"})
    stuck = raw_ws_connect(pod.port, "/api/chat-api/ws/general", rcvbuf=4096)
    stop = threading.Event()

    def keep_sending() -> None:  # pings, never reading the pongs
        ping = client_frame(OP_TEXT, b'{"type": "ping"}')
        try:
            while not stop.is_set():
                stuck.sendall(ping * 20)
        except OSError:
            pass  # the server is gone

    pump = threading.Thread(target=keep_sending, daemon=True)
    pump.start()
    try:
        await make_slow(session, pod)
        stop.set()  # (its last write may wait until this reads)
        frames, close = await asyncio.to_thread(read_until_close, stuck)
        await asyncio.to_thread(pump.join, 10)
        assert close is not None, f"no close frame after {len(frames)} frames"
        assert close.close == TOO_SLOW
    finally:
        stop.set()
        stuck.close()


# -- WS_CLOSE_TIMEOUT: a client that never answers the close ---------------------------


def closed_by_the_server(pod: Pod, trigger: str) -> socket.socket:
    """A raw client that makes the server close it (``binary``: it sends a
    binary frame; ``ping``: it ignores the keepalive ping), has read the close
    frame and will never answer it."""
    sock = raw_ws_connect(pod.port, "/api/chat-api/ws/general")
    if trigger == "binary":
        sock.sendall(client_frame(OP_BINARY, b"\x00"))
    frames, close = read_until_close(sock)
    assert close is not None, "no close frame"
    if trigger == "binary":
        assert close.close[0] == 1003
    else:
        assert close.close == (1001, "no answer to ping")
        assert any(f.opcode == OP_PING for f in frames)
    return sock


@pytest.mark.parametrize("trigger", ["binary", "ping"])
def test_a_client_that_never_answers_the_close_is_cut_within_ws_close_timeout(
    pod_factory: PodFactory, trigger: str
) -> None:
    close_timeout = 2.0
    pod = pod_factory({"WS_CLOSE_TIMEOUT": str(close_timeout), "WS_PING_INTERVAL": "1"})
    sock = closed_by_the_server(pod, trigger)
    try:
        assert wait_until_cut(sock, close_timeout + 10) < close_timeout + 5
    finally:
        sock.close()


@pytest.mark.parametrize("trigger", ["binary", "ping"])
def test_a_closing_client_gets_ws_close_timeout_to_answer(
    pod_factory: PodFactory, trigger: str
) -> None:
    close_timeout = 3.0
    pod = pod_factory({"WS_CLOSE_TIMEOUT": str(close_timeout), "WS_PING_INTERVAL": "1"})
    sock = closed_by_the_server(pod, trigger)
    try:
        # A client that answers late, but within the timeout: the connection
        # must still be there for its answer (silence for half the timeout is
        # the behaviour under test).
        sock.settimeout(close_timeout / 2)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert tcp_state(sock) == TCP_ESTABLISHED
        sock.sendall(client_frame(OP_CLOSE, b"\x03\xe8"))  # 1000: the answer
        sock.settimeout(10)
        assert sock.recv(1) == b""  # and then the server lets go (FIN)
    finally:
        sock.close()


# -- closes while the client is still sending ------------------------------------------


def close_while_sending(pod: Pod, kind: str) -> int | None:
    """A client that sends non-stop, from a thread of its own, and trips a
    close: the close code it reads (None: the stream ended without a close
    frame, what a reset does). Its reads run beside the sending, as in any
    real client (a ``websockets`` client: its reader is another thread)."""
    with ws_connect(pod.ws_url("general"), open_timeout=10, close_timeout=5) as ws:
        ws.recv(timeout=10)  # welcome
        return _until_closed(ws, kind)


def _until_closed(ws: ClientConnection, kind: str) -> int | None:

    def keep_sending() -> None:
        try:
            if kind == "oversized":
                ws.send("x" * 2000)
            elif kind == "binary":
                ws.send(b"\x00")
            while True:
                ws.send('{"type": "ping"}')
        except (ConnectionClosed, OSError):
            pass  # the server is gone

    pump = threading.Thread(target=keep_sending, daemon=True)
    pump.start()
    try:
        while True:
            ws.recv(timeout=20)
    except ConnectionClosed as exc:
        return None if exc.rcvd is None else exc.rcvd.code
    finally:
        pump.join(10)


@pytest.mark.parametrize(("kind", "code"), [("flood", 1008), ("oversized", 1009), ("binary", 1003)])
def test_a_close_reaches_a_client_that_is_still_sending(
    pod_factory: PodFactory, kind: str, code: int
) -> None:
    pod = pod_factory(
        {
            "RATE_LIMIT_PER_SECOND": "50",
            "RATE_LIMIT_BURST": "50",
            "RATE_LIMIT_MAX_REFUSED": "20",
            "MAX_MESSAGE_BYTES": "1024",
        }
    )
    # Before the closing handshake was the server's, 5 or 6 of 6 tries saw no
    # close frame (the server cut the connection with unread bytes: a reset).
    assert [close_while_sending(pod, kind) for _ in range(6)] == [code] * 6


# -- what RFC 6455 and the rate limit forbid -------------------------------------------


def test_an_unmasked_client_frame_is_closed_with_1002(pod: Pod) -> None:
    sock = raw_ws_connect(pod.port, "/api/chat-api/ws/general")
    try:
        welcome = read_frame(sock)
        assert welcome is not None
        assert welcome.opcode == OP_TEXT
        sock.sendall(client_frame(OP_TEXT, b'{"type": "ping", "ref": 1}', mask=False))
        answer = read_frame(sock)
        assert answer is not None, "the stream ended without a close frame"
        assert answer.opcode == OP_CLOSE, f"an unmasked frame was answered: {answer}"
        assert answer.close[0] == 1002
    finally:
        sock.close()


def test_websocket_pings_count_against_the_rate_limit(pod_factory: PodFactory) -> None:
    pod = pod_factory(
        {"RATE_LIMIT_PER_SECOND": "10", "RATE_LIMIT_BURST": "10", "RATE_LIMIT_MAX_REFUSED": "20"}
    )
    sock = raw_ws_connect(pod.port, "/api/chat-api/ws/general")
    count = 200  # far over burst + refused, in one write
    try:
        sock.sendall(b"".join(client_frame(OP_PING, b"%d" % n) for n in range(count)))
        pongs = 0
        while pongs < count:
            frame = read_frame(sock)
            assert frame is not None, "the stream ended without a close frame"
            if frame.opcode == OP_CLOSE:
                assert frame.close == (1008, "rate limit exceeded")
                break
            pongs += frame.opcode == OP_PONG
        assert pongs < count, "every ping of the flood was answered"
    finally:
        sock.close()


# -- HTTP before the upgrade -----------------------------------------------------------

HTTP_REQUEST_DEADLINE = 10.0
"""The docs give no number; a server must not hold a half-sent request for
ever (a slow-loris client), and ten seconds is generous for one request."""


@pytest.mark.slow
def test_an_unfinished_http_request_is_not_held_for_ever(pod: Pod) -> None:
    with socket.create_connection(("127.0.0.1", pod.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no end
        started = time.monotonic()
        sock.settimeout(HTTP_REQUEST_DEADLINE + 2)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"still open after {time.monotonic() - started:.1f}s")
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:80]


@pytest.mark.contract
def test_frames_sent_with_a_join_are_answered_after_it(pod: Pod) -> None:
    """A join (its catch-up waits for the room's position) and frames after
    it, all in one write: they wait for the join and are answered in the
    order sent. (The aiohttp transport reads such a write itself, without
    aiohttp's queue: the frames after the join wait there too.)"""
    sock = raw_ws_connect(pod.port, "/api/chat-api/ws/general")
    try:
        assert read_frame(sock) is not None  # the welcome
        frames = [
            {"type": "join", "room": "other", "history": 5, "ref": "j"},
            {"type": "ping", "ref": "p"},
            {"type": "message", "room": "other", "data": "hi", "ref": "m"},
        ]
        sock.sendall(b"".join(client_frame(OP_TEXT, json.dumps(f).encode()) for f in frames))
        answers: list[tuple[str, str]] = []
        while ("ack", "m") not in answers:
            frame = read_frame(sock)
            assert frame is not None, f"the stream ended after {answers}"
            assert frame.opcode == OP_TEXT, frame
            text = json.loads(frame.payload)
            if "ref" in text:
                answers.append((text["type"], text["ref"]))
        assert answers == [("joined", "j"), ("pong", "p"), ("ack", "m")]
    finally:
        sock.close()


def test_frames_cut_anywhere_are_read_as_frames(pod_factory: PodFactory) -> None:
    """The transport follows a client's frame boundaries (to refuse unmasked
    frames and drop what comes after a close): whatever the cuts, every frame
    is read as the client framed it, and its Close ends the connection."""
    pod = pod_factory({"RATE_LIMIT_PER_SECOND": "0", "MAX_MESSAGE_BYTES": "200000"})
    sock = raw_ws_connect(pod.port, "/api/chat-api/ws/general")
    rng = random.Random(6455)
    try:
        welcome = read_frame(sock)
        assert welcome is not None
        # Lengths on both sides of each header form (7 bits, 16 bits, 64 bits).
        sizes = [0, 1, 125, 126, 127, 200, 65535, 65536, 70000]
        data = b""
        for n in range(60):
            pad = "x" * rng.choice(sizes)
            data += client_frame(
                OP_TEXT, json.dumps({"type": "ping", "ref": n, "pad": pad}).encode()
            )
            if n % 7 == 0:
                data += client_frame(OP_PING, b"p%d" % n)
        data += client_frame(OP_CLOSE, b"\x03\xe8")
        pos = 0
        while pos < len(data):  # cut at random places, some one byte at a time
            step = rng.choice([1, 2, 3, 7, rng.randint(1, 5000), rng.randint(1, 100_000)])
            sock.sendall(data[pos : pos + step])
            pos += step
        frames, close = read_until_close(sock)
        texts = [json.loads(f.payload) for f in frames if f.opcode == OP_TEXT]
        # the client's own member_joined may come among the pongs (presence is
        # written up to 0.2 s after the join, and the cut frames take longer)
        assert {t["type"] for t in texts} <= {"pong", "member_joined"}, texts
        pongs = [t["ref"] for t in texts if t["type"] == "pong"]
        assert pongs == list(range(60))
        assert sum(f.opcode == OP_PONG for f in frames) == 9
        assert close is not None
        assert close.close == (1000, "")
        assert sock.recv(1) == b""  # the handshake done, the server closes first
    finally:
        sock.close()
