"""Helpers for tests that drive real chat-api processes.

``Pod`` starts ``python -m chat_api`` on port 0 and waits for its own
"listening on" log line to learn the port; nothing here sleeps for a fixed
time: every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

LISTENING = re.compile(r"(?:listening|Uvicorn running) on http://([\d.]+):(\d+)")
"""The line that says a pod is serving: chat-api's own, or uvicorn's."""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSPORTS = ("aiohttp", "asgi")
"""What serves a pod: ``python -m chat_api`` (aiohttp), or the FastAPI
example on uvicorn (``examples/fastapi_chat.py``, the ASGI transport)."""


def asgi_command(port: str) -> list[str]:
    """uvicorn serving the FastAPI example on ``port`` (0: a free one)."""
    return [
        sys.executable, "-m", "uvicorn", "--app-dir", ROOT, "examples.fastapi_chat:app",
        "--host", "127.0.0.1", "--port", port, "--no-access-log", "--ws-ping-interval", "0",
    ]  # fmt: skip


DEFAULT_TIMEOUT = 10.0


class Pod:
    """One chat-api server process on a free port."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        name: str = "pod",
        command: list[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        transport: str = "aiohttp",
    ) -> None:
        self.name = name
        self.transport = transport
        # tests/ by default: no stray .env is read from the checkout
        self.cwd = os.fspath(cwd) if cwd is not None else os.path.dirname(os.path.abspath(__file__))
        self._command = command
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": "0",
            "POD_ID": name,
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDEVMODE": "1",
            **(env or {}),
        }
        self.env.setdefault("REDIS_URL", "")
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._pump_thread = threading.Thread()
        self.port = 0
        self._ready = threading.Event()
        self._lock = threading.Lock()

    # -- process ------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        if self._command is not None:
            return self._command
        if self.transport == "asgi":
            return asgi_command(self.env["PORT"])
        return [sys.executable, "-m", "chat_api"]

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> Pod:
        self._ready.clear()
        self.proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.cwd,
        )
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc,), daemon=True)
        self._pump_thread.start()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError(f"{self.name} did not start:\n{self.log}")
        return self

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                with self._lock:
                    self.lines.append(line.rstrip("\n"))
                match = LISTENING.search(line)
                if match and not self._ready.is_set():
                    self.port = int(match.group(2))
                    self._ready.set()

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the process to exit and for its output to be read."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._pump_thread.join(timeout)
        return code

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """SIGTERM, then wait for a clean exit (SIGKILL if it hangs)."""
        if self.proc is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.wait()

    def restart(self, timeout: float = DEFAULT_TIMEOUT) -> Pod:
        """Start again on the same port (after stop or kill)."""
        self.env["PORT"] = str(self.port)
        with self._lock:
            self.lines.clear()
        return self.start(timeout)

    # -- addresses ----------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, room: str | None = None, **query: str) -> str:
        url = f"ws://127.0.0.1:{self.port}/api/chat-api/ws" + (f"/{room}" if room else "")
        if query:
            url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return url

    def wait_for_log(self, pattern: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait until a log line matches ``pattern`` (a regex); return it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for line in self.lines:
                    if regex.search(line):
                        return line
            time.sleep(0.02)  # polling interval
        raise AssertionError(f"{self.name}: no log line matching {pattern!r}:\n{self.log}")


# -- async helpers -----------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02
) -> Any:
    """Call ``check`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
        await asyncio.sleep(interval)  # polling interval, not a wait for the outcome


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(url) as resp:
        return await resp.json()


async def until_linked(*pods: Pod) -> None:
    """Wait until every pod's Redis link is connected. A pod whose Redis is a
    ``ReplyCutter`` on the test's own event loop starts with its link down
    (``pod_factory`` blocks that loop while pods start, so its first
    connection times out) and reconnects with backoff; a message sent before
    that reaches its local clients only, never stored."""
    async with aiohttp.ClientSession() as session:

        async def linked() -> bool:
            for pod in pods:
                got = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
                if got["broadcaster"]["state"] != "connected":
                    return False
            return True

        await eventually(linked)


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Receive one frame; text frames are decoded from JSON."""
    msg = await ws.receive(timeout=timeout)
    if msg.type is aiohttp.WSMsgType.TEXT:
        return orjson.loads(msg.data)
    return msg


async def recv_type(
    ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """Receive frames until one of type ``kind`` arrives; return it."""
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv(ws, max(0.01, deadline - time.monotonic()))
        if isinstance(frame, dict):
            if frame.get("type") == kind:
                return frame
        else:
            raise AssertionError(f"expected a {kind!r} frame, got {frame!r}")


async def connect(
    session: aiohttp.ClientSession, url: str | URL, **kwargs: Any
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """Open a WebSocket and read its welcome frame."""
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        ws = await session.ws_connect(url, **kwargs)
    welcome = await recv(ws)
    assert isinstance(welcome, dict), f"no welcome: {welcome!r}"
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def send(ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any]) -> None:
    # A send waits for the transport to drain: a server that stops reading
    # would hold it forever.
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        await ws.send_str(orjson.dumps(frame).decode())


def raw_ws_connect(port: int, path: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket handshake over a plain blocking socket, for clients that
    misbehave on purpose (never read, vanish without a close frame)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(DEFAULT_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        sock.close()
        raise ConnectionError(f"handshake refused: {status.decode()}")
    return sock


# -- raw WebSocket frames (RFC 6455 5.2), for clients that misbehave on purpose --

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass(frozen=True)
class RawFrame:
    """One frame as a raw client read it off the socket."""

    opcode: int
    payload: bytes

    @property
    def close(self) -> tuple[int, str]:
        """The code and reason of a close frame."""
        assert self.opcode == OP_CLOSE, self
        if len(self.payload) < 2:
            return 1005, ""
        (code,) = struct.unpack("!H", self.payload[:2])
        return code, self.payload[2:].decode()


def client_frame(opcode: int, payload: bytes, *, mask: bool = True) -> bytes:
    """A complete client frame; ``mask=False`` breaks RFC 6455 on purpose."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_frame(sock: socket.socket) -> RawFrame | None:
    """The next server frame (servers never mask), or None at end of stream.
    Blocks up to the socket's timeout; raises ``TimeoutError`` after it."""
    head = _read_exactly(sock, 2)
    if head is None:
        return None
    n = head[1] & 0x7F
    if n == 126:
        ext = _read_exactly(sock, 2)
        n = struct.unpack("!H", ext)[0] if ext else -1
    elif n == 127:
        ext = _read_exactly(sock, 8)
        n = struct.unpack("!Q", ext)[0] if ext else -1
    payload = _read_exactly(sock, n) if n >= 0 else None
    if payload is None:
        raise AssertionError("the stream ended inside a frame")
    return RawFrame(head[0] & 0x0F, payload)


def read_until_close(sock: socket.socket) -> tuple[list[RawFrame], RawFrame | None]:
    """Read frames until a close frame (returned second) or the end of the
    stream (None second: the server went without a close frame)."""
    frames: list[RawFrame] = []
    while True:
        try:
            frame = read_frame(sock)
        except ConnectionResetError:
            return frames, None
        if frame is None:
            return frames, None
        if frame.opcode == OP_CLOSE:
            return frames, frame
        frames.append(frame)


def wait_for_eof(sock: socket.socket) -> str:
    """Block (up to the socket's timeout) until the server ends the TCP
    connection; how: ``"fin"`` or ``"reset"``. Data still arriving is read
    and dropped."""
    while True:
        try:
            if not sock.recv(65536):
                return "fin"
        except ConnectionResetError:
            return "reset"
