"""The chat page, in a real headless Chromium (Debian's) driven by Playwright.

Each test saves a screenshot of every page it opened under
``test-artifacts/web/``; the browser fixtures, and when these tests skip,
are in ``web_support.py``.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import jwt
import orjson
import pytest
from playwright.sync_api import Browser, Locator, Page, expect
from websockets.sync.client import connect as ws_connect

from realtime.backends.redis.scripts import APPEND

from .conftest import PodFactory, redis_pod_env
from .redis_support import RedisServer, ReplyCutter
from .support import Pod
from .web_support import PHONE, OpenPage, Tab, launch_browser, page_opener

XSS = "<img src=x onerror=alert(1)>"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch_browser()


@pytest.fixture
def open_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[OpenPage]:
    yield from page_opener(browser, request)


def chat(tab: Tab, pod: Pod, name: str, room: str = "general") -> Page:
    """Open the page as ``name`` in ``room`` (from the address) and wait until live."""
    page = tab.page
    page.goto(f"{pod.base}/?name={quote(name)}#{room}")
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    return page


def say(page: Page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def message(page: Page, text: str, *, own: bool | None = None) -> Locator:
    """The locator of the confirmed message with ``text``."""
    css = "#log li.msg[data-id]"
    if own is True:
        css += ".own"
    elif own is False:
        css += ":not(.own)"
    return page.locator(css).filter(has=page.locator(".text", has_text=text))


def test_two_pages_chat_both_ways(pod: Pod, open_page: OpenPage) -> None:
    # Alice uses the form, on a phone-sized screen, with the keyboard only.
    alice = open_page("alice", PHONE).page
    alice.goto(pod.base + "/")
    expect(alice.locator("#status")).to_have_attribute("data-state", "idle")
    expect(alice.get_by_label("Display name", exact=True)).to_be_focused()
    alice.keyboard.type("alice")
    alice.keyboard.press("Tab")
    expect(alice.get_by_label("Room", exact=True)).to_be_focused()
    alice.keyboard.press("Control+A")
    alice.keyboard.type("lobby")
    alice.keyboard.press("Enter")
    expect(alice.locator("#status")).to_have_attribute("data-state", "live")
    expect(alice.get_by_label("Message", exact=True)).to_be_focused()
    assert alice.evaluate("location.hash") == "#lobby"

    bob = chat(open_page("bob"), pod, "bob", "lobby")

    say(alice, "hello bob")
    expect(message(bob, "hello bob", own=False).locator(".from")).to_have_text("alice")
    expect(message(alice, "hello bob", own=True)).to_have_count(1)
    say(bob, "hi alice\nsecond line")
    expect(message(alice, "hi alice", own=False).locator(".from")).to_have_text("bob")
    expect(message(bob, "hi alice", own=True)).to_have_count(1)
    expect(message(alice, "hi alice").locator(".text")).to_have_text("hi alice\nsecond line")

    for page in (alice, bob):
        for item in page.locator("#log li.msg").all():
            expect(item.locator("time.ts")).to_have_text(re.compile(r"\d"))
        # No error lines: a server without presence (or with it) is handled quietly.
        expect(page.locator("#log .system.error")).to_have_count(0)
    # Nothing sticks out sideways on the phone.
    assert alice.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_once_joined_the_form_folds_into_a_bar_with_change_and_leave(
    pod: Pod, open_page: OpenPage
) -> None:
    page = open_page("desktop").page  # a desktop-sized window, where it stayed open before
    page.goto(pod.base + "/")
    form = page.locator("#join")
    expect(form).to_be_visible()
    expect(page.get_by_role("button", name="Leave")).to_be_hidden()
    page.get_by_label("Display name", exact=True).fill("ada")
    page.get_by_label("Room", exact=True).fill("general")
    page.get_by_role("button", name="Join").click()
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    expect(form).to_be_hidden()
    bar = page.locator("#room-title")
    expect(bar).to_have_text(re.compile(r"^#general · you are ada$"))
    change = page.get_by_role("button", name="Change")
    expect(change).to_have_attribute("aria-expanded", "false")
    bar_height = page.locator("header.bar").bounding_box()
    assert bar_height is not None
    assert bar_height["height"] < 80  # one compact line

    change.click()  # the form comes back, to join another room
    expect(form).to_be_visible()
    expect(change).to_have_attribute("aria-expanded", "true")
    page.get_by_label("Room", exact=True).fill("other")
    page.get_by_label("Room", exact=True).press("Enter")
    expect(bar).to_have_text(re.compile(r"^#other · you are ada$"))
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    expect(form).to_be_hidden()

    page.get_by_role("button", name="Leave").click()
    expect(page.locator("#status")).to_have_attribute("data-state", "idle")
    expect(form).to_be_visible()
    expect(page.get_by_label("Room", exact=True)).to_be_focused()
    expect(page.get_by_role("button", name="Leave")).to_be_hidden()
    expect(page.get_by_label("Message", exact=True)).to_be_disabled()
    expect(page.locator("#log .system").last).to_have_text(re.compile("You left #other"))

    # and the connection is closed (not left reconnecting)
    deadline = time.monotonic() + 10
    while open_connections(pod) != 0:
        assert time.monotonic() < deadline, "the page's connection was not closed"
        time.sleep(0.05)  # polling interval


def open_connections(pod: Pod) -> int:
    with urllib.request.urlopen(f"{pod.base}/api/chat-api/ws/stats", timeout=10) as resp:
        count: int = orjson.loads(resp.read())["connections"]["open"]
        return count


def test_two_pages_on_two_pods_chat_through_redis(
    pod_factory: PodFactory, shared_redis_url: str, channel_prefix: str, open_page: OpenPage
) -> None:
    env = redis_pod_env(shared_redis_url, channel_prefix)
    pods = [pod_factory(env, name="pod-a"), pod_factory(env, name="pod-b")]
    alice = chat(open_page("alice"), pods[0], "alice", "lobby")
    bob = chat(open_page("bob", PHONE), pods[1], "bob", "lobby")
    expect(alice.locator("#status")).to_have_attribute("title", "connected to pod pod-a")
    expect(bob.locator("#status")).to_have_attribute("title", "connected to pod pod-b")

    say(alice, "from pod a")
    expect(message(bob, "from pod a", own=False).locator(".from")).to_have_text("alice")
    say(bob, "from pod b")
    expect(message(alice, "from pod b", own=False).locator(".from")).to_have_text("bob")
    # Each message is shown once on each page (no echo from Redis).
    for page in (alice, bob):
        expect(page.locator("#log li.msg")).to_have_count(2)


def test_page_reconnects_after_pod_restart_and_keeps_chatting(
    pod: Pod, open_page: OpenPage
) -> None:
    alice_tab = open_page("alice")
    alice_tab.page.clock.install()  # her timers run normally until paused below
    alice = chat(alice_tab, pod, "alice")
    bob = chat(open_page("bob", PHONE), pod, "bob")
    say(alice, "before the restart")
    expect(message(bob, "before the restart")).to_have_count(1)

    assert pod.stop() == 0  # every page gets 1001 going away
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")

    # Typed while the pod is down: queued, shown as waiting, sent after reconnect.
    say(alice, "written while the pod was down")
    waiting = alice.locator("#log li.msg.pending", has_text="written while the pod was down")
    expect(waiting).to_have_attribute("data-status", "queued")

    # Hold Alice's retry timer so that Bob is surely back before her queued
    # message goes out (there is no history yet to fill in what he missed).
    # A moment ahead: the page's clock moves on while this call travels, and
    # pausing in its past fails. A retry firing in that moment meets a pod
    # that is still down and only backs off further.
    alice.clock.pause_at(alice.evaluate("Date.now() / 1000 + 0.5"))  # seconds, in Python
    pod.restart()
    expect(bob.locator("#status")).to_have_attribute("data-state", "live")
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    alice.clock.fast_forward(20_000)  # past the longest backoff
    alice.clock.resume()

    for page in (alice, bob):
        expect(page.locator("#status")).to_have_attribute("data-state", "live")
        expect(page.locator("#log .system", has_text="Reconnected to #general")).to_have_count(1)
    expect(message(bob, "written while the pod was down", own=False)).to_have_count(1)
    expect(message(alice, "written while the pod was down", own=True)).to_have_count(1)
    expect(alice.locator("#log li.msg.pending")).to_have_count(0)

    say(bob, "after the restart")
    expect(message(alice, "after the restart", own=False)).to_have_count(1)


def test_user_strings_are_shown_as_text_and_never_run(pod: Pod, open_page: OpenPage) -> None:
    mallory = chat(open_page("mallory"), pod, XSS)
    viewer = chat(open_page("viewer", PHONE), pod, "viewer")
    say(mallory, XSS)
    shown = message(viewer, XSS, own=False)
    expect(shown.locator(".from")).to_have_text(XSS)
    expect(shown.locator(".text")).to_have_text(XSS)

    # A client other than the page can send any JSON as data, also markup.
    with ws_connect(pod.ws_url("general", name="script"), open_timeout=10) as raw:
        raw.recv(timeout=10)  # welcome
        raw.send(orjson.dumps({"type": "message", "data": {"html": XSS}}).decode())
        raw.recv(timeout=10)
    expect(viewer.locator("#log .text.raw")).to_have_text(orjson.dumps({"html": XSS}).decode())

    # A room name from the address is checked, and shown as text too.
    mallory.goto(f"{pod.base}/#{quote(XSS)}")
    expect(mallory.locator("#notice")).to_contain_text("Room names are")

    for page in (mallory, viewer):
        assert page.locator("#log img").count() == 0
        assert page.evaluate("document.querySelectorAll('img').length") == 0
    # (the fixture checks that no dialog opened on any page)


def test_oversized_message_is_refused_in_words(
    pod_factory: PodFactory, open_page: OpenPage
) -> None:
    pod = pod_factory({"MAX_MESSAGE_BYTES": "300"})
    page = chat(open_page("alice"), pod, "alice")
    say(page, "x" * 400)
    expect(page.locator("#notice")).to_contain_text("too long")
    expect(page.get_by_label("Message", exact=True)).to_have_value("x" * 400)  # kept, not lost
    expect(page.locator("#status")).to_have_attribute("data-state", "live")


def test_page_resumes_after_its_pod_restarts_without_hole_or_duplicate(
    pod_factory: PodFactory, shared_redis_url: str, channel_prefix: str, open_page: OpenPage
) -> None:
    env = redis_pod_env(shared_redis_url, channel_prefix)
    pod_a, pod_b = pod_factory(env, name="pod-a"), pod_factory(env, name="pod-b")
    alice = chat(open_page("alice"), pod_a, "alice", "lobby")
    bob = chat(open_page("bob"), pod_b, "bob", "lobby")
    say(bob, "seen live")
    expect(message(alice, "seen live")).to_have_count(1)

    assert pod_a.stop() == 0
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    for n in range(3):  # sent while Alice's pod is down: she resumes them
        say(bob, f"missed {n}")
        expect(message(bob, f"missed {n}", own=True)).to_have_count(1)
    pod_a.restart()
    expect(alice.locator("#status")).to_have_attribute("data-state", "live")
    for n in range(3):
        expect(message(alice, f"missed {n}", own=False)).to_have_count(1)
    expect(message(alice, "seen live")).to_have_count(1)
    expect(alice.locator("#log li.msg")).to_have_count(4)
    texts = alice.locator("#log li.msg .text").all_inner_texts()
    assert texts == ["seen live", "missed 0", "missed 1", "missed 2"]


def test_who_is_here_and_join_leave_lines(pod: Pod, open_page: OpenPage) -> None:
    ada = chat(open_page("ada"), pod, "ada")
    grace = chat(open_page("grace", PHONE), pod, "grace")
    for page in (ada, grace):
        expect(page.locator("#members")).to_be_visible()
        expect(page.locator("#member-list li")).to_have_count(2)
    expect(ada.locator("#member-count")).to_have_text("(2)")
    expect(ada.locator("#log .system", has_text="grace joined")).to_have_count(1)
    grace.goto("about:blank")  # her socket closes
    expect(ada.locator("#log .system", has_text="grace left")).to_have_count(1)
    expect(ada.locator("#member-list li")).to_have_count(1)
    expect(ada.locator("#member-list li")).to_contain_text("ada")


def test_a_newcomer_sees_the_rooms_recent_messages(pod: Pod, open_page: OpenPage) -> None:
    ada = chat(open_page("ada"), pod, "ada")
    for text in ("first", "second"):
        say(ada, text)
        expect(message(ada, text, own=True)).to_have_count(1)
    grace = chat(open_page("grace", PHONE), pod, "grace")
    expect(
        grace.locator("#log .system", has_text="The last 2 messages before you came")
    ).to_have_count(1)
    expect(grace.locator("#log li.msg .text")).to_have_text(["first", "second"])
    say(grace, "third")
    expect(message(ada, "third", own=False)).to_have_count(1)
    expect(grace.locator("#log li.msg .text")).to_have_text(["first", "second", "third"])


# -- with AUTH_ENABLED=true -------------------------------------------------------

SECRET = "web-page-tests-secret-of-at-least-32-bytes"


def token(sub: str, name: str, ttl: float = 600) -> str:
    claims = {"sub": sub, "name": name, "exp": int(time.time() + ttl)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def auth_pod(pod_factory: PodFactory) -> Pod:
    return pod_factory(
        {"AUTH_ENABLED": "true", "AUTH_JWT_SECRET": SECRET, "AUTH_LEEWAY_SECONDS": "0"}
    )


def test_refused_without_a_good_token_then_live_then_expired(
    auth_pod: Pod, open_page: OpenPage
) -> None:
    page = open_page("ada").page
    page.goto(f"{auth_pod.base}/?name=ada#general")
    status = page.locator("#status")
    notice = page.locator("#notice")
    expect(status).to_have_attribute("data-state", "refused")
    expect(notice).to_contain_text("HTTP 401")
    expect(notice).to_contain_text("Paste an access token")
    token_field = page.get_by_label("Access token (only when the server requires sign-in)")
    expect(token_field).to_be_visible()

    token_field.fill("not-a-token")
    token_field.press("Enter")
    expect(notice).to_contain_text("Check the access token")
    expect(status).to_have_attribute("data-state", "refused")

    # A good token that expires in a few seconds (enough to get live and send
    # one message on a loaded machine): live, then refused as expired.
    ttl = 10
    token_field.fill(token("u-ada", "Ada Lovelace", ttl=ttl))
    token_field.press("Enter")
    expect(status).to_have_attribute("data-state", "live")
    expect(page.locator("#room-title")).to_have_text("#general · you are Ada Lovelace")
    say(page, "signed in")
    expect(message(page, "signed in", own=True).locator(".from")).to_have_text("Ada Lovelace")
    expect(status).to_have_attribute("data-state", "refused", timeout=(ttl + 15) * 1000)
    expect(notice).to_contain_text("access token expired")
    expect(page.locator("#retry-button")).to_be_hidden()  # no retrying with a dead token


def test_token_from_the_address_fragment(auth_pod: Pod, open_page: OpenPage) -> None:
    grace = open_page("grace").page
    grace.goto(f"{auth_pod.base}/#general&token={token('u-grace', 'Grace')}")
    expect(grace.locator("#status")).to_have_attribute("data-state", "live")
    assert grace.evaluate("location.hash") == "#general"  # the token left the address bar

    ada = open_page("ada").page
    ada.goto(f"{auth_pod.base}/?name=ada#general")  # no token: refused
    expect(ada.locator("#status")).to_have_attribute("data-state", "refused")
    ada.goto(f"{auth_pod.base}/#general&token={token('u-ada', 'Ada')}")
    expect(ada.locator("#status")).to_have_attribute("data-state", "live")

    say(grace, "hello Ada")
    expect(message(ada, "hello Ada", own=False).locator(".from")).to_have_text("Grace")


def test_error_frames_are_shown_in_words(pod_factory: PodFactory, open_page: OpenPage) -> None:
    # Two frames at once (the page's presence request and one message), then
    # 1 per 30 s: the second message is refused however slow the machine.
    pod = pod_factory({"RATE_LIMIT_PER_SECOND": "0.033", "RATE_LIMIT_BURST": "2"})
    page = chat(open_page("alice"), pod, "alice")
    say(page, "first")
    expect(message(page, "first", own=True)).to_have_count(1)
    say(page, "second, too soon")
    refused = page.locator("#log li.msg", has_text="second, too soon")
    expect(refused).to_have_attribute("data-status", "failed")
    expect(refused.locator(".note")).to_have_text(
        "Not sent: You are sending messages too fast. Wait a moment, then send again."
    )
    expect(refused.get_by_role("button", name="Send again")).to_be_visible()
    expect(page.locator("#status")).to_have_attribute("data-state", "live")


def test_a_message_the_server_could_not_store_is_marked_and_can_be_sent_again(
    pod_factory: PodFactory, redis_server: RedisServer, channel_prefix: str, open_page: OpenPage
) -> None:
    pod = pod_factory(redis_pod_env(redis_server.url, channel_prefix))
    alice = chat(open_page("alice"), pod, "alice")
    bob = chat(open_page("bob"), pod, "bob")
    sent: list[dict[str, Any]] = []
    alice.on("websocket", lambda ws: ws.on("framesent", lambda f: sent.append(orjson.loads(f))))
    alice.reload()  # the listener sees the page's socket from its start
    expect(alice.locator("#status")).to_have_attribute("data-state", "live")

    redis_server.kill()
    pod.wait_for_log("redis link lost")
    say(alice, "while redis is down")
    # The pod cannot store it: Bob (same pod) gets it, Alice is told it may
    # not reach everyone, once, with a way to send it again.
    expect(message(bob, "while redis is down", own=False)).to_have_count(1)
    unsure = alice.locator("#log li.msg.own", has_text="while redis is down")
    expect(unsure).to_have_count(1)
    expect(unsure).to_have_attribute("data-status", "unconfirmed")
    expect(unsure.locator(".note")).to_have_text(re.compile("could not store it"))

    redis_server.restart()
    pod.wait_for_log("redis link resubscribed")
    unsure.get_by_role("button", name="Send again").click()
    expect(alice.locator("#log li.msg[data-status]")).to_have_count(0)
    expect(message(alice, "while redis is down", own=True)).to_have_count(1)
    # Bob got it unstamped during the outage and stored now: one message,
    # one id (a keyed message's id is the key's), shown once.
    say(alice, "after")
    expect(message(bob, "after", own=False)).to_have_count(1)
    expect(message(bob, "while redis is down", own=False)).to_have_count(1)
    # Both times with one key: had the first been stored after all, the
    # server would have stored it once (tests/test_keys.py).
    keys = [f["key"] for f in sent if f.get("data") == {"text": "while redis is down"}]
    assert len(keys) == 2
    assert keys[0] == keys[1]
    assert len({f["key"] for f in sent if f["type"] == "message"}) == len(
        {str(f["data"]) for f in sent if f["type"] == "message"}
    )  # one key per message


def test_messages_unconfirmed_when_the_pod_dies_are_sent_again_once(
    pod_factory: PodFactory, redis_server: RedisServer, channel_prefix: str, open_page: OpenPage
) -> None:
    """The append script ran and Alice's pod was killed before its reply came:
    her page never got an ack. When the pod is back it reconnects and sends
    the message again, with its key, by itself: stored once, shown once."""
    cutter = ReplyCutter(redis_server.port)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(cutter.start(), loop).result(10)
        alice_pod = pod_factory(redis_pod_env(cutter.url, channel_prefix), name="a")
        bob_pod = pod_factory(redis_pod_env(redis_server.url, channel_prefix), name="b")
        alice = chat(open_page("alice"), alice_pod, "alice")
        bob = chat(open_page("bob"), bob_pod, "bob")
        cutter.arm(APPEND.sha.encode(), hold=True)
        say(alice, "last words")
        expect(message(bob, "last words", own=False)).to_have_count(1)  # it was stored
        alice_pod.kill()
        alice_pod.restart()
        expect(alice.locator("#status")).to_have_attribute("data-state", "live")
        expect(alice.locator("#log li.msg[data-status]")).to_have_count(0)
        # Once: from the room's history (by the lost pod's guest: not "own" on
        # this connection) or as confirmed by the duplicate's ack.
        expect(message(alice, "last words")).to_have_count(1)
        say(alice, "after")
        expect(message(bob, "after", own=False)).to_have_count(1)
        expect(message(bob, "last words", own=False)).to_have_count(1)
    finally:
        asyncio.run_coroutine_threadsafe(cutter.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
