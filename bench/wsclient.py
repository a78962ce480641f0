"""A bare-bones WebSocket client on an asyncio protocol, built to keep up.

The load generator must read far more frames than the servers under test
write per connection, so this client does as little as possible per frame:
it splits the byte stream into frames by their headers, answers pings, and
looks inside a text frame only for the benchmark's marker string
``"~sender.seq.stamp~"`` (found with ``bytes.find``, no JSON parsing). It
speaks three dialects on top of WebSocket: chat-api's JSON frames, Socket.IO
(Engine.IO v4 packets, what python-socketio and Node socket.io serve), and
the JSON frames of the Django Channels peer (``bench/peers/django_channels.py``).

Client frames must be masked (RFC 6455 5.3); the mask key is all zeros, which
leaves the payload unchanged, so a frame is header + key + payload.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from array import array
from collections.abc import Callable
from typing import Final, cast

MARK_OPEN: Final = b'"~'
MARK_CLOSE: Final = b'~"'
ZERO_MASK: Final = b"\x00\x00\x00\x00"


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked (zero key), unfragmented client frame."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + ZERO_MASK + payload


class Dialect:
    """How one system names its endpoint and wraps a chat message."""

    name = "?"

    def path(self, room: str) -> str:
        raise NotImplementedError

    def message(self, room: str, marker: str, ref: int) -> bytes:
        raise NotImplementedError

    def on_control(self, client: WsClient, payload: bytes) -> None:
        """A text frame without a marker (welcome, acks, Engine.IO packets)."""
        raise NotImplementedError

    def on_open(self, client: WsClient) -> None:
        """The handshake is done (101); most dialects wait for a frame."""


class ChatApi(Dialect):
    name = "chat-api"

    def path(self, room: str) -> str:
        return f"/api/chat-api/ws/{room}"

    def message(self, room: str, marker: str, ref: int) -> bytes:
        # The full feature set: a validated frame with a ref, answered by an ack.
        return b'{"type":"message","data":"%s","ref":%d}' % (marker.encode(), ref)

    def on_control(self, client: WsClient, payload: bytes) -> None:
        if payload.startswith(b'{"type":"welcome"'):
            client.mark_ready()
        elif payload.startswith(b'{"type":"ack"'):
            client.acks += 1
        elif payload.startswith(b'{"type":"error"'):
            client.errors += 1


class SocketIO(Dialect):
    """Engine.IO v4 over WebSocket, default namespace; the room is chosen by
    the ``room`` query parameter, which the peer server joins on connect."""

    name = "socketio"

    def path(self, room: str) -> str:
        return f"/socket.io/?EIO=4&transport=websocket&room={room}"

    def message(self, room: str, marker: str, ref: int) -> bytes:
        # An event with an ack id, like chat-api's ref.
        return b'42%d["message",{"room":"%s","data":"%s"}]' % (
            ref,
            room.encode(),
            marker.encode(),
        )

    def on_control(self, client: WsClient, payload: bytes) -> None:
        if payload == b"2":  # Engine.IO ping from the server
            client.send_text(b"3")
        elif payload.startswith(b"43"):
            client.acks += 1
        elif payload.startswith(b"40"):  # namespace connected (room joined)
            client.mark_ready()
        elif payload.startswith(b"0{"):  # Engine.IO open: connect the namespace
            client.send_text(b"40")
        elif payload.startswith(b"44"):
            client.errors += 1


class DjangoChannels(Dialect):
    """The Django Channels tutorial's shape: the room is in the URL, the
    consumer joins its group before it accepts, so the handshake's 101 means
    "in the room". A message frame is chat-api's; the consumer answers with
    ``json.dumps`` output (a space after each colon)."""

    name = "django-channels"

    def path(self, room: str) -> str:
        return f"/ws/chat/{room}/"

    def message(self, room: str, marker: str, ref: int) -> bytes:
        return b'{"type":"message","data":"%s","ref":%d}' % (marker.encode(), ref)

    def on_open(self, client: WsClient) -> None:
        client.mark_ready()

    def on_control(self, client: WsClient, payload: bytes) -> None:
        if payload.startswith(b'{"type": "ack"'):
            client.acks += 1
        elif payload.startswith(b'{"type": "error"'):
            client.errors += 1


DIALECTS: Final[dict[str, Dialect]] = {d.name: d for d in (ChatApi(), SocketIO(), DjangoChannels())}


class Tally:
    """What the receivers of one worker saw; shared by its connections."""

    __slots__ = ("by_room", "dups", "latencies_us", "orders", "record_order")

    def __init__(self, record_order: bool = False) -> None:
        self.by_room: dict[str, int] = {}
        self.dups = 0
        self.latencies_us = array("q")
        self.record_order = record_order
        self.orders: list[list[int]] = []


class WsClient(asyncio.Protocol):
    """One WebSocket connection. ``counting`` clients record each marked
    message they receive; others (senders) just drain their input."""

    def __init__(
        self,
        dialect: Dialect,
        room: str,
        tally: Tally | None,
    ) -> None:
        self.dialect = dialect
        self.room = room
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._upgraded = False
        self._buf = bytearray()
        self.seen: set[int] = set()
        self.order: list[int] | None = [] if tally is not None and tally.record_order else None
        self.received = 0
        self.frames = 0
        self.acks = 0
        self.errors = 0
        self.close_code: int | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def handshake(self, host: str, port: int) -> None:
        assert self.transport is not None
        key = base64.b64encode(os.urandom(16))
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
            % (self.dialect.path(self.room).encode(), host.encode(), port, key)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before ready: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def mark_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self._upgraded:
            self._buf += data
            if not self._upgrade():
                return
            data, self._buf = bytes(self._buf), bytearray()
        now = time.monotonic_ns()
        if self._buf:
            buf = self._buf
            buf += data
            used = self._frames(buf, now)
            del buf[:used]
        else:  # the usual case: parse the bytes as they came, no copy
            used = self._frames(data, now)
            if used < len(data):
                self._buf += data[used:]

    def _upgrade(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        status = bytes(buf[:end]).split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(status.decode(errors="replace")))
            assert self.transport is not None
            self.transport.close()
            return False
        self._upgraded = True
        del buf[: end + 4]
        self.dialect.on_open(self)
        return True

    def _frames(self, buf: bytes | bytearray, now: int) -> int:
        """Handle every complete frame in ``buf``; return the bytes used."""
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            n = buf[pos + 1] & 0x7F
            start = pos + 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + n
            if end > size:
                break
            pos = end
            opcode = b0 & 0x0F
            if opcode == 0x1:
                self._on_text(buf, start, end, now)
            elif opcode == 0x9:  # ping: answer with the same payload
                self._write(client_frame(bytes(buf[start:end]), 0xA))
            elif opcode == 0x8:
                if n >= 2:
                    self.close_code = (buf[start] << 8) | buf[start + 1]
                self._write(client_frame(bytes(buf[start : start + 2]), 0x8))
                assert self.transport is not None
                self.transport.close()
                return size
        return pos

    # -- frames -----------------------------------------------------------

    def _on_text(self, buf: bytes | bytearray, start: int, end: int, now: int) -> None:
        self.frames += 1
        i = buf.find(MARK_OPEN, start, end)
        if i < 0:
            self.dialect.on_control(self, bytes(buf[start:end]))
            return
        tally = self.tally
        if tally is None:
            return
        j = buf.find(MARK_CLOSE, i + 2, end)
        sender, seq, stamp = buf[i + 2 : j].split(b".")
        key = (int(sender) << 32) | int(seq)
        seen = self.seen
        if key in seen:
            tally.dups += 1
            return
        seen.add(key)
        self.received += 1
        tally.latencies_us.append((now - int(stamp)) // 1000)
        if self.order is not None:
            self.order.append(key)

    def _write(self, frame: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(frame)

    def send_text(self, payload: bytes) -> None:
        self._write(client_frame(payload))

    def send_message(self, sender: int, seq: int) -> None:
        marker = f"~{sender}.{seq}.{time.monotonic_ns()}~"
        self._write(client_frame(self.dialect.message(self.room, marker, seq)))

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(client_frame(struct.pack("!H", 1000), 0x8))
            t.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str,
    port: int,
    dialect: Dialect,
    room: str,
    tally: Tally | None,
    timeout: float = 10.0,
) -> WsClient:
    """Open a connection and wait until the server says it is in its room."""
    loop = asyncio.get_running_loop()
    factory: Callable[[], WsClient] = lambda: WsClient(dialect, room, tally)  # noqa: E731
    _, client = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout)
    client.handshake(host, port)
    try:
        await asyncio.wait_for(client.ready, timeout)
    except BaseException:
        client.abort()
        raise
    return client
