"""chat_api.client: the pure room cursor, then the client against real pods
(and real redis-server processes) through faults: a pod killed, Redis
restarted, an ack that never came; and the terminal client as a subprocess.

The promise under test (docs/client.md): the caller sees every room message
once, in offset order, across reconnects and pods, or is told what could
not be recovered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from chat_api.client import (
    Client,
    ClientClosed,
    Closed,
    Disconnected,
    EpochChanged,
    Event,
    Joined,
    Message,
    Reconnected,
    Refused,
    SendError,
    Unrecoverable,
    User,
)
from chat_api.client.cli import expand_url
from chat_api.client.client import backoff_delay, split_endpoint
from chat_api.client.cursor import Cursor
from realtime.backends.redis.scripts import APPEND

from .conftest import PodFactory, redis_pod_env
from .redis_support import RedisServer, ReplyCutter
from .security_support import SECRET, claims, hs_token
from .support import DEFAULT_TIMEOUT, ROOT, Pod, eventually, until_linked

FAST = {"backoff_base": 0.05, "backoff_cap": 0.5}
"""Reconnect quickly in tests (the defaults are 0.5 s doubling to 15 s)."""


# -- the cursor, without sockets ----------------------------------------------------


def msg(offset: int | None, epoch: str | None = "e1", room: str = "r", mid: str = "") -> Message:
    return Message(room, mid or f"{epoch}-{offset}", User("u", "u"), 0, None, offset, epoch)


def test_a_new_cursor_asks_for_history_and_a_placed_one_resumes() -> None:
    cursor = Cursor("r", history=5)
    assert cursor.catchup() == {"history": 5}
    assert cursor.sync({"room": "r", "epoch": "e1", "offset": 7, "replayed": 2, "first": 6}) == []
    assert (cursor.epoch, cursor.offset) == ("e1", 5)  # the replayed ones come next
    assert [cursor.replaying(), cursor.replaying(), cursor.replaying()] == [True, True, False]
    for offset in (6, 7):
        assert cursor.message(msg(offset)) == (True, [])
    assert cursor.catchup() == {"since": 7, "epoch": "e1"}


def test_copies_of_seen_offsets_and_of_past_epochs_are_dropped() -> None:
    cursor = Cursor("r")
    cursor.catchup()
    cursor.sync({"room": "r", "epoch": "e1", "offset": 0, "replayed": 0})
    assert cursor.message(msg(1))[0]
    assert cursor.message(msg(1)) == (False, [])  # a replay overlapping live delivery
    assert cursor.message(msg(None, None, mid="x")) == (True, [])  # unstamped: not ours to judge
    events = cursor.sync(
        {"room": "r", "epoch": "e2", "offset": 0, "complete": False, "reason": "epoch_changed"}
    )
    assert events == [EpochChanged("r", "e1", "e2")]  # live: the change, not a loss
    assert cursor.message(msg(2, "e1")) == (False, [])  # a straggler of the old epoch
    assert cursor.message(msg(1, "e2")) == (True, [])


def test_a_resume_that_came_too_late_says_how_many_were_lost() -> None:
    cursor = Cursor("r")
    cursor.catchup()
    cursor.sync({"room": "r", "epoch": "e1", "offset": 10, "replayed": 0})
    assert cursor.catchup() == {"since": 10, "epoch": "e1"}
    frame = {"room": "r", "epoch": "e1", "offset": 30, "replayed": 5, "first": 26}
    events = cursor.sync({**frame, "complete": False, "reason": "window_exceeded"})
    assert events == [Unrecoverable("r", "window_exceeded", 15, "e1", 10)]
    assert cursor.offset == 25


def test_a_resume_into_a_new_epoch_is_a_change_and_a_loss() -> None:
    cursor = Cursor("r")
    cursor.catchup()
    cursor.sync({"room": "r", "epoch": "e1", "offset": 3, "replayed": 0})
    cursor.catchup()
    frame = {"room": "r", "epoch": "e2", "offset": 1, "replayed": 1, "first": 1}
    events = cursor.sync({**frame, "complete": False, "reason": "epoch_changed"})
    assert events == [
        EpochChanged("r", "e1", "e2"),
        Unrecoverable("r", "epoch_changed", None, "e1", 3),
    ]
    assert cursor.message(msg(1, "e2")) == (True, [])


def test_an_unannounced_hole_is_reported_before_the_message_after_it() -> None:
    cursor = Cursor("r")
    cursor.catchup()
    cursor.sync({"room": "r", "epoch": "e1", "offset": 1, "replayed": 0})
    assert cursor.message(msg(4)) == (True, [Unrecoverable("r", "gap", 2, "e1", 1)])


def test_backoff_is_capped_and_jittered() -> None:
    assert backoff_delay(0, 0.5, 15, rand=lambda: 0.0) == 0.25
    assert backoff_delay(0, 0.5, 15, rand=lambda: 1.0) == 0.5
    assert backoff_delay(50, 0.5, 15, rand=lambda: 1.0) == 15
    assert backoff_delay(50, 0.5, 15, rand=lambda: 0.0) == 7.5


def test_urls() -> None:
    base, room = split_endpoint("ws://h:1/api/chat-api/ws/general?name=ada")
    assert (str(base), room) == ("ws://h:1/api/chat-api/ws?name=ada", "general")
    assert split_endpoint("wss://h/api/chat-api/ws")[1] is None
    with pytest.raises(ValueError, match="ends in /ws"):
        split_endpoint("ws://h:1/general")
    with pytest.raises(ValueError, match="different rooms"):
        Client(["ws://h:1/api/chat-api/ws/a", "ws://h:2/api/chat-api/ws/b"])
    assert expand_url("ws://h:1/general") == "ws://h:1/api/chat-api/ws/general"
    assert expand_url("ws://h:1/ws/general") == "ws://h:1/api/chat-api/ws/general"
    assert expand_url("http://h:1") == "ws://h:1/api/chat-api/ws"
    assert expand_url("ws://h:1/chat/ws/general") == "ws://h:1/chat/ws/general"


# -- helpers --------------------------------------------------------------------------


class Collector:
    """Every event of a client, gathered by a task of its own."""

    def __init__(self, client: Client) -> None:
        self.events: list[Event] = []
        self._task = asyncio.get_running_loop().create_task(self._collect(client))

    async def _collect(self, client: Client) -> None:
        async for event in client:
            self.events.append(event)

    def messages(self, room: str | None = None) -> list[Message]:
        return [e for e in self.events if isinstance(e, Message) and room in (None, e.room)]

    def texts(self, room: str | None = None) -> list[Any]:
        return [m.data["text"] for m in self.messages(room) if isinstance(m.data, dict)]

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def until(self, check: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT) -> Any:
        async def ok() -> Any:
            if self._task.done():
                self._task.result()
            return check()

        return await eventually(ok, timeout=timeout)

    async def done(self) -> None:
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            await self._task


def in_order_once(messages: list[Message]) -> None:
    """Offsets strictly rise within each epoch, and no id comes twice."""
    ids = [m.id for m in messages]
    assert len(ids) == len(set(ids)), ids
    last: dict[tuple[str | None, str | None], int] = {}
    for m in messages:
        if m.offset is not None:
            assert m.offset > last.get((m.room, m.epoch), 0), messages
            last[(m.room, m.epoch)] = m.offset


async def open_client(url: str | list[str], **kwargs: Any) -> Client:
    client = Client(url, **{**FAST, **kwargs})
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        await client.connect()
    return client


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Clients to close after the test, whatever happens."""
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


