"""The one way tests start a real browser: Debian's chromium through Playwright.

Test tooling, not product code, like tests/bentoml_server.py. `playwright install` would download a
browser of its own, which fails offline, so the tests drive the one `apt-get install chromium` gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium keeps calling home, which floods a closed network.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def launched_chromium() -> Iterator:
    """A headless Playwright ``Browser`` on Debian's chromium, closed on the way out."""
    if not CHROMIUM.exists():
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def playground_page(browser, server_url: str, timeout_ms: int) -> Iterator:
    """A fresh page on ``server_url``'s playground, which must ask for nothing but that server and whose
    script must not fail: both are checked on the way out."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    foreign, script_errors = [], []
    own = (server_url, f"blob:{server_url}/")  # blob: the page's own object URLs (thumbnails of chosen files)
    page.on("request", lambda request: None if request.url.startswith(own) else foreign.append(request.url))
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.goto(f"{server_url}/")  # the root leads to the playground
    try:
        yield page
    finally:
        context.close()
    assert not foreign, f"the page asked for something outside the server: {foreign}"
    assert not script_errors, f"the page's script failed: {script_errors}"
