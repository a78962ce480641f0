"""The JavaScript client (``/static/chat-client.js``) in a real headless
Chromium, against real pods and a real redis-server, through faults: a pod
killed while messages are published, a message whose ack never came, Redis
stopped and started again, a token that expires.

Each client lives in a page of its own pod's origin (the pod serves the
module; its Origin check passes) and records what it tells its caller in
``window.chat[label]``: ``messages`` (each ``message`` event's frame),
``events`` (every event: type and detail) and ``tokens`` (how often the
token source was called). The tests read those; they never sleep: they
wait on a condition in the page with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from playwright.sync_api import Browser, Page

from realtime.backends.redis.scripts import APPEND

from .conftest import PodFactory, redis_pod_env
from .redis_support import RedisServer, ReplyCutter
from .support import Pod
from .web_support import OpenPage, launch_browser, page_opener

pytestmark = pytest.mark.slow
WAIT_MS = 20_000

EVENTS = [
    "connecting",
    "connected",
    "reconnecting",
    "reconnected",
    "closed",
    "message",
    "stored",
    "ack",
    "sync",
    "unrecoverable",
    "left",
    "refreshed",
    "error",
]

# Start a client in the page: `options` go to the constructor; `tokens`, if
# given, become a token source handing them out in turn.
START = """
async ({label, url, options, tokens, doubled, events}) => {
  const mod = await import("/static/chat-client.js");
  const record = {messages: [], events: [], tokens: 0, acks: []};
  const extra = {};
  if (tokens) extra.token = async () => tokens[Math.min(record.tokens++, tokens.length - 1)];
  if (doubled) {
    // A real socket on a path that delivers every frame twice.
    extra.WebSocket = class extends WebSocket {
      addEventListener(type, listener, options) {
        const twice = (event) => { listener(event); listener(event); };
        super.addEventListener(type, type === "message" ? twice : listener, options);
      }
    };
  }
  const client = new mod.ChatClient({url, ...options, ...extra});
  for (const type of events) {
    client.addEventListener(type, (event) => {
      record.events.push({type, detail: event.detail, state: client.state});
      if (type === "message") record.messages.push(event.detail);
    });
  }
  (window.chat ??= {})[label] = {client, record};
  await client.connect();
  return client.welcome;
}
"""

# Send `texts` (as {n, text} data) to `room` in order; resolve with the acks.
SEND = """
async ({label, room, items}) => {
  const {client, record} = window.chat[label];
  const acks = await Promise.all(items.map((data) => client.send(data, {room})));
  record.acks.push(...acks);
  return acks;
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch_browser()


@pytest.fixture
def open_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[OpenPage]:
    yield from page_opener(browser, request)


def start(
    open_page: OpenPage,
    pod: Pod,
    label: str,
    *,
    tokens: list[str] | None = None,
    doubled: bool = False,
    **options: Any,
) -> Page:
    """A page on ``pod``'s origin with a connected client called ``label``
    (``tokens``: a token source handing them out; ``doubled``: its socket's
    frames each delivered twice)."""
    page = open_page(label).page
    page.goto(f"{pod.base}/healthz")
    url = f"ws://127.0.0.1:{pod.port}/api/chat-api/ws"
    arg = {
        "label": label,
        "url": url,
        "options": options,
        "tokens": tokens,
        "doubled": doubled,
        "events": EVENTS,
    }
    page.evaluate(START, arg)
    return page


def send(page: Page, label: str, room: str, items: list[Any]) -> list[dict[str, Any]]:
    acks: list[dict[str, Any]] = page.evaluate(SEND, {"label": label, "room": room, "items": items})
    return acks


def send_unawaited(page: Page, label: str, rooms: list[str], n: int) -> None:
    """Send message ``n`` to each of ``rooms`` without waiting for the acks
    (they are recorded when they come: ``wait_ack``)."""
    page.evaluate(
        """([label, rooms, n]) => {
          const {client, record} = window.chat[label];
          for (const room of rooms) client.send({n, room}, {room}).then((a) => record.acks.push(a));
        }""",
        [label, rooms, n],
    )


def wait_ack(page: Page, label: str, room: str, n: int) -> dict[str, Any]:
    """Wait for the ack of message ``n`` in ``room`` (sent by ``send_unawaited``)."""
    handle = page.wait_for_function(
        """([label, room, n]) => {
          const {record} = window.chat[label];
          const message = record.messages.find((m) => m.room === room && m.data.n === n);
          return record.acks.find((a) => a.room === room && message && a.id === message.id);
        }""",
        arg=[label, room, n],
        timeout=WAIT_MS,
    )
    ack: dict[str, Any] = handle.json_value()
    return ack


def numbered(start: int, stop: int, room: str = "") -> list[dict[str, Any]]:
    return [{"n": n, "room": room} for n in range(start, stop)]


def seen(page: Page, label: str, room: str) -> list[Any]:
    """The ``n`` of every message the caller got in ``room``, in order."""
    result: list[Any] = page.evaluate(
        "([label, room]) => window.chat[label].record.messages"
        ".filter((m) => m.room === room).map((m) => m.data.n)",
        [label, room],
    )
    return result


def wait_seen(page: Page, label: str, room: str, count: int) -> list[Any]:
    """Wait until the caller got ``count`` messages in ``room``; return them."""
    page.wait_for_function(
        "([label, room, count]) => window.chat[label].record.messages"
        ".filter((m) => m.room === room).length >= count",
        arg=[label, room, count],
        timeout=WAIT_MS,
    )
    return seen(page, label, room)


def wait_state(page: Page, label: str, state: str) -> None:
    page.wait_for_function(
        "([label, state]) => window.chat[label].client.state === state",
        arg=[label, state],
        timeout=WAIT_MS,
    )


def events(page: Page, label: str, *types: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = page.evaluate(
        "([label, types]) => window.chat[label].record.events"
        ".filter((e) => types.includes(e.type))",
        [label, list(types)],
    )
    return result


def client_stats(page: Page, label: str) -> dict[str, int]:
    result: dict[str, int] = page.evaluate("(label) => window.chat[label].client.stats", label)
    return result


# -- resume -----------------------------------------------------------------------------


def test_every_message_once_in_order_when_the_readers_pod_is_killed_mid_stream(
    pod_factory: PodFactory, shared_redis_url: str, channel_prefix: str, open_page: OpenPage
) -> None:
    """The reader is in two rooms (one from the URL, one by a join frame);
    its pod is killed (no close frame) while both rooms get messages, and
    started again while more are published: the reader resumes both rooms
    (since/epoch) and its caller sees every message once, in order."""
    env = redis_pod_env(shared_redis_url, channel_prefix)
    pod_a, pod_b = pod_factory(env, name="pod-a"), pod_factory(env, name="pod-b")
    reader = start(open_page, pod_a, "reader", rooms=["lobby", "side"])
    writer = start(open_page, pod_b, "writer", rooms=["lobby", "side"])
    for room in ("lobby", "side"):
        send(writer, "writer", room, numbered(0, 10, room))
        assert wait_seen(reader, "reader", room, 10) == list(range(10))

    pod_a.kill()
    wait_state(reader, "reader", "reconnecting")
    for room in ("lobby", "side"):  # while the reader's pod is down
        send(writer, "writer", room, numbered(10, 20, room))
    pod_a.restart()
    # Published while the reader comes back: replay and live delivery overlap.
    send_unawaited(writer, "writer", ["lobby", "side"], 20)
    for room in ("lobby", "side"):
        send(writer, "writer", room, numbered(21, 30, room))
    for room in ("lobby", "side"):
        assert wait_seen(reader, "reader", room, 30) == list(range(30))
        assert reader.evaluate(f"window.chat.reader.client.position('{room}').offset") == 30
    assert [e["type"] for e in events(reader, "reader", "reconnected", "closed")] == ["reconnected"]
    assert events(reader, "reader", "unrecoverable") == []
    # Once more, live, after the resume: nothing held back, nothing twice.
    send(writer, "writer", "lobby", numbered(30, 31, "lobby"))
    assert wait_seen(reader, "reader", "lobby", 31) == list(range(31))


def test_frames_delivered_twice_reach_the_caller_once(
    pod_factory: PodFactory, shared_redis_url: str, channel_prefix: str, open_page: OpenPage
) -> None:
    """Deduplication by room, epoch and offset: the reader's socket hands
    every frame over twice (replayed ones too); its caller sees each
    message once, in order."""
    env = redis_pod_env(shared_redis_url, channel_prefix)
    pod = pod_factory(env)
    writer = start(open_page, pod, "writer", room="general")
    send(writer, "writer", "general", numbered(0, 3))
    reader = start(open_page, pod, "reader", doubled=True, room="general", history=10)
    send(writer, "writer", "general", numbered(3, 10))
    assert wait_seen(reader, "reader", "general", 10) == list(range(10))
    send(writer, "writer", "general", numbered(10, 11))  # nothing more came meanwhile
    assert wait_seen(reader, "reader", "general", 11) == list(range(11))
    assert client_stats(reader, "reader")["duplicates"] == 11


# -- resend -----------------------------------------------------------------------------


def test_a_message_whose_ack_was_lost_is_sent_again_with_its_key_and_stored_once(
    pod_factory: PodFactory, redis_server: RedisServer, channel_prefix: str, open_page: OpenPage
) -> None:
    """The append script ran (the reader gets the message) but its reply
    never reached the writer's pod, which is then killed: the writer's
    client reconnects and sends the message again with its key by itself;
    the ack says duplicate, the send resolves, everyone saw it once."""
    cutter = ReplyCutter(redis_server.port)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(cutter.start(), loop).result(10)
        # A long heartbeat timeout: the writer's pod does not notice the held
        # reply (and settle it from the history) before it is killed.
        writer_env = redis_pod_env(cutter.url, channel_prefix, REDIS_HEARTBEAT_TIMEOUT="60")
        writer_pod = pod_factory(writer_env, name="w")
        reader_pod = pod_factory(redis_pod_env(redis_server.url, channel_prefix), name="r")
        writer = start(open_page, writer_pod, "writer", room="general")
        reader = start(open_page, reader_pod, "reader", room="general")
        send(writer, "writer", "general", numbered(0, 1))
        assert wait_seen(reader, "reader", "general", 1) == [0]

        cutter.arm(APPEND.sha.encode(), hold=True)
        send_unawaited(writer, "writer", ["general"], 1)
        assert wait_seen(reader, "reader", "general", 2) == [0, 1]  # it was stored
        assert writer.evaluate("window.chat.writer.client.pending") == 1  # and never acked
        writer_pod.kill()
        writer_pod.restart()
        ack = wait_ack(writer, "writer", "general", 1)
        assert ack["duplicate"] is True
        assert ack["offset"] == 2
        assert client_stats(writer, "writer")["resent"] == 1
        assert writer.evaluate("window.chat.writer.client.pending") == 0
        # The writer's caller: the message once (from the room's history on
        # resume; the duplicate's echo is not delivered again).
        send(writer, "writer", "general", numbered(2, 3))
        assert wait_seen(writer, "writer", "general", 3) == [0, 1, 2]
        assert wait_seen(reader, "reader", "general", 3) == [0, 1, 2]
    finally:
        asyncio.run_coroutine_threadsafe(cutter.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_message_the_dead_pod_never_read_is_sent_again_and_stored_once(
    pod_factory: PodFactory, shared_redis_url: str, channel_prefix: str, open_page: OpenPage
) -> None:
    """The writer's pod is frozen (SIGSTOP) when the message goes out and
    killed before it reads it: nothing was stored. After the restart the
    client sends it again by itself: stored once (not a duplicate)."""
    env = redis_pod_env(shared_redis_url, channel_prefix)
    writer_pod, reader_pod = pod_factory(env, name="w"), pod_factory(env, name="r")
    writer = start(open_page, writer_pod, "writer", room="general")
    reader = start(open_page, reader_pod, "reader", room="general")
    send(writer, "writer", "general", numbered(0, 1))
    assert wait_seen(reader, "reader", "general", 1) == [0]

    writer_pod.signal(19)  # SIGSTOP: the socket stays open, nothing is read
    send_unawaited(writer, "writer", ["general"], 1)
    writer_pod.kill()
    writer_pod.restart()
    ack = wait_ack(writer, "writer", "general", 1)
    assert ack.get("duplicate") is None
    assert ack["offset"] == 2
    assert client_stats(writer, "writer")["resent"] == 1
    send(writer, "writer", "general", numbered(2, 3))
    assert wait_seen(reader, "reader", "general", 3) == [0, 1, 2]
    assert wait_seen(writer, "writer", "general", 3) == [0, 1, 2]


# -- Redis restarted ----------------------------------------------------------------------


def test_every_message_once_in_order_through_a_redis_restart(
    pod_factory: PodFactory, redis_server: RedisServer, channel_prefix: str, open_page: OpenPage
) -> None:
    """Redis stops (and loses the room: no persistence) and starts again.
    What the writer sent meanwhile is acked without an offset; sent again
    with its key once Redis is back, it reaches the reader on the other pod,
    and the writer's caller, who saw it unstored, is told it is stored
    (``stored``) rather than given it twice."""
    env = redis_pod_env(redis_server.url, channel_prefix)
    writer_pod, reader_pod = pod_factory(env, name="w"), pod_factory(env, name="r")
    writer = start(open_page, writer_pod, "writer", room="general")
    reader = start(open_page, reader_pod, "reader", room="general")
    send(writer, "writer", "general", numbered(0, 5))
    assert wait_seen(reader, "reader", "general", 5) == list(range(5))

    redis_server.stop()
    writer_pod.wait_for_log("redis link lost")
    reader_pod.wait_for_log("redis link lost")
    unconfirmed = send(writer, "writer", "general", numbered(5, 10))
    assert [a["offset"] for a in unconfirmed] == [None] * 5
    redis_server.start()
    writer_pod.wait_for_log("redis link resubscribed")
    reader_pod.wait_for_log("redis link resubscribed")
    # The caller sends them again with their keys, as the ack's offset: null asks.
    acks = writer.evaluate(
        """async () => {
          const {client, record} = window.chat.writer;
          const unconfirmed = record.acks.filter((a) => a.offset === null);
          const again = [];
          for (const ack of unconfirmed) {
            const message = record.messages.find((m) => m.id === ack.id);
            again.push(await client.send(message.data, {room: "general", key: ack.key}));
          }
          return again;
        }"""
    )
    # a new epoch: Redis lost the room (on failure, the acks and the writer pod's log)
    assert [a["offset"] for a in acks] == [1, 2, 3, 4, 5], f"{acks}\n{writer_pod.log}"
    send(writer, "writer", "general", numbered(10, 15))
    assert wait_seen(reader, "reader", "general", 15) == list(range(15))
    assert wait_seen(writer, "writer", "general", 15) == list(range(15))
    assert len(events(writer, "writer", "stored")) == 5
    # Neither connection dropped; the room's reset was said, not hidden.
    for page, label in ((writer, "writer"), (reader, "reader")):
        assert events(page, label, "reconnecting", "closed") == []
        reasons = {e["detail"]["reason"] for e in events(page, label, "unrecoverable")}
        assert reasons <= {"epoch_changed"}


# -- when not to reconnect, and tokens ---------------------------------------------------

SECRET = "web-client-tests-secret-of-at-least-32-bytes"


def token(sub: str, exp: float) -> str:
    return jwt.encode({"sub": sub, "name": sub, "exp": int(exp)}, SECRET, algorithm="HS256")


@pytest.fixture
def auth_pod(pod_factory: PodFactory) -> Pod:
    return pod_factory(
        {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "AUTH_LEEWAY_SECONDS": "0"}
    )


def test_no_reconnect_after_1008_and_the_caller_is_told(auth_pod: Pod, open_page: OpenPage) -> None:
    page = start(open_page, auth_pod, "ada", room="general", token=token("ada", time.time() + 3))
    page.wait_for_function(
        "() => window.chat.ada.record.events.some((e) => e.type === 'closed')", timeout=WAIT_MS
    )
    kinds = [e["type"] for e in events(page, "ada", "reconnecting", "closed")]
    assert kinds == ["closed"]  # decided at the close: no retry was scheduled
    (closed,) = events(page, "ada", "closed")
    assert closed["detail"]["code"] == 1008
    assert "expired" in closed["detail"]["reason"]
    assert page.evaluate("window.chat.ada.client.state") == "closed"


def test_a_refused_token_is_final_with_the_http_status(auth_pod: Pod, open_page: OpenPage) -> None:
    page = open_page("ada").page
    page.goto(f"{auth_pod.base}/healthz")
    url = f"ws://127.0.0.1:{auth_pod.port}/api/chat-api/ws"
    error = page.evaluate(
        """async (url) => {
          const {ChatClient} = await import("/static/chat-client.js");
          const client = new ChatClient({url, room: "general", token: "not-a-token"});
          const closed = new Promise((r) => client.addEventListener("closed", (e) => r(e.detail)));
          const failure = await client.connect().catch((e) => e.code);
          return {failure, closed: await closed, state: client.state};
        }""",
        url,
    )
    assert error["failure"] == "refused"
    assert error["closed"]["status"] == 401
    assert error["state"] == "closed"


def test_a_token_source_keeps_the_client_live_past_its_first_tokens_expiry(
    auth_pod: Pod, open_page: OpenPage
) -> None:
    """Given a token source, the client refreshes before the token expires
    with a ``refresh`` frame, on the same connection, and keeps receiving."""
    now = time.time()
    tokens = [token("ada", now + 8 * (i + 1)) for i in range(6)]
    first_exp = int(now + 8)
    ada = start(open_page, auth_pod, "ada", room="general", tokens=tokens)
    grace = start(open_page, auth_pod, "grace", room="general", token=token("grace", now + 600))
    send(grace, "grace", "general", numbered(0, 1))
    assert wait_seen(ada, "ada", "general", 1) == [0]
    ada.wait_for_function(
        "(exp) => Date.now() / 1000 > exp + 1 && window.chat.ada.client.state === 'live'",
        arg=first_exp,
        timeout=WAIT_MS,
    )
    send(grace, "grace", "general", numbered(1, 2))
    assert wait_seen(ada, "ada", "general", 2) == [0, 1]
    assert events(ada, "ada", "reconnecting", "reconnected", "closed") == []
    assert events(ada, "ada", "refreshed") != []
    assert ada.evaluate("window.chat.ada.record.tokens") >= 2
    assert ada.evaluate("window.chat.ada.client.expiresAt") > first_exp


def api_post(pod: Pod, path: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        f"{pod.base}/api/chat-api/users/{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer api-key", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        status: int = response.status
        return status


def test_a_user_message_arrives_and_a_disconnect_by_the_app_is_final(
    pod_factory: PodFactory, open_page: OpenPage
) -> None:
    pod = pod_factory(
        {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "PUBLISH_API_KEY": "api-key"}
    )
    page = start(open_page, pod, "ada", room="general", token=token("ada", time.time() + 600))
    assert api_post(pod, "ada/messages", {"data": {"text": "ping from the app"}}) == 202
    page.wait_for_function(
        "() => window.chat.ada.record.events.some("
        "(e) => e.type === 'message' && e.detail.to === 'ada')",
        timeout=WAIT_MS,
    )
    assert api_post(pod, "ada/disconnect", {"code": 4003, "reason": "signed out"}) == 202
    page.wait_for_function(
        "() => window.chat.ada.record.events.some((e) => e.type === 'closed')", timeout=WAIT_MS
    )
    kinds = [e["type"] for e in events(page, "ada", "reconnecting", "closed")]
    assert kinds == ["closed"]  # the application's close: no retry
    (closed,) = events(page, "ada", "closed")
    assert (closed["detail"]["code"], closed["detail"]["reason"]) == (4003, "signed out")
