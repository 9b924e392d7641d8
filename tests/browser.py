"""Driving the real page in Debian's Chromium through Playwright: shared by the browser tests."""
from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def require_browser() -> None:
    """Skip the calling test (or fixture) when Debian's Chromium or Playwright is missing."""
    import pytest

    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")


def open_page(browser, server, height: int = 1000, timeout_ms: int = 60_000):
    """A fresh browser context (its own Gradio session) on the txt2img page, loaded."""
    context = browser.new_context(viewport={"width": 1400, "height": height})
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    page.goto(server.url + "/")
    page.wait_for_selector("#txt2img_prompt textarea")
    return page


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
