"""Headless Chromium for the browser tests (``test_web.py``, ``test_web_client.py``).

``launch_browser`` is the body of a module's ``browser`` fixture (one Debian
Chromium, driven by Playwright); ``page_opener`` the body of its
``open_page`` fixture, which opens pages in contexts of their own and, afterwards, saves a
screenshot of each under ``test-artifacts/web/`` and checks that none raised
a dialog or a script error. Without ``/usr/bin/chromium`` (``make test``
installs it when it can) the tests skip, loudly, on a developer's machine;
they fail when a browser is required (``browser_required``: CI, and
``.ci/run``, which sets ``CHAT_API_REQUIRE_BROWSER=1``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright

__all__ = [
    "DESKTOP",
    "PHONE",
    "OpenPage",
    "Tab",
    "browser_required",
    "launch_browser",
    "page_opener",
]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1000, "height": 640}
PHONE = {"width": 390, "height": 760}
expect.set_options(timeout=15_000)


def browser_required() -> bool:
    """The Makefile's rule: a browser is required when ``CI`` is set (to
    anything but ``0`` or ``false``) or ``CHAT_API_REQUIRE_BROWSER=1``."""
    return os.environ.get("CHAT_API_REQUIRE_BROWSER") == "1" or os.environ.get("CI", "") not in (
        "",
        "0",
        "false",
    )


def launch_browser() -> Iterator[Browser]:
    """One headless Chromium (a module-scoped fixture's body), or a skip."""
    if not os.access(CHROMIUM, os.X_OK):
        reason = (
            f"BROWSER TESTS NOT RUN: {CHROMIUM} is missing. Install Debian's chromium "
            "package (`make test` does so when it runs as root with apt-get)."
        )
        if browser_required():
            pytest.fail(f"{reason} A browser is required here (CI or CHAT_API_REQUIRE_BROWSER=1).")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Tab:
    """A page in its own browser context, with what it did that it should not."""

    label: str
    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


OpenPage = Callable[..., Tab]


def page_opener(browser: Browser, request: pytest.FixtureRequest) -> Iterator[OpenPage]:
    """An ``open_page`` fixture's body: open pages (each its own context, so
    its own storage); afterwards save a screenshot of each and check that
    none raised a dialog or a script error."""
    tabs: list[Tab] = []

    def open_(label: str, viewport: dict[str, int] = DESKTOP) -> Tab:
        context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
        tab = Tab(label, context.new_page())

        def on_dialog(dialog: Dialog) -> None:
            tab.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        tab.page.on("dialog", on_dialog)
        tab.page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
        tabs.append(tab)
        return tab

    yield open_
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for tab in tabs:
        tab.page.screenshot(path=ARTIFACTS / f"{request.node.name}-{tab.label}.png")
        tab.page.context.close()
    for tab in tabs:
        assert tab.dialogs == [], f"{tab.label}: a dialog opened: {tab.dialogs}"
        assert tab.errors == [], f"{tab.label}: script errors: {tab.errors}"
