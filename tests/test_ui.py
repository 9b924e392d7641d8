"""The txt2img page: its pieces without a browser, then the real page in Debian's Chromium
(Playwright) against the real server (`python app.py`) on loopback, with a tiny random model.

One server and one browser for the module; each test opens its own browser context(s), so
each is a separate Gradio session, as two people would be.
"""
from __future__ import annotations

import re
import shutil
import time

import pytest

from modules.errors import UserError
from modules.job_state import JobState

from tests.browser import open_page, require_browser, set_number


# ---- without a browser -----------------------------------------------------------------------

def test_interrupt_reaches_only_the_sessions_own_job(tmp_path, monkeypatch):
    from webui import ui_common
    from webui.ui_common import SessionJobs

    monkeypatch.setattr(ui_common, "CLEANUP_DELAY", 0.0)

    jobs = SessionJobs()
    a, b = JobState(), JobState()
    assert jobs.start("a", a, tmp_path / "a")
    assert jobs.start("b", b, tmp_path / "b")
    assert not jobs.start("a", JobState(), tmp_path / "a2")  # one job per session at a time
    assert jobs.interrupt("b") and b.interrupted and not a.interrupted
    assert not jobs.interrupt("c")
    jobs.finish("a", a)
    assert not jobs.interrupt("a") and not a.interrupted
    (tmp_path / "b").mkdir()
    jobs.close("b")  # the tab went away: its job stops, its files go
    deadline = time.monotonic() + 10
    while (tmp_path / "b").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (tmp_path / "b").exists()


def test_progress_text_has_step_count_and_time_left():
    from webui.ui_common import job_progress_text

    state = JobState()
    assert job_progress_text(state, time.time())[0].startswith("Waiting in the queue")
    state.begin("txt2img", 2)
    state.time_start -= 2.0
    state.sampling_step, state.sampling_steps = 5, 10
    text, fraction = job_progress_text(state, time.time())
    assert fraction == pytest.approx(0.25)
    assert re.fullmatch(r"Step 5/10 · batch 1/2 · 25% · \d+\.\d s left", text), text

    hires = JobState()  # the hires fix: each pass counts in the job state, the line names the pass and counts batches
    hires.begin("txt2img", 2)
    hires.sampling_step, hires.sampling_steps = 3, 10
    assert job_progress_text(hires, time.time(), passes=2)[0].startswith("First pass · Step 3/10 · 15%")
    hires.next_batch()
    hires.textinfo = "Hires fix"
    assert job_progress_text(hires, time.time(), passes=2)[0].startswith("Hires fix · Step 0/10 · 50%")


def test_send_to_inpaint_fills_the_editor_and_the_controls(tiny_model, tmp_path):
    """What "Send to inpaint" changes (PNG Info's and the result's): tab, sub-tab, editor, controls, size."""
    from PIL import Image

    from modules import cmd_args, images
    from webui.context import WebUIContext
    from webui.ui import create_ui
    from webui.ui_img2img import send_updates

    ctx = WebUIContext(cmd_args.parse_args(["--precision", "full",
                                            "--ckpt", str(tiny_model.path), "--outdir-samples", str(tmp_path / "o"),
                                            "--ui-settings-file", str(tmp_path / "config.json")]), tiny_model)
    demo = create_ui(ctx)
    tabs, img2img = demo.sdneg_tabs["txt2img"], demo.sdneg_tabs["img2img"]
    picture = tmp_path / "p.png"
    text = ("a red square\nNegative prompt: blue\nSteps: 9, Sampler: Euler a, CFG scale: 6, Seed: 5, Size: 64x64, "
            "Denoising strength: 0.4, Masked content: latent noise, Inpaint area: Only masked")
    images.write_png(picture, Image.new("RGB", (96, 64), "white"), text)
    root_tabs = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "tabs")
    updates = send_updates(str(picture), text, "inpaint", root_tabs, demo.sdneg_tabs)
    f = img2img.fields
    assert updates[f["init_img_with_mask"]]["background"] == str(picture)
    assert updates[f["img2img_mode"]] == "inpaint" and updates[f["seed"]] == 5 and updates[f["steps"]] == 9
    assert updates[f["prompt"]] == "a red square" and updates[f["negative_prompt"]] == "blue"
    assert updates[f["sampler_name"]] == "Euler a" and updates[f["denoising_strength"]] == 0.4
    assert updates[f["inpainting_fill"]] == "latent noise" and updates[f["inpaint_full_res"]] == "Only masked"
    assert (updates[f["width"]], updates[f["height"]]) == (96, 64)  # the picture's own size
    assert tabs.fields["prompt"] not in updates