# -- against one pod ----------------------------------------------------------------------


async def test_connect_join_with_history_send_and_iterate(pod: Pod, clients: list[Client]) -> None:
    ada = await open_client(pod.ws_url("general"), name="ada")
    clients.append(ada)
    first = await ada.send("general", {"text": "one"})
    assert (first.offset, first.duplicate, first.room) == (1, False, "general")
    assert first.key
    assert first.epoch
    await ada.send("general", {"text": "two"})

    bob = await open_client(pod.ws_url(), name="bob")  # no room: join by frame
    clients.append(bob)
    seen = Collector(bob)
    await bob.join("general", history=1)
    assert bob.rooms == ["general"]
    await seen.until(lambda: seen.texts() == ["two"])
    assert seen.messages()[0].replayed
    await ada.send("general", {"text": "three"})
    await seen.until(lambda: seen.texts() == ["two", "three"])
    live = seen.messages()[-1]
    assert (live.replayed, live.sender.name, live.offset) == (False, "ada", 3)
    assert seen.of(Joined) == [Joined("general", resumed=False)]
    assert bob.user is not None
    assert bob.user.name == "bob"

    with pytest.raises(SendError, match="not_in_room"):
        await bob.send("elsewhere", {"text": "x"})
    await bob.leave("general")
    assert bob.rooms == []


