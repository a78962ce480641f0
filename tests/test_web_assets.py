"""The chat page's files: served by a real pod, and free of HTML-injecting calls.

These run without a browser; ``test_web.py`` drives the page in Chromium.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from chat_api.api.routes import WEB_DIR

from .support import DEFAULT_TIMEOUT, Pod


@pytest.mark.parametrize(
    ("path", "content_type", "needle"),
    [
        ("/", "text/html", '<script type="module" src="/static/chat.js">'),
        ("/static/chat.js", "javascript", 'from "./chat-client.js"'),
        ("/static/chat-client.js", "javascript", "export class ChatClient"),
        ("/static/chat.css", "text/css", ".status"),
    ],
)
async def test_page_and_its_files_are_served(
    pod: Pod, session: aiohttp.ClientSession, path: str, content_type: str, needle: str
) -> None:
    async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(pod.base + path) as resp:
        assert resp.status == 200
        assert content_type in resp.headers["Content-Type"]
        assert needle in await resp.text()


@pytest.mark.parametrize("name", ["chat.js", "chat-client.js"])
def test_script_never_parses_strings_as_html(name: str) -> None:
    # User strings go in with textContent; these would parse them as markup or code.
    script = (WEB_DIR / name).read_text()
    code = re.sub(r"//[^\n]*", "", script)  # the header comment names them
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
    ):
        assert sink not in code, f"{name} uses {sink}"


def test_every_input_has_a_label() -> None:
    page = (WEB_DIR / "index.html").read_text()
    ids = re.findall(r"<(?:input|textarea)[^>]*\bid=\"([^\"]+)\"", page)
    assert ids
    for id_ in ids:
        assert f'<label for="{id_}"' in page, f"#{id_} has no <label>"