# ---- in a browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    from tests.server import start_server
    from tests.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("ui")
    model = build_tiny_sd(root / "models" / "tiny-sd")
    make_extras(root)
    srv = start_server(model, "--api", "--outdir-samples", str(root / "outputs"),  # the API: page = API tests
                       "--styles-file", str(root / "styles.csv"), "--embeddings-dir", str(root / "embeddings"),
                       "--lora-dir", str(root / "Lora"))
    srv.outdir, srv.root = root / "outputs", root
    yield srv
    srv.stop()




def make_extras(root):
    """A styles file, embeddings (one fits the tiny model and has a preview beside it, one does not fit), a LoRA."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from modules import textual_inversion as ti

    (root / "styles.csv").write_text('name,prompt,negative_prompt\nShiny,"{prompt}, shiny","tinyneg, dull"\n')
    (root / "embeddings").mkdir()
    ti.save_embedding(ti.Embedding("tinyneg", torch.randn(2, 32, generator=torch.Generator().manual_seed(0))),
                      root / "embeddings" / "tinyneg.safetensors")
    Image.new("RGB", (300, 200), (200, 30, 30)).save(root / "embeddings" / "tinyneg.preview.png")
    ti.save_embedding(ti.Embedding("wide", torch.zeros(1, 768)), root / "embeddings" / "wide.safetensors")
    (root / "Lora").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}, str(root / "Lora" / "detail.safetensors"))


def fill_job(page, prompt: str, negative: str = "", steps: int = 6, batch_size: int = 1, batch_count: int = 1,
             seed: int = -1) -> None:
    page.fill("#txt2img_prompt textarea", prompt)
    page.fill("#txt2img_neg_prompt textarea", negative)
    set_number(page, "txt2img_steps", steps)
    set_number(page, "txt2img_batch_size", batch_size)
    set_number(page, "txt2img_batch_count", batch_count)
    page.fill("#txt2img_seed input", str(seed))


def progress_text(page) -> str:
    return page.inner_text("#txt2img_progress .sdneg-progress-text")


def wait_progress(page, pattern: str, timeout: float = 90_000) -> str:
    page.wait_for_function(
        "p => new RegExp(p).test(document.querySelector('#txt2img_progress .sdneg-progress-text')?.innerText || '')",
        arg=pattern, timeout=timeout)
    return progress_text(page)


def captions(page, gallery: str = "txt2img_preview_gallery") -> list[str]:
    return page.locator(f"#{gallery} .thumbnail-item .caption-label").all_inner_texts()


def result_count(page) -> int:
    return page.locator("#txt2img_gallery .thumbnail-item").count()


def test_generate_streams_one_preview_per_step_then_the_result(browser, server):
    page = open_page(browser, server)
    assert page.input_value("#txt2img_width input[type=number]") == "64"  # the model's own size
    fill_job(page, "a red circle", "blue square", steps=8, seed=-1)
    page.wait_for_function("document.querySelector('#txt2img_negative_token_counter').innerText.includes('/75')")
    page.click("#txt2img_generate")
    # (that the gallery grows while a job runs is checked mid-job in the interrupt test)
    page.wait_for_function("document.querySelectorAll('#txt2img_preview_gallery .thumbnail-item').length >= 1")
    done = wait_progress(page, "^Done")
    assert "8 steps" in done
    assert captions(page) == [f"Step {i}/8" for i in range(1, 9)]
    assert result_count(page) == 1
    info = page.inner_text("#html_info_txt2img")
    assert "a red circle" in info and "Negative prompt: blue square" in info
    seed = re.search(r"Seed: (\d+)", info).group(1)
    page.click("#txt2img_reuse_seed")
    page.wait_for_function("v => document.querySelector('#txt2img_seed input').value === v", arg=seed)
    page.click("#txt2img_random_seed")
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '-1'")
    page.wait_for_selector("#txt2img_trajectory_download", state="visible")
    with page.expect_download() as download:
        page.click("#txt2img_trajectory_download")
    path = download.value.path()
    from PIL import Image

    with Image.open(path) as gif:  # one frame per step (Pillow merges identical neighbours, adding their times)
        assert gif.format == "GIF" and gif.is_animated
        total = 0
        for i in range(gif.n_frames):
            gif.seek(i)
            total += gif.info["duration"]
        assert total == 7 * 120 + 1500
    assert page.inner_text("#txt2img_token_counter").strip() == "3/75"
    page.context.close()


def test_bad_size_shows_a_readable_error_and_the_server_keeps_serving(browser, server):
    page = open_page(browser, server)
    fill_job(page, "a circle", steps=2)
    set_number(page, "txt2img_width", 100)
    page.click("#txt2img_generate")
    text = wait_progress(page, "multiple of 8")
    assert "width must be a multiple of 8, got 100" in text
    set_number(page, "txt2img_width", 64)
    page.click("#txt2img_generate")
    wait_progress(page, "^Done")
    page.context.close()


def test_interrupt_stops_only_the_pressers_job(browser, server):
    a, b = open_page(browser, server), open_page(browser, server)
    fill_job(a, "a long job", "red", steps=150, batch_size=8, batch_count=20)
    a.click("#txt2img_generate")
    a.wait_for_function("document.querySelectorAll('#txt2img_preview_gallery .thumbnail-item').length >= 2")
    b.click("#txt2img_interrupt")  # b has no job: nothing of a's may stop
    n = len(captions(a))
    a.wait_for_function(f"document.querySelectorAll('#txt2img_preview_gallery .thumbnail-item').length > {n + 1}")
    assert re.search(r"Step \d+/150 · batch 1/20 · \d+% · [\d.]+ s left", progress_text(a)), progress_text(a)
    start = time.monotonic()
    a.click("#txt2img_interrupt")
    text = wait_progress(a, "^Interrupted", timeout=30_000)
    assert time.monotonic() - start < 20
    assert 1 <= result_count(a) <= 8  # the interrupted batch's last predictions, no further batches
    assert re.match(r"Interrupted at step \d+/150", text)
    assert len(captions(a)) < 150
    a.context.close()
    b.context.close()


def test_two_sessions_generating_at_once_each_see_their_own_previews(browser, server):
    a, b = open_page(browser, server), open_page(browser, server)
    fill_job(a, "first person's prompt", "green", steps=7, seed=11)
    fill_job(b, "second person's prompt", "yellow", steps=5, batch_size=2, seed=22)
    b.locator("#txt2img_preview_subject").get_by_label("All three").check()  # b's choice, not a's
    a.click("#txt2img_generate")
    b.click("#txt2img_generate")
    wait_progress(a, "^Done")
    wait_progress(b, "^Done")
    assert captions(a) == [f"Step {i}/7" for i in range(1, 8)]
    assert captions(b) == [f"Step {i}/5" for i in range(1, 6)]
    assert "first person's prompt" in a.inner_text("#html_info_txt2img")
    assert "second person's prompt" in b.inner_text("#html_info_txt2img")
    assert result_count(a) == 1 and result_count(b) == 2

    def preview_sizes(page):
        return page.eval_on_selector_all("#txt2img_preview_gallery .thumbnail-item img",
                                         "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")

    a.wait_for_function("[...document.querySelectorAll('#txt2img_preview_gallery img')].every(i => i.complete)")
    b.wait_for_function("[...document.querySelectorAll('#txt2img_preview_gallery img')].every(i => i.complete)")
    assert set(map(tuple, preview_sizes(a))) == {(64, 64)}  # combined, one image
    assert set(map(tuple, preview_sizes(b))) == {(3 * 64, 2 * 64)}  # combined | prompt | negative, 2 rows
    assert "combined | prompt | negative" in b.inner_text("#txt2img_preview_gallery")
    a.context.close()
    b.context.close()


def test_png_info_round_trip_fills_txt2img(browser, server, tmp_path):
    pngs = sorted(server.outdir.rglob("*.png"))
    assert pngs, "earlier tests saved images"
    source = tmp_path / "picture.png"
    shutil.copy(pngs[0], source)
    from PIL import Image

    with Image.open(source) as im:
        parameters = im.info["parameters"]
    page = open_page(browser, server)
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(source))
    page.wait_for_function("document.querySelector('#pnginfo_html').innerText.includes('Negative prompt:')")
    assert "Steps:" in page.inner_text("#pnginfo_html")
    page.click("#pnginfo_send_to_txt2img")
    page.wait_for_selector("#txt2img_prompt textarea", state="visible")
    from modules.images import parse_generation_parameters

    expected = parse_generation_parameters(parameters)
    page.wait_for_function("v => document.querySelector('#txt2img_prompt textarea').value === v",
                           arg=expected["Prompt"])
    assert page.input_value("#txt2img_neg_prompt textarea") == expected["Negative prompt"]
    assert page.input_value("#txt2img_steps input[type=number]") == expected["Steps"]
    assert page.input_value("#txt2img_seed input") == expected["Seed"]
    assert page.input_value("#txt2img_width input[type=number]") == expected["Size-1"]
    page.context.close()


# ---- img2img, inpainting, the hires fix, send to img2img (the same server) ---------------------------

def open_img2img(page, sub_tab: str | None = None) -> None:
    page.get_by_role("tab", name="img2img").first.click()  # the page's tab (the sub-tab of that name comes later)
    page.wait_for_selector("#img2img_prompt textarea", state="visible")
    if sub_tab:
        page.get_by_role("tab", name=sub_tab, exact=True).click()


def img2img_progress(page, pattern: str, timeout: float = 90_000) -> str:
    page.wait_for_function(
        "p => new RegExp(p).test(document.querySelector('#img2img_progress .sdneg-progress-text')?.innerText || '')",
        arg=pattern, timeout=timeout)
    return page.inner_text("#img2img_progress .sdneg-progress-text")


def result_pixels(page, kind: str):
    from tests.browser import image_pixels

    page.locator(f"#{kind}_gallery").scroll_into_view_if_needed()
    return image_pixels(page, f"#{kind}_gallery .thumbnail-item img")


def saved_pngs(server) -> set:
    """Every saved picture: outputs/ (txt2img) and its sibling img2img-images/."""
    return set(server.outdir.parent.rglob("*.png"))


def img2img_job(browser, server, picture):
    """A page on the img2img tab with a 4-step job of seed 77 and `picture` uploaded."""
    page = open_page(browser, server)
    open_img2img(page)
    page.fill("#img2img_prompt textarea", "a blue circle")
    set_number(page, "img2img_steps", 4)
    page.fill("#img2img_seed input", "77")
    page.locator("#img2img_image input[type=file]").set_input_files(str(picture))
    return page


def test_img2img_upload_generate_and_a_bad_image_is_refused(browser, server, tmp_path):
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a picture" * 10)
    page = img2img_job(browser, server, bad)
    before = saved_pngs(server)
    page.click("#img2img_generate")
    text = img2img_progress(page, "init_images")
    assert "init_images: not a valid PNG image" in text
    page.wait_for_selector(".toast-body:has-text('not a valid PNG image')")  # gr.Warning, readable
    assert saved_pngs(server) == before  # nothing written
    page.context.close()
    page = img2img_job(browser, server, init)
    page.wait_for_selector("#img2img_image img")
    page.click("#img2img_generate")
    done = img2img_progress(page, "^Done")
    assert "1 image(s)" in done
    info = page.inner_text("#html_info_img2img")
    assert "a blue circle" in info and "Denoising strength: 0.75" in info and "Seed: 77" in info
    # strength 0.75 of 4 steps: AUTOMATIC1111 runs int(0.75 * 4) + 1 = 4 of them
    assert captions(page, "img2img_preview_gallery") == [f"Step {i}/4" for i in range(1, 5)]
    assert result_pixels(page, "img2img").shape == (64, 64, 3)
    assert len(saved_pngs(server) - before) == 1
    page.context.close()


def test_inpaint_upload_keeps_the_pixels_outside_the_mask(browser, server, tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    page = open_page(browser, server)
    open_img2img(page, "Inpaint upload")
    page.wait_for_selector("#img2img_mask_blur", state="visible")  # the inpainting controls show on this tab
    page.fill("#img2img_prompt textarea", "a green triangle")
    set_number(page, "img2img_steps", 4)
    set_number(page, "img2img_mask_blur", 0)
    page.locator("#img_inpaint_base input[type=file]").set_input_files(str(tmp_path / "init.png"))
    page.locator("#img_inpaint_mask input[type=file]").set_input_files(str(tmp_path / "mask.png"))
    page.wait_for_selector("#img_inpaint_mask img")
    page.click("#img2img_generate")
    img2img_progress(page, "^Done")
    assert "Mask blur" not in page.inner_text("#html_info_img2img")  # blur 0 reached the job
    out = result_pixels(page, "img2img")
    outside = mask == 0
    assert np.abs(out[outside] - picture[outside]).max() <= 1  # the init image's, exactly (8-bit rounding)
    assert np.abs(out[~outside] - picture[~outside]).mean() > 10  # and the masked square repainted
    page.context.close()


def test_inpaint_with_a_mask_drawn_in_the_browser(browser, server, tmp_path):
    import numpy as np
    from PIL import Image

    Image.new("RGB", (64, 64), (40, 160, 220)).save(tmp_path / "init.png")
    page = open_page(browser, server)
    open_img2img(page, "Inpaint")
    page.fill("#img2img_prompt textarea", "a red square")
    set_number(page, "img2img_steps", 3)
    set_number(page, "img2img_mask_blur", 0)
    page.locator("#img2maskimg input[type=file]").set_input_files(str(tmp_path / "init.png"))
    page.wait_for_function("document.querySelectorAll('#img2maskimg canvas').length > 0")
    time.sleep(1.0)  # the editor lays out its canvas
    box = page.locator("#img2maskimg canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 10, cy)
    page.mouse.down()
    page.mouse.move(cx + 10, cy, steps=4)  # a short white stroke through the middle (each event redraws the editor)
    page.mouse.up()
    page.click("#img2img_generate")
    img2img_progress(page, "^Done")
    out = result_pixels(page, "img2img")
    corners = np.concatenate([out[:8, :8], out[:8, -8:], out[-8:, :8], out[-8:, -8:]]).reshape(-1, 3)
    assert np.abs(corners - np.array([40, 160, 220])).max() <= 1  # far from the stroke: the init image
    assert np.abs(out - np.array([40, 160, 220])).max() > 10  # under it: repainted
    page.context.close()


def test_hires_fix_then_send_to_img2img(browser, server):
    page = open_page(browser, server)
    fill_job(page, "a hires circle", "blue", steps=3, seed=4242)
    page.click("#txt2img_hr")  # opening the accordion turns the hires fix on, as AUTOMATIC1111's
    page.wait_for_function("document.querySelector('#txt2img_hr-checkbox input').checked")
    set_number(page, "txt2img_hires_steps", 2)
    page.click("#txt2img_generate")
    done = wait_progress(page, "^Done")
    assert "1 image(s)" in done
    assert captions(page) == ["Step 1/3", "Step 2/3", "Step 3/3", "Hires fix · Step 1/2", "Hires fix · Step 2/2"]
    assert result_pixels(page, "txt2img").shape == (128, 128, 3)  # 64 x 2
    page.wait_for_function("document.querySelector('#txt2img_inspector_info').innerText"
                           ".startsWith('Hires fix · Step 2/2')")
    info = page.inner_text("#html_info_txt2img")
    assert "Hires upscale: 2" in info and "Hires steps: 2" in info and "Denoising strength: 0.7" in info
    page.click("#txt2img_send_to_img2img")
    page.wait_for_function("document.querySelector('#img2img_prompt textarea')?.value === 'a hires circle'")
    assert page.input_value("#img2img_neg_prompt textarea") == "blue"
    assert page.input_value("#img2img_seed input") == "4242"
    assert page.input_value("#img2img_width input[type=number]") == "128"  # the picture's size
    page.wait_for_selector("#img2img_image img")
    set_number(page, "img2img_steps", 2)
    page.click("#img2img_generate")
    img2img_progress(page, "^Done")
    assert result_pixels(page, "img2img").shape == (128, 128, 3)
    assert "Seed: 4242" in page.inner_text("#html_info_img2img")


def test_styles_and_extra_networks_panel(browser, server):
    """Extra networks cards insert into the prompt, or the negative prompt when it was focused last (embeddings;
    a LoRA always into the prompt, as AUTOMATIC1111), a second click takes the text out, search filters; the
    Styles multi-select reaches the job (its text in the infotext), Apply writes the boxes, Save writes
    styles.csv and refuses a bad name; a skipped embedding and an unknown style are warnings on the page; the token
    counters count the prompts with the chosen styles applied."""
    page = open_page(browser, server)
    prompt, negative = "#txt2img_prompt textarea", "#txt2img_neg_prompt textarea"
    page.fill(prompt, "a red circle")
    page.fill(negative, "")
    page.click("#txt2img_extra_networks .label-wrap")
    card = "#txt2img_textual_inversion_cards .card[data-name=tinyneg]"
    page.wait_for_selector(card)
    assert page.locator(f"{card} img.preview").get_attribute("src").startswith("data:image/jpeg;base64,")
    assert "wide" in page.inner_text("#txt2img_textual_inversion_cards .sdneg-skipped")  # with the reason
    page.click(prompt)
    page.click(card)
    assert page.input_value(prompt) == "a red circle tinyneg"
    page.click(card)
    assert page.input_value(prompt) == "a red circle"
    page.click(negative)
    page.click(card)
    assert page.input_value(negative) == "tinyneg" and page.input_value(prompt) == "a red circle"
    page.get_by_role("tab", name="Lora").click()
    page.click("#txt2img_lora_cards .card[data-name=detail]")
    assert page.input_value(prompt) == "a red circle <lora:detail:1>" and page.input_value(negative) == "tinyneg"
    page.fill("#txt2img_extra_search input, #txt2img_extra_search textarea", "zzz")
    page.wait_for_selector("#txt2img_lora_cards .card[data-name=detail]", state="hidden")
    page.fill("#txt2img_extra_search input, #txt2img_extra_search textarea", "DET")
    page.wait_for_selector("#txt2img_lora_cards .card[data-name=detail]", state="visible")

    # a style chosen in the multi-select goes with the job, through the job layer
    page.fill(prompt, "a red circle, wide")
    page.fill(negative, "blue")
    page.wait_for_function("document.querySelector('#txt2img_token_counter').innerText.trim() === '5/75'")
    page.click("#txt2img_styles input")
    page.get_by_role("option", name="Shiny").click()
    page.wait_for_function("document.querySelector('#txt2img_styles').innerText.includes('Shiny')")
    # the token counters count the prompts with the style applied, as the job encodes them: Shiny adds ", shiny"
    # (2 tokens) to "a red circle, wide" (5) and ", tinyneg, dull" (1 + 2 vectors + 1 + 1) to "blue" (1)
    counted = "([id, want]) => document.querySelector('#' + id).innerText.trim() === want"
    page.wait_for_function(counted, arg=["txt2img_token_counter", "7/75"])
    page.wait_for_function(counted, arg=["txt2img_negative_token_counter", "6/75"])
    set_number(page, "txt2img_steps", 2)
    page.click("#txt2img_generate")
    wait_progress(page, "^Done")
    info = page.inner_text("#html_info_txt2img")
    assert "a red circle, wide, shiny" in info and "Negative prompt: blue, tinyneg, dull" in info, info
    assert "Embedding wide was skipped" in page.inner_text("#html_info_txt2img .sdneg-warnings")
    # Apply writes the chosen styles into the boxes and clears the choice
    page.click("#txt2img_style_apply")
    page.wait_for_function("s => document.querySelector(s).value.endsWith(', shiny')", arg=prompt)
    assert page.input_value(negative) == "blue, tinyneg, dull"
    page.wait_for_function(counted, arg=["txt2img_token_counter", "7/75"])  # the same text, now in the boxes
    page.wait_for_function(counted, arg=["txt2img_negative_token_counter", "6/75"])
    # Save: a bad name is refused, a good one written to styles.csv
    styles_file = server.root / "styles.csv"
    page.fill("#txt2img_style_name input, #txt2img_style_name textarea", "#hidden")
    page.click("#txt2img_style_create")
    page.wait_for_function("document.querySelector('#txt2img_styles_info').innerText.includes('start with #')")
    assert "#hidden" not in styles_file.read_text()
    page.fill("#txt2img_style_name input, #txt2img_style_name textarea", "Mine")
    page.click("#txt2img_style_create")
    deadline = time.monotonic() + 30
    while "Mine" not in styles_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    from modules.styles import StyleDatabase

    assert StyleDatabase([styles_file]).styles["Mine"][1:3] == ("a red circle, wide, shiny", "blue, tinyneg, dull")
    page.context.close()


def pick(page, dropdown: str, option: str) -> None:
    """Choose `option` in a Gradio dropdown (`#<dropdown> input`, then the listed option)."""
    page.click(f"#{dropdown} input")
    page.get_by_role("option", name=option, exact=True).click()
    page.wait_for_function("([id, v]) => document.querySelector('#' + id + ' input').value === v",
                           arg=[dropdown, option])


def api_pixels(server, body: dict):
    """The first image of an API txt2img job on the same server, as the page's pixels are read (RGB floats)."""
    import base64
    import io
    import json
    import urllib.request

    import numpy as np
    from PIL import Image

    request = urllib.request.Request(server.url + "/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        data = json.load(response)
    png = base64.b64decode(data["images"][0])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32), json.loads(data["info"])


