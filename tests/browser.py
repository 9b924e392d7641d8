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


_LOADED_IMAGE_AS_PNG = """sel => {
    const img = document.querySelector(sel);
    if (!img || !img.complete || !img.naturalWidth) return null;
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    canvas.getContext('2d').drawImage(img, 0, 0);
    return canvas.toDataURL('image/png');
}"""


def image_pixels(page, selector: str):
    """The pixels of the image the browser shows at `selector`, once it has loaded.

    Read back through a canvas rather than fetched again by URL: an image that Gradio replaces
    while a job streams its updates can change between reading `src` and fetching it.
    """
    import base64
    import io

    import numpy as np
    from PIL import Image

    data_url = page.wait_for_function(_LOADED_IMAGE_AS_PNG, arg=selector).json_value()
    png = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
