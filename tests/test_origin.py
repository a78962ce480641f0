"""ALLOWED_ORIGINS: a foreign page cannot open a WebSocket (cross-site
WebSocket hijacking); the service's own page and non-browser clients can."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from chat_api.origin import OriginPolicy

from .conftest import PodFactory
from .security_support import handshake
from .support import DEFAULT_TIMEOUT, Pod, connect, get_json


async def status_for(session: aiohttp.ClientSession, url: str, origin: str | None) -> int:
    headers = {"Origin": origin} if origin is not None else {}
    try:
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            ws = await session.ws_connect(url, headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


async def stats(session: aiohttp.ClientSession, pod: Pod) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
    return result


async def test_default_allows_own_origin_and_no_origin_only(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    url = pod.ws_url("general")
    assert await status_for(session, url, None) == 101  # curl, scripts, servers
    assert await status_for(session, url, f"http://127.0.0.1:{pod.port}") == 101
    assert await status_for(session, url, f"HTTP://127.0.0.1:{pod.port}/") == 101
    # A page elsewhere opens a socket in the victim's browser: refused.
    assert await status_for(session, url, f"http://localhost:{pod.port}") == 101
    for foreign in (
        "http://evil.example",
        f"http://evil.example:{pod.port}",
        f"http://127.0.0.1:{pod.port + 1}",
        f"http://localhost:{pod.port + 1}",
        f"https://127.0.0.1:{pod.port}.evil.example",
        "null",
        "garbage",
    ):
        assert await status_for(session, url, foreign) == 403, foreign
    s = await stats(session, pod)
    assert s["refused"] == {"403": 7}
    assert s["connections"]["accepted"] == 4
    assert s["rooms"] == {}


async def test_refusal_happens_before_anything_is_joined(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    member, _ = await connect(session, pod.ws_url("general"))
    assert await status_for(session, pod.ws_url("general"), "https://evil.example") == 403
    s = await stats(session, pod)
    assert s["rooms"] == {"general": 1}
    assert s["connections"] == {"open": 1, "accepted": 1}
    await member.close()


@pytest.mark.slow
async def test_allowed_origins_list_and_star(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    listed = pod_factory({"ALLOWED_ORIGINS": "https://chat.example.com, http://app.test:8080"})
    url = listed.ws_url()
    assert await status_for(session, url, "https://chat.example.com") == 101
    assert await status_for(session, url, "https://CHAT.example.com:443") == 101
    assert await status_for(session, url, "http://app.test:8080") == 101
    assert await status_for(session, url, f"http://127.0.0.1:{listed.port}") == 101  # own
    assert await status_for(session, url, "http://chat.example.com") == 403  # scheme
    assert await status_for(session, url, "https://chat.example.com:8443") == 403  # port
    assert await status_for(session, url, "https://evil.example") == 403

    anyone = pod_factory({"ALLOWED_ORIGINS": "*"})
    assert await status_for(session, anyone.ws_url(), "https://evil.example") == 101


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # not a browser
        ("https://chat.example.com", True),  # PUBLIC_URL
        ("https://chat.example.com:443", True),
        ("https://CHAT.example.com/", True),
        ("http://chat.example.com", False),  # another scheme
        ("https://chat.example.com:8443", False),  # another port
        ("http://127.0.0.1:8000", True),  # the page the pod serves itself
        ("http://localhost:8000", True),
        ("http://[::1]:8000", True),
        ("http://10.1.2.3:8000", True),  # HOST
        ("http://127.0.0.1:8001", False),
        ("https://evil.example", False),
        ("https://chat.example.com.evil.example", False),
        ("null", False),
        ("file://", False),
        ("https://chat.example.com/path", False),
        ("https://chat.example.com:99999", False),
    ],
)
def test_own_origins_come_from_the_configuration(origin: str | None, allowed: bool) -> None:
    policy = OriginPolicy(public_url="https://chat.example.com/app", host="10.1.2.3", port=8000)
    assert policy.allows(origin) is allowed


def test_without_a_known_port_any_port_on_localhost_is_own() -> None:
    policy = OriginPolicy(host="0.0.0.0")
    assert policy.allows("http://localhost:1234")
    assert policy.allows("http://127.0.0.1:8001")
    assert not policy.allows("http://0.0.0.0:8000")  # not an address a page comes from
    assert not policy.allows("https://chat.example.com")
    policy.serving_at(8000)
    assert not policy.allows("http://localhost:1234")


async def test_a_foreign_origin_with_a_matching_host_header_is_refused(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    # What a browser sends from http://evil.example:PORT/ once evil.example
    # resolves to 127.0.0.1: Origin and Host agree, and neither is the pod's.
    host = f"evil.example:{pod.port}"
    status, _, _ = await handshake(
        session, pod.ws_url("general"), {"Origin": f"http://{host}", "Host": host}
    )
    assert status == 403
    # The pod's own origin still works.
    own = f"127.0.0.1:{pod.port}"
    status, _, _ = await handshake(
        session, pod.ws_url("general"), {"Origin": f"http://{own}", "Host": own}
    )
    assert status == 101