def test_rule_controls_show_with_their_rule_and_make_the_apis_image(browser, server):
    """Dynamic negative's, APG's and Dynamic thresholding's controls show only while their rule is picked; a
    changed one reaches the job (its infotext) and the page's image is the API's with the same fields, bit for bit."""
    import numpy as np

    page = open_page(browser, server)
    page.click("#txt2img_negative_guidance .label-wrap")
    groups = {"Dynamic negative": "#txt2img_guidance_dng", "APG": "#txt2img_guidance_apg",
              "Dynamic thresholding": "#txt2img_guidance_dynthres"}
    page.wait_for_selector("#txt2img_guidance", state="visible")
    for selector in groups.values():  # CFG: none of them
        page.wait_for_selector(selector, state="hidden")
    for rule in ("APG", "Dynamic thresholding", "Dynamic negative"):  # each shows its own group and hides the others
        selector = groups[rule]
        pick(page, "txt2img_guidance", rule)
        page.wait_for_selector(selector, state="visible")
        for other in set(groups.values()) - {selector}:
            page.wait_for_selector(other, state="hidden")
    assert page.input_value("#txt2img_dng_scale input[type=number]") == "5"  # the API's default
    set_number(page, "txt2img_dng_scale", 8)
    fill_job(page, "a red circle", "blue square", steps=5, seed=4321)
    page.click("#txt2img_generate")
    wait_progress(page, "^Done")
    info = page.inner_text("#html_info_txt2img")
    assert "Guidance: Dynamic negative" in info and "DNG scale: 8" in info and "DNG prior: 0.01" in info, info
    shown = result_pixels(page, "txt2img")
    body = {"prompt": "a red circle", "negative_prompt": "blue square", "steps": 5, "seed": 4321,
            "sampler_name": "DDIM", "guidance": "Dynamic negative", "dng_scale": 8}
    expected, api_info = api_pixels(server, body)
    assert "Guidance: Dynamic negative" in api_info["infotexts"][0] and "DNG scale: 8" in api_info["infotexts"][0]
    assert np.array_equal(shown, expected)
    assert not np.array_equal(shown, api_pixels(server, {**body, "dng_scale": 5})[0])  # the 8 did act
    pick(page, "txt2img_guidance", "CFG")
    for selector in groups.values():
        page.wait_for_selector(selector, state="hidden")
    page.context.close()