async def test_a_key_reused_for_other_content_is_refused(pod: Pod, clients: list[Client]) -> None:
    ada = await open_client(pod.ws_url("general"))
    clients.append(ada)
    ack = await ada.send("general", {"text": "a"}, key="k-1")
    assert (await ada.send("general", {"text": "a"}, key="k-1")).duplicate
    assert ack.key == "k-1"
    with pytest.raises(SendError) as refused:
        await ada.send("general", {"text": "b"}, key="k-1")
    assert refused.value.code == "key_conflict"


async def test_a_refused_connection_raises_with_the_servers_reason(
    pod_factory: PodFactory,
) -> None:
    pod = pod_factory({"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET})
    with pytest.raises(Refused) as refused:
        await open_client(pod.ws_url("general"))
    assert refused.value.status == 401
    assert "token" in refused.value.detail


async def test_an_expired_token_ends_the_client_without_a_reconnect(
    pod_factory: PodFactory, clients: list[Client]
) -> None:
    pod = pod_factory(
        {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "AUTH_LEEWAY_SECONDS": "0"}
    )
    token = hs_token(claims("ada", ttl=2))
    ada = await open_client(pod.ws_url("general"), token=token)
    clients.append(ada)
    seen = Collector(ada)
    await seen.done()  # the server closes with 1008 at exp, and that is the end
    last = seen.events[-1]
    assert isinstance(last, Closed), seen.events
    assert last.code == 1008
    assert [e.reconnect_in for e in seen.of(Disconnected)] == [None]
    assert not seen.of(Reconnected)
    with pytest.raises(ClientClosed) as closed:
        await ada.send("general", {"text": "late"})
    assert closed.value.code == 1008


async def test_a_disconnect_by_the_users_api_is_final_and_a_user_message_arrives(
    pod_factory: PodFactory, clients: list[Client]
) -> None:
    """4000-4999 (a disconnect by the server API): told, never retried."""
    pod = pod_factory({"PUBLISH_API_KEY": "k"})
    client = await open_client(pod.ws_url("general"))
    clients.append(client)
    seen = Collector(client)
    assert client.user is not None
    api = f"{pod.base}/api/chat-api/users/{client.user.id}"
    headers = {"Authorization": "Bearer k"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/messages", json={"data": "note"}, headers=headers) as r:
            assert r.status == 202

        async def noted() -> bool:
            return any(m.data == "note" for m in seen.messages())

        await eventually(noted, timeout=DEFAULT_TIMEOUT)
        body = {"code": 4001, "reason": "banned for a while", "ban_seconds": 30}
        async with http.post(f"{api}/disconnect", json=body, headers=headers) as r:
            assert r.status == 202
    await seen.done()
    closed = seen.events[-1]
    assert isinstance(closed, Closed), seen.events
    assert (closed.code, closed.reason) == (4001, "banned for a while")
    assert not any(isinstance(e, Reconnected) for e in seen.events)


async def test_a_refresh_keeps_the_same_connection(
    pod_factory: PodFactory, clients: list[Client]
) -> None:
    """A callable token is asked at connect and before each expiry, and sent
    in a refresh frame: the client outlives its tokens on one connection."""
    pod = pod_factory(
        {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "AUTH_LEEWAY_SECONDS": "0"}
    )
    expiries: list[float] = []

    async def token() -> str:
        payload = claims("ada", ttl=3)
        expiries.append(payload["exp"])
        return hs_token(payload)

    ada = await open_client(pod.ws_url("general"), token=token)
    clients.append(ada)
    seen = Collector(ada)
    await seen.until(lambda: len(expiries) >= 3, timeout=20)  # two refreshes
    assert time.time() > expiries[0]
    await ada.send("general", {"text": "same connection"})
    await seen.until(lambda: seen.texts() == ["same connection"])
    assert not seen.of(Disconnected)
    assert not seen.of(Reconnected)


# -- through faults -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.aiohttp_only("the client's behaviour, not the transport's")
async def test_resume_on_another_pod_after_the_pod_is_killed(
    pod_factory: PodFactory, redis_server: RedisServer, channel_prefix: str, clients: list[Client]
) -> None:
    env = redis_pod_env(redis_server.url, channel_prefix)
    a, b = pod_factory(env, name="a"), pod_factory(env, name="b")
    # A first retry 1-2 s out: the messages sent meanwhile are a catch-up.
    ada = await open_client([a.ws_url("room"), b.ws_url("room")], backoff_base=2.0, backoff_cap=2.0)
    bob = await open_client(b.ws_url("room"), name="bob")
    clients += [ada, bob]
    seen = Collector(ada)
    for i in range(5):
        await bob.send("room", {"text": f"m{i}"})
    await seen.until(lambda: len(seen.messages()) == 5)

    a.signal(signal.SIGKILL)
    a.wait()
    await seen.until(lambda: seen.of(Disconnected))
    for i in range(5, 10):
        await bob.send("room", {"text": f"m{i}"})  # while ada is away
    await seen.until(lambda: seen.of(Reconnected))
    for i in range(10, 15):
        await bob.send("room", {"text": f"m{i}"})
    await seen.until(lambda: len(seen.messages()) >= 15)

    assert seen.texts() == [f"m{i}" for i in range(15)]
    in_order_once(seen.messages())
    assert any(m.replayed for m in seen.messages()[5:10])
    assert seen.of(Reconnected)[0].pod == "b"
    assert not seen.of(Unrecoverable)
    assert (await ada.send("room", {"text": "back"})).offset == 16


@pytest.mark.slow
@pytest.mark.aiohttp_only("the client's behaviour, not the transport's")
async def test_redis_restarted_mid_traffic(
    pod_factory: PodFactory, redis_server: RedisServer, channel_prefix: str, clients: list[Client]
) -> None:
    """Redis restarts (its state gone: a new epoch) while a sender keeps
    sending on the other pod: what could not be stored is resent with its
    key until it is; the reader sees each message once, in the order sent."""
    env = redis_pod_env(redis_server.url, channel_prefix)
    a, b = pod_factory(env, name="a"), pod_factory(env, name="b")
    reader = await open_client(a.ws_url("room"))
    sender = await open_client(b.ws_url("room"), name="sender")
    clients += [reader, sender]
    seen = Collector(reader)
    total = 30
    acks = []

    async def traffic() -> None:
        for i in range(total):
            acks.append(await sender.send("room", {"text": f"m{i}"}))

    async with asyncio.timeout(60):
        sending = asyncio.get_running_loop().create_task(traffic())
        await seen.until(lambda: len(seen.messages()) >= 10)
        redis_server.restart()
        await sending
        await seen.until(lambda: len(seen.texts()) >= total, timeout=30)

    assert seen.texts() == [f"m{i}" for i in range(total)]
    in_order_once(seen.messages())
    assert all(ack.offset is not None for ack in acks)  # every one stored in the end
    assert seen.of(EpochChanged)  # the restart lost the room's state
    assert acks[-1].epoch != acks[0].epoch


@pytest.mark.slow
@pytest.mark.aiohttp_only("the client's behaviour, not the transport's")
async def test_an_unacknowledged_message_is_resent_with_its_key_and_stored_once(
    pod_factory: PodFactory, redis_server: RedisServer, channel_prefix: str, clients: list[Client]
) -> None:
    """The pod stored the message, then died before its ack: the client
    resends it (same key) on the other pod, gets a duplicate ack with the
    stored offset, and nobody sees it twice."""
    cutter = await ReplyCutter(redis_server.port).start()
    try:
        a = pod_factory(redis_pod_env(cutter.url, channel_prefix), name="a")
        b = pod_factory(redis_pod_env(redis_server.url, channel_prefix), name="b")
        await until_linked(a, b)  # a's link through the cutter may start down
        bob = await open_client(b.ws_url("died"), name="bob")
        ada = await open_client([a.ws_url("died"), b.ws_url("died")], name="ada")
        clients += [bob, ada]
        bobs, adas = Collector(bob), Collector(ada)
        cutter.arm(APPEND.sha.encode(), hold=True)  # the reply never comes back
        sending = asyncio.get_running_loop().create_task(ada.send("died", {"text": "last"}))
        await bobs.until(lambda: bobs.texts() == ["last"])  # it was stored
        assert not sending.done()
        a.signal(signal.SIGKILL)
        a.wait()
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            ack = await sending
        assert (ack.duplicate, ack.offset) == (True, 1)
        await bob.send("died", {"text": "after"})
        await bobs.until(lambda: bobs.texts() == ["last", "after"])
        await adas.until(lambda: adas.texts() == ["last", "after"])
        in_order_once(adas.messages())
    finally:
        await cutter.stop()


# -- the terminal client ----------------------------------------------------------------------


async def run_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chat_api", "chat", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=os.path.join(ROOT, "tests"),
    )  # fmt: skip


async def read_line(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        return (await stream.readline()).decode().rstrip("\n")


@pytest.mark.slow
async def test_the_cli_prints_messages_and_sends_lines(pod: Pod, clients: list[Client]) -> None:
    ada = await open_client(pod.ws_url("general"), name="ada")
    clients.append(ada)
    await ada.send("general", {"text": "before you came"})
    seen = Collector(ada)
    cli = await run_cli(f"ws://127.0.0.1:{pod.port}/general", "--name", "bob", "--history", "5")
    try:
        assert await read_line(cli.stdout) == "[general] ada: before you came"
        await ada.send("general", {"text": "hi bob"})
        assert await read_line(cli.stdout) == "[general] ada: hi bob"
        assert cli.stdin is not None
        cli.stdin.write(b"hello ada\n/join side\non the side\n")
        await cli.stdin.drain()
        assert await read_line(cli.stdout) == "[general] bob: hello ada"
        assert await read_line(cli.stdout) == "[side] bob: on the side"
        await seen.until(lambda: "hello ada" in seen.texts())
        assert seen.messages()[-1].sender.name == "bob"
        cli.stdin.write(b"/quit\n")
        await cli.stdin.drain()
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            assert await cli.wait() == 0
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.wait()


@pytest.mark.slow
async def test_the_cli_exits_at_the_end_of_input(pod: Pod) -> None:
    cli = await run_cli(pod.ws_url("general"))
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        _, err = await cli.communicate(b"one line\n")
    assert cli.returncode == 0, err.decode()


@pytest.mark.slow
async def test_the_cli_says_why_a_connection_was_refused(pod_factory: PodFactory) -> None:
    pod = pod_factory({"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET})
    cli = await run_cli(pod.ws_url("general"))
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        _, err = await cli.communicate(b"")
    assert cli.returncode == 1
    assert "refused the connection" in err.decode()
    assert "HTTP 401" in err.decode()
    token = hs_token(claims("ada"))
    cli = await run_cli(pod.ws_url("general"), "--token-command", f"echo {token}")
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        _, err = await cli.communicate(b"hi\n")
    assert cli.returncode == 0, err.decode()


@pytest.mark.slow
async def test_the_cli_cannot_connect_to_nothing(unused_tcp_port: int) -> None:
    cli = await run_cli(f"ws://127.0.0.1:{unused_tcp_port}/general")
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        _, err = await cli.communicate(b"")
    assert cli.returncode == 1
    assert "cannot connect" in err.decode()


async def test_the_cli_has_help() -> None:
    cli = await run_cli("--help")
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        out, _ = await cli.communicate(b"")
    assert cli.returncode == 0
    assert "--token-command" in out.decode()
