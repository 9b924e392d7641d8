"""The trajectory inspector: per-step latents of each branch, the "where guidance acted" map, the
per-step plot; then the real page in Debian's Chromium (one server for the module: the embedded
model if it is there, else the tests' tiny random model), and per-session isolation.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from modules import processing
from webui import inspector

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "models" / "Stable-diffusion" / "tiny-shapes"
from tests.browser import image_pixels, require_browser, set_number
from tests.browser import open_page as _open_page


def run(model, **kw):
    rec = inspector.TrajectoryRecorder(kw.get("n_iter", 1))
    p = processing.StableDiffusionProcessingTxt2Img(**{
        "prompt": "a red circle", "negative_prompt": "blue square", "steps": 4, "width": 64, "height": 64,
        "seed": 3, "do_not_save_samples": True, **kw})
    processing.process_images(model, p, hooks=[rec])
    return rec.records()


# ---- without a browser -----------------------------------------------------------------------

def test_recorder_keeps_each_step_of_each_branch_with_its_stats(tiny_model):
    records = run(tiny_model, batch_size=2, n_iter=2)
    assert [(r.batch_no, r.step) for r in records] == [(b, s) for b in (1, 2) for s in range(1, 5)]
    r = records[1]
    assert r.on_cpu and r.combined.device.type == "cpu" and r.combined.shape == (2, 4, 8, 8)
    assert r.prompt is not None and r.negative is not None
    assert not torch.equal(r.prompt, r.negative)
    assert len(r.stats["guidance"]) == 2 and all(v > 0 for v in r.stats["guidance"])
    perp = run(tiny_model, guidance="Perp-Neg")
    assert {"guidance", "parallel_removed", "negative_applied"} <= set(perp[0].stats)


def test_render_step_gives_four_labelled_views_and_a_heat_map_that_shows_guidance(tiny_model):
    records = run(tiny_model, batch_size=2)
    views, facts = inspector.render_step(tiny_model, records[1], "cheap", (64, 64))
    assert set(views) == set(inspector.VIEWS) == {"prompt", "negative", "combined", "heatmap"}
    assert {im.size for im in views.values()} == {(320, 160)}  # two 64x64 images side by side, shown at 160
    assert facts["heat_peak"] > 0 and facts["negative_computed"]
    heat = np.asarray(views["heatmap"], dtype=np.float32)
    assert heat.std() > 1.0  # not blank
    assert not np.array_equal(np.asarray(views["prompt"]), np.asarray(views["negative"]))
    full, _ = inspector.render_step(tiny_model, records[1], "full", (64, 64))
    assert full["combined"].size == (320, 160)
    # at CFG scale 1 guidance does nothing: no negative pass, an all-zero difference
    plain = run(tiny_model, cfg_scale=1.0)
    views, facts = inspector.render_step(tiny_model, plain[0], "cheap", (64, 64))
    assert facts["heat_peak"] == 0 and not facts["negative_computed"]
    assert plain[0].stats["guidance"] == [0.0]


def test_heat_map_is_the_rgb_mean_of_the_difference():
    combined = torch.zeros(1, 3, 2, 2)
    prompt = torch.zeros(1, 3, 2, 2)
    prompt[0, :, 0, 1] = torch.tensor([0.3, 0.6, 0.0])
    heat, peak = inspector.guidance_heatmap(combined, prompt)
    assert peak == pytest.approx(0.3)
    assert heat[0].tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_guidance_plot_is_an_image_with_one_line_per_statistic(tiny_model):
    records = run(tiny_model, guidance="Perp-Neg", steps=5)
    assert inspector.stat_series(records, 1).keys() == {"guidance", "parallel_removed", "negative_applied"}
    plot = inspector.guidance_plot(records, records[2])
    assert plot.size[0] >= 400 and np.asarray(plot).std() > 10
    assert inspector.guidance_plot([]) is None


def test_recorder_drops_the_oldest_batches_past_its_memory_cap(tiny_model):
    rec = inspector.TrajectoryRecorder(3, max_bytes=4 * (2 * 4 * 8 * 8 * 3))  # about 4 steps of float16 latents
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a", negative_prompt="b", steps=3, width=64, height=64,
                                                    seed=1, n_iter=3, do_not_save_samples=True)
    processing.process_images(tiny_model, p, hooks=[rec])
    records = rec.records()
    assert {r.batch_no for r in records} == {3} and rec.dropped == 6


# ---- in a browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    from tests.server import start_server
    from tests.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("inspector")
    model = EMBEDDED if (EMBEDDED / "model_index.json").is_file() else build_tiny_sd(root / "models" / "tiny-sd")
    srv = start_server(model, "--outdir-samples", str(root / "outputs"))
    yield srv
    srv.stop()


def open_page(browser, server):
    return _open_page(browser, server, height=1100, timeout_ms=90_000)


def generate(page, prompt: str, negative: str, steps: int, seed: int) -> None:
    page.fill("#txt2img_prompt textarea", prompt)
    page.fill("#txt2img_neg_prompt textarea", negative)
    set_number(page, "txt2img_steps", steps)
    page.fill("#txt2img_seed input", str(seed))
    page.click("#txt2img_generate")
    page.wait_for_function("/^Done/.test(document.querySelector('#txt2img_progress').innerText)")


def inspector_text(page) -> str:
    return page.inner_text("#txt2img_inspector_info .sdneg-inspector-info")


def wait_info(page, pattern: str) -> str:
    page.wait_for_function(
        "p => new RegExp(p).test(document.querySelector('#txt2img_inspector_info .sdneg-inspector-info')?.innerText"
        " || '')", arg=pattern)
    return inspector_text(page)


def view_src(page, name: str) -> str | None:
    img = page.locator(f"#txt2img_inspector_{name} img")
    return img.first.get_attribute("src") if img.count() else None


def all_views(page) -> dict[str, np.ndarray]:
    return {name: image_pixels(page, f"#txt2img_inspector_{name} img") for name in inspector.VIEWS}


def test_inspector_shows_four_views_that_follow_the_slider(browser, server):
    page = open_page(browser, server)
    assert "No job yet" in inspector_text(page)
    generate(page, "a circle on a white background", "red", steps=6, seed=42)
    wait_info(page, r"^Step 6/6")
    for name in inspector.VIEWS:  # labelled
        assert inspector.VIEW_LABELS[name] in page.inner_text(f"#txt2img_inspector_{name}")
    page.locator("#txt2img_inspector_plot").scroll_into_view_if_needed()  # its image loads lazily, when in view
    page.wait_for_selector("#txt2img_inspector_plot img")
    last = all_views(page)
    assert not np.array_equal(last["prompt"], last["negative"])  # the two branches predicted different images
    assert last["heatmap"].std() > 1.0  # guidance acted somewhere: the map is not blank
    assert re.search(r"guidance acted: \|e - e_prompt\| = [\d.e+-]+", inspector_text(page))

    before = {name: view_src(page, name) for name in inspector.VIEWS}
    set_number(page, "txt2img_inspector_step", 2)
    wait_info(page, r"^Step 2/6")
    page.wait_for_function("s => document.querySelector('#txt2img_inspector_combined img')?.src !== s",
                           arg=before["combined"])
    second = all_views(page)
    for name in ("prompt", "negative", "combined"):  # an earlier step: other predictions
        assert not np.array_equal(second[name], last[name]), name
    assert not np.array_equal(second["prompt"], second["negative"])
    assert second["heatmap"].std() > 1.0
    page.context.close()


def test_a_user_never_sees_another_users_trajectory(browser, server):
    a, b = open_page(browser, server), open_page(browser, server)
    generate(a, "a square on a black background", "blue", steps=5, seed=7)
    wait_info(a, r"^Step 5/5")
    # b has no job: moving its slider shows nothing of a's
    set_number(b, "txt2img_inspector_step", 2)
    b.wait_for_timeout(1500)
    assert "No job yet" in inspector_text(b)
    assert all(view_src(b, name) is None for name in inspector.VIEWS)
    # b's own job: b sees its 3 steps, a still sees its 5
    generate(b, "a triangle", "green", steps=3, seed=8)
    wait_info(b, r"^Step 3/3")
    set_number(a, "txt2img_inspector_step", 4)
    wait_info(a, r"^Step 4/5")
    set_number(b, "txt2img_inspector_step", 2)
    wait_info(b, r"^Step 2/3")
    assert b.input_value("#txt2img_inspector_step input[type=number]") == "2"
    assert a.get_attribute("#txt2img_inspector_step input[type=number]", "max") == "5"
    assert b.get_attribute("#txt2img_inspector_step input[type=number]", "max") == "3"
    a.context.close()
    b.context.close()


def test_compare_button_reruns_the_result_without_the_negative_or_with_another_rule(browser, server):
    page = open_page(browser, server)
    page.click("#txt2img_compare")  # no result yet: says so
    page.wait_for_function("document.querySelector('#txt2img_compare_info').innerText.includes('Nothing to compare')")
    generate(page, "a circle on a white background", "red", steps=4, seed=5)
    page.click("#txt2img_compare")
    page.wait_for_function("document.querySelector('#txt2img_compare_info').innerText.includes('Mean difference')")
    captions = page.locator("#txt2img_compare_gallery .thumbnail-item .caption-label").all_inner_texts()
    assert captions[:2] == ["seed 5: as generated", "seed 5: without negative prompt"], captions
    assert captions[2].startswith("difference") and len(captions) == 3
    mean = float(re.search(r"Mean difference ([\d.]+)/255", page.inner_text("#txt2img_compare_info")).group(1))
    assert mean > 0  # the negative prompt changed the image

    page.locator("#txt2img_compare_mode input").click()
    page.get_by_role("option", name="Perp-Neg", exact=True).click()
    page.click("#txt2img_compare")
    page.wait_for_function("document.querySelector('#txt2img_compare_gallery').innerText.includes('guidance Perp-Neg')")
    page.context.close()
