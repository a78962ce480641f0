"""The pub/sub receive path, fed bytes directly: no socket, no Redis."""

from __future__ import annotations

import asyncio

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime import BroadcastError
from realtime.backends.redis.resp import RedisAddress, pack_command
from realtime.backends.redis.subscriber import Subscriber


class RecordingTransport(asyncio.Transport):
    """What the subscriber writes, and whether it was told to go."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = True


def resp(*items: bytes | int) -> bytes:
    """A RESP2 array reply, as Redis sends pub/sub pushes."""
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        if isinstance(item, int):
            out.append(b":%d\r\n" % item)
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(item), item))
    return b"".join(out)


def connected() -> tuple[Subscriber, RecordingTransport, list[tuple[bytes, bytes]]]:
    got: list[tuple[bytes, bytes]] = []
    subscriber = Subscriber(lambda channel, data: got.append((channel, data)))
    transport = RecordingTransport()
    subscriber.connection_made(transport)
    return subscriber, transport, got


def parse_commands(data: bytes) -> list[list[bytes]]:
    reader = hiredis.Reader()
    reader.feed(data)
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(command)
    return commands


async def test_handshake_authenticates_names_subscribes_and_pings() -> None:
    subscriber, transport, _ = connected()
    address = RedisAddress(username="app", password="secret")
    subscriber.handshake([b"p:global", b"p:pod:a"], address=address, client_name="chat-api:a:sub")
    assert parse_commands(bytes(transport.written)) == [
        [b"AUTH", b"app", b"secret"],
        [b"CLIENT", b"SETNAME", b"chat-api:a:sub"],
        [b"SUBSCRIBE", b"p:global", b"p:pod:a"],
        [b"PING"],
    ]
    subscriber.data_received(
        b"+OK\r\n+OK\r\n" + resp(b"subscribe", b"p:global", 1) + resp(b"subscribe", b"p:pod:a", 2)
    )
    assert not subscriber.ready.done()
    subscriber.data_received(resp(b"pong", b""))
    assert subscriber.ready.done()
    assert subscriber.channels == {b"p:global", b"p:pod:a"}


async def test_an_error_reply_fails_the_handshake_and_drops_the_connection() -> None:
    subscriber, transport, _ = connected()
    subscriber.data_received(b"-WRONGPASS invalid username-password pair\r\n")
    with pytest.raises(BroadcastError, match="WRONGPASS"):
        await subscriber.ready
    assert transport.aborted


async def test_junk_from_the_server_drops_the_connection() -> None:
    subscriber, transport, _ = connected()
    subscriber.data_received(b"?not resp\r\n")
    with pytest.raises(BroadcastError, match="unreadable"):
        await subscriber.ready
    assert transport.aborted


async def test_connection_lost_resolves_closed_with_a_reason() -> None:
    subscriber, _, _ = connected()
    subscriber.ready.set_result(None)
    subscriber.data_received(resp(b"subscribe", b"c", 1))
    subscriber.connection_lost(ConnectionResetError("reset by peer"))
    assert subscriber.closed.done()
    assert "reset by peer" in subscriber.lost_reason
    assert subscriber.channels == set()


async def test_unsubscribe_confirmations_shrink_the_confirmed_set() -> None:
    subscriber, transport, _ = connected()
    subscriber.data_received(resp(b"subscribe", b"a", 1) + resp(b"subscribe", b"b", 2))
    subscriber.unsubscribe([b"a"])
    assert parse_commands(bytes(transport.written)) == [[b"UNSUBSCRIBE", b"a"]]
    subscriber.data_received(resp(b"unsubscribe", b"a", 1))
    assert subscriber.channels == {b"b"}


async def test_many_channels_are_subscribed_in_batches() -> None:
    subscriber, transport, _ = connected()
    subscriber.subscribe([b"c%d" % n for n in range(1200)])
    commands = parse_commands(bytes(transport.written))
    assert [len(c) - 1 for c in commands] == [512, 512, 176]
    assert all(c[0] == b"SUBSCRIBE" for c in commands)


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50),
)
def test_messages_cut_anywhere_arrive_whole_and_in_order(
    payloads: list[bytes], cuts: list[int]
) -> None:
    async def run() -> list[tuple[bytes, bytes]]:
        subscriber, _, got = connected()
        stream = b"".join(resp(b"message", b"room:%d" % i, p) for i, p in enumerate(payloads))
        position, n = 0, 0
        while position < len(stream):
            step = cuts[n % len(cuts)]
            subscriber.data_received(stream[position : position + step])
            position += step
            n += 1
        return got

    got = asyncio.run(run())
    assert got == [(b"room:%d" % i, p) for i, p in enumerate(payloads)]


def test_pack_command_is_what_redis_reads() -> None:
    args = [b"PUBLISH", b"p:room:x", b'pod-a\n{"a": "\\r\\n"}']
    assert parse_commands(pack_command(*args)) == [args]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6380/2", RedisAddress(host="localhost", port=6380, db=2)),
        (
            "redis://user:p%40ss@10.0.0.1:7000/0",
            RedisAddress(host="10.0.0.1", port=7000, username="user", password="p@ss"),
        ),
        (
            "unix:///tmp/redis.sock?password=pw&db=1",
            RedisAddress(path="/tmp/redis.sock", password="pw", db=1),
        ),
        ("rediss://:pw@cache.example", RedisAddress(host="cache.example", password="pw", tls=True)),
        (
            "rediss://cache.example?ssl_cert_reqs=none",
            RedisAddress(host="cache.example", tls=True, tls_verify=False),
        ),
    ],
)
def test_addresses_from_urls(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.from_url(url) == expected


def test_a_tls_address_makes_a_tls_context() -> None:
    assert RedisAddress.from_url("redis://h").ssl_context() is None
    context = RedisAddress.from_url("rediss://h?ssl_cert_reqs=none").ssl_context()
    assert context is not None
    assert not context.check_hostname
