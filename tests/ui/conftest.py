"""Headless Chromium for the browser tests, and pages that are never let off the machine."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route, WebSocket, sync_playwright

# Debian's Chromium (.ci/run installs it): Playwright's own browser download is not possible
# here, and these flags keep it from reaching for the network or a GPU.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page whose every request is watched: one for another machine is refused, and the test
    fails at its end naming it (ragapi's pages and the UI must work offline)."""
    outside: list[str] = []

    def guard(route: Route) -> None:
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    def watch_socket(socket: WebSocket) -> None:
        if urlsplit(socket.url).hostname not in LOCAL_HOSTS:
            outside.append(socket.url)

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.route("**/*", guard)
    opened = context.new_page()
    opened.on("websocket", watch_socket)
    opened.set_default_timeout(30_000)
    yield opened
    context.close()
    assert not outside, f"requests that would have left the machine: {outside}"
