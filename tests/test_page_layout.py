"""The page as a newcomer first sees it, on the embedded 64-pixel model, in Debian's Chromium.

Each test is one defect a first look found: a result cut off by its box, a layout that runs
off the right edge at 800 px, an interrupt that reported step 0, an inspector lagging the
running job, a traceback in the log for a user's mistake, token counters counting the raw
text instead of what is encoded.
"""
from __future__ import annotations

import re
import time

import pytest

from tests.browser import open_page, require_browser, set_number

EMBEDDED = "models/Stable-diffusion/tiny-shapes"

OUTSIDE_VIEWPORT = """() => {
    const width = document.documentElement.clientWidth, out = [];
    for (const el of document.querySelectorAll('#tab_txt2img *')) {
        const r = el.getBoundingClientRect();
        if (r.width > 0 && r.height > 0 && (r.right > width + 1 || r.left < -1)) out.push(`${el.tagName}#${el.id}.${el.className} ${Math.round(r.left)}..${Math.round(r.right)}`);
    }
    return out;
}"""

RESULT_BOXES = """() => {
    const gallery = document.querySelector('#txt2img_gallery').getBoundingClientRect();
    return [...document.querySelectorAll('#txt2img_gallery img')].map(img => {
        const r = img.getBoundingClientRect(), fit = getComputedStyle(img).objectFit;
        // the part of the box the picture fills (object-fit: contain keeps its aspect ratio inside the box)
        const scale = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
        return {fit, inside: r.top >= gallery.top - 1 && r.bottom <= gallery.bottom + 1 && r.left >= gallery.left - 1
                && r.right <= gallery.right + 1, drawn: [img.naturalWidth * scale, img.naturalHeight * scale],
                natural: [img.naturalWidth, img.naturalHeight]};
    });
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    from tests.server import start_server

    root = tmp_path_factory.mktemp("layout")
    srv = start_server(EMBEDDED, "--outdir-samples", str(root / "outputs"))
    srv.shots = root / "screenshots"
    srv.shots.mkdir()
    yield srv
    srv.stop()


def progress(page) -> str:
    return page.inner_text("#txt2img_progress .sdneg-progress-text")


def run_job(page, prompt="a red circle on a white background", steps=6, width=64, height=64, negative=""):
    page.fill("#txt2img_prompt textarea", prompt)
    page.fill("#txt2img_neg_prompt textarea", negative)
    set_number(page, "txt2img_steps", steps)
    set_number(page, "txt2img_width", width)
    set_number(page, "txt2img_height", height)
    page.click("#txt2img_generate")
    page.wait_for_function("/^(Done|Interrupted)/.test(document.querySelector('#txt2img_progress').innerText)",
                           timeout=120_000)
    page.locator("#txt2img_gallery").scroll_into_view_if_needed()  # its images load lazily, when in view
    page.wait_for_function("document.querySelectorAll('#txt2img_gallery img').length > 0 && "
                           "[...document.querySelectorAll('#txt2img_gallery img')].every(i => i.complete && i.naturalWidth)")


def test_the_result_is_shown_whole_at_any_aspect_ratio(browser, server):
    page = open_page(browser, server)
    for width, height in [(64, 64), (64, 128), (128, 64)]:  # one page, one job each
        run_job(page, width=width, height=height)
        page.wait_for_function("([w, h]) => { const img = document.querySelector('#txt2img_gallery img'); "
                               "return img?.naturalWidth === w && img.naturalHeight === h; }", arg=[width, height])
        (box,) = page.evaluate(RESULT_BOXES)
        assert box["natural"] == [width, height]
        assert box["fit"] == "contain" and box["inside"], (width, height, box)
        drawn_w, drawn_h = box["drawn"]
        assert drawn_w == pytest.approx(drawn_h * width / height, rel=0.02), (width, height)  # not stretched
        assert drawn_w >= 128 or drawn_h >= 128, (width, height)  # and large enough to see
    page.context.close()


def test_the_layout_holds_at_every_width(browser, server):
    """One job at 800 px, then the same page at 1280 and 1920: the layout reflows without another job."""
    context = browser.new_context(viewport={"width": 800, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url + "/")
    page.wait_for_selector("#txt2img_prompt textarea")
    page.click("#txt2img_negative_guidance")  # open the accordion: its controls must fit too
    run_job(page, negative="red", steps=8)
    page.wait_for_function("document.querySelector('#txt2img_inspector_info').innerText.startsWith('Step 8/8')")
    for viewport in (800, 1280, 1920):
        page.set_viewport_size({"width": viewport, "height": 900})
        page.wait_for_function("w => document.documentElement.clientWidth <= w", arg=viewport)
        time.sleep(0.5)
        page.screenshot(path=str(server.shots / f"txt2img-{viewport}.png"), full_page=True)
        print(f"screenshot: {server.shots / f'txt2img-{viewport}.png'}")
        assert page.evaluate(OUTSIDE_VIEWPORT) == [], viewport
        (box,) = page.evaluate(RESULT_BOXES)
        assert box["inside"], viewport
    context.close()


def test_interrupt_reports_the_step_reached(browser, server):
    page = open_page(browser, server)
    page.fill("#txt2img_prompt textarea", "a long job")
    set_number(page, "txt2img_steps", 150)
    set_number(page, "txt2img_batch_size", 8)
    page.click("#txt2img_generate")
    page.wait_for_function("document.querySelectorAll('#txt2img_preview_gallery .thumbnail-item').length >= 5")
    page.click("#txt2img_interrupt")
    page.wait_for_function("/^Interrupted/.test(document.querySelector('#txt2img_progress').innerText)")
    step = int(re.match(r"Interrupted at step (\d+)/150", progress(page)).group(1))
    captions = page.locator("#txt2img_preview_gallery .thumbnail-item .caption-label").all_inner_texts()
    assert step >= 5 and captions[-1] == f"Step {step}/150"
    page.context.close()


def test_the_inspector_follows_the_running_job_within_a_second(browser, server):
    page = open_page(browser, server)
    page.fill("#txt2img_prompt textarea", "a long job")
    page.fill("#txt2img_neg_prompt textarea", "red")
    set_number(page, "txt2img_steps", 150)
    set_number(page, "txt2img_batch_size", 8)
    set_number(page, "txt2img_batch_count", 20)
    page.click("#txt2img_generate")
    page.wait_for_function("/job running/.test(document.querySelector('#txt2img_inspector_info').innerText)")
    lags = []
    for _ in range(4):
        time.sleep(1.5)
        for _ in range(40):  # the caption and the slider are two components: allow them one update apart
            shown = page.evaluate("""() => [document.querySelector('#txt2img_inspector_info').innerText,
                                            +document.querySelector('#txt2img_inspector_step input[type=number]').value,
                                            document.querySelector('#txt2img_progress').innerText]""")
            info_step = int(re.search(r"Step (\d+)/150", shown[0]).group(1))
            if info_step == shown[1]:
                break
            time.sleep(0.05)
        running_step = int(re.search(r"Step (\d+)/150", shown[2]).group(1))
        assert info_step == shown[1], shown  # the caption and the slider show the same step
        lags.append(running_step - info_step)
    page.click("#txt2img_interrupt")
    page.wait_for_function("/^Interrupted/.test(document.querySelector('#txt2img_progress').innerText)")
    # the job is over: the inspector shows its last step, no longer running
    page.wait_for_function("/^Step \\d+\\/150(?!.*job running)/s.test(document.querySelector('#txt2img_inspector_info').innerText)")
    # a step of this job takes ~0.1-0.5 s here: within a second the inspector is a few steps behind at most
    assert max(lags) <= 10, lags
    page.context.close()


def test_a_users_mistake_is_one_line_in_the_server_log(browser, server):
    page = open_page(browser, server)
    before = server.output()
    page.fill("#txt2img_prompt textarea", "a circle")
    set_number(page, "txt2img_width", 100)
    page.click("#txt2img_generate")
    page.wait_for_function("/multiple of 8/.test(document.querySelector('#txt2img_progress').innerText)")
    time.sleep(0.5)
    new = server.output()[len(before):]
    assert "Traceback" not in new
    assert len([line for line in new.splitlines() if "multiple of 8" in line]) == 1, new
    page.context.close()


COUNTED = [
    ("txt2img_neg_prompt", "[:ugly:0.3]", "1/75"),  # at most one token is encoded at any step
    ("txt2img_prompt", "[red|blue|green|yellow]", "1/75"),  # one option per step
    ("txt2img_prompt", "a red circle AND a blue square on a white background", "7/75"),  # the longest AND part
    ("txt2img_prompt", "red BREAK blue", "76/150"),  # a chunk ended by BREAK counts whole, as AUTOMATIC1111
]


def test_token_counters_count_what_is_encoded(browser, server):
    page = open_page(browser, server)
    for box, text, expected in COUNTED:
        page.fill(f"#{box} textarea", text)
        counter = "txt2img_negative_token_counter" if box == "txt2img_neg_prompt" else "txt2img_token_counter"
        try:
            page.wait_for_function("([id, want]) => document.querySelector('#' + id).innerText.trim() === want",
                                   arg=[counter, expected], timeout=10_000)
        except Exception as e:
            shown = page.inner_text(f"#{counter}")
            raise AssertionError(f"{text!r} in {box}: the counter shows {shown!r}, not {expected!r}") from e
    page.context.close()
