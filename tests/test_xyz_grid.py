"""The X/Y/Z plot: value parsing, the grid's geometry and labels, cells equal to single runs
(engine), the same through the API (real server) and through the page (Chromium)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from modules import processing
from modules.errors import InvalidParameter
from modules.scripts import xyz_grid
from modules.scripts.xyz_grid import XYZArgs, find_axis, parse_axis_values, run_xyz

BASE = dict(prompt="a red circle on a white background", negative_prompt="", steps=3, sampler_name="DDIM",
            seed=1234, width=64, height=64)
ARGS = dict(x_type="CFG Scale", x_values="3, 7", y_type="Negative prompt", y_values='"", red, blue')
X_LABELS = ["CFG Scale: 3.0", "CFG Scale: 7.0"]
Y_LABELS = ["Negative prompt: (none)", "Negative prompt: red", "Negative prompt: blue"]


# ---- value parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize("axis,text,expected", [
    ("Steps", "1-5", [1, 2, 3, 4, 5]),
    ("Steps", "1-5 (+2)", [1, 3, 5]),
    ("Steps", "10-1 (-3)", [10, 7, 4, 1]),
    ("Steps", "1-10 [4]", [1, 4, 7, 10]),
    ("Steps", "5, 8,13", [5, 8, 13]),
    ("Seed", "1-3, 10", [1, 2, 3, 10]),
    ("CFG Scale", "1-2 (+0.25)", [1.0, 1.25, 1.5, 1.75, 2.0]),
    ("CFG Scale", "3-7 [3]", [3.0, 5.0, 7.0]),
    ("CFG Scale", "3, 7.5", [3.0, 7.5]),
    ("Negative weight", "0-1 (+0.5)", [0.0, 0.5, 1.0]),
    ("Negative prompt", '"a, b", c', ["a, b", "c"]),
    ("Negative prompt", '"", red, blue', ["", "red", "blue"]),
    ("Prompt S/R", 'red, "dark blue", green', ["red", "dark blue", "green"]),
    ("Sampler", "ddim, k_euler_a", ["DDIM", "Euler a"]),
    ("Guidance rule", "cfg, perp-neg", ["CFG", "Perp-Neg"]),
    ("Nothing", "whatever", [None]),
])
def test_values_parse_as_automatic1111(axis, text, expected):
    assert parse_axis_values(find_axis(axis), text) == expected


def test_seed_minus_one_becomes_a_fixed_random_seed():
    values = parse_axis_values(find_axis("Seed"), "-1, 5")
    assert values[1] == 5 and values[0] != -1 and 0 <= values[0] < 4294967294


@pytest.mark.parametrize("axis,text", [("Steps", "a, 2"), ("Steps", "1.5"), ("CFG Scale", "x-y"), ("Steps", ""),
                                       ("Sampler", "no such sampler"), ("Guidance rule", "magic"),
                                       ("Steps", "1-5 (+0)"), ("CFG Scale", "3,,7")])
def test_bad_values_are_invalid_parameters(axis, text):
    with pytest.raises(InvalidParameter):
        parse_axis_values(find_axis(axis), text)


def test_axis_lookup_and_arguments():
    assert find_axis("cfg scale").label == "CFG Scale" and find_axis(3).label == "CFG Scale"
    assert find_axis(None).label == "Nothing"
    with pytest.raises(InvalidParameter, match="Unknown y axis type"):
        find_axis("Hires steps", "y")
    with pytest.raises(InvalidParameter, match="Unknown X/Y/Z plot argument"):
        XYZArgs.from_dict({"x_typo": "Seed"})
    with pytest.raises(InvalidParameter):
        XYZArgs.from_dict({"draw_legend": "yes"})


def test_prompt_sr_replaces_in_prompt_and_negative():
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a red circle", negative_prompt="red, blurry")
    axes = xyz_grid.resolve_axes(XYZArgs(x_type="Prompt S/R", x_values="red, green"))
    first, second = (xyz_grid.cell_processing(p, axes, i, 0, 0) for i in range(2))
    assert (first.prompt, first.negative_prompt) == ("a red circle", "red, blurry")
    assert (second.prompt, second.negative_prompt) == ("a green circle", "green, blurry")
    assert p.prompt == "a red circle"  # the base job is not changed


# ---- the engine ------------------------------------------------------------------------------------

def cell_matches_single_run(model, plot, cell_image, **settings):
    p = processing.StableDiffusionProcessingTxt2Img(**{**BASE, **settings}, do_not_save_samples=True)
    single = processing.process_images(model, p).images[0]
    return np.array_equal(np.asarray(cell_image), np.asarray(single))


def label_region_has_ink(grid: Image.Image, box) -> bool:
    region = np.asarray(grid.crop(box).convert("L"))
    return region.size > 0 and int((region < 128).sum()) > 5


def check_grid(grid: Image.Image, cells: list[Image.Image], layout=None):
    """Size = 2x3 cells + label margins; every label region has text; every cell is where it should be."""
    fontsize = xyz_grid.font_size_for(64, 64)
    layout = layout or xyz_grid.grid_layout(64, 64, 2, 3, X_LABELS, Y_LABELS)[0]
    assert layout.pad_left >= 48 and layout.pad_top >= fontsize
    assert grid.size == (layout.pad_left + 2 * 64, layout.pad_top + 3 * 64)
    for col in range(2):
        assert label_region_has_ink(grid, layout.top_label_box(col))
    for row in range(3):
        assert label_region_has_ink(grid, layout.left_label_box(row))
    for i, cell in enumerate(cells):
        box = layout.cell_box(i % 2, i // 2)
        assert np.array_equal(np.asarray(grid.crop(box).convert("RGB")), np.asarray(cell.convert("RGB"))), i


def test_engine_grid_cfg_by_negative_prompt(tiny_model, tmp_path):
    p = processing.StableDiffusionProcessingTxt2Img(**{**BASE, "seed": -1},
                                                    outpath_samples=str(tmp_path / "txt2img-images"))
    plot = run_xyz(tiny_model, p, ARGS)
    assert plot.x_labels == X_LABELS and plot.y_labels == Y_LABELS and plot.z_labels == [""]
    assert plot.grid_count == 1 and len(plot.images) == 1 + 6 and len(plot.infotexts) == 7
    grid, cells = plot.images[0], plot.images[1:]
    check_grid(grid, cells, plot.layout)
    assert len(plot.all_seeds) == 7 and len(set(plot.all_seeds)) == 1  # seed -1 resolved once for all cells
    seed = plot.seed
    for i, cell in enumerate(cells):
        cfg, negative = (3.0, 7.0)[i % 2], ("", "red", "blue")[i // 2]
        assert f"CFG scale: {cfg:g}" in plot.infotexts[1 + i]
        assert cell_matches_single_run(tiny_model, plot, cell, cfg_scale=cfg, negative_prompt=negative, seed=seed), i
    assert not np.array_equal(np.asarray(cells[0]), np.asarray(cells[2]))  # the negative prompt changed something
    # saved: the grid under txt2img-grids/<date>/ with the base infotext, the cells as usual
    grid_files = list((tmp_path / "txt2img-grids").rglob("*.png"))
    assert len(grid_files) == 1 and len(list((tmp_path / "txt2img-images").rglob("*.png"))) == 6
    with Image.open(grid_files[0]) as saved:
        assert saved.size == grid.size and saved.info["parameters"] == plot.infotexts[0]
        assert f"Seed: {seed}" in saved.info["parameters"] and "CFG scale: 7" in saved.info["parameters"]
    json.dumps(plot.js())  # the API's info


def test_engine_z_axis_legend_off_and_bad_cells(tiny_model):
    p = processing.StableDiffusionProcessingTxt2Img(**BASE, do_not_save_samples=True)
    plot = run_xyz(tiny_model, p, dict(x_type="Steps", x_values="1-2", z_type="Guidance rule",
                                       z_values="CFG, Perp-Neg", include_lone_images=False, include_sub_grids=True))
    assert len(plot.images) == 3 and plot.grid_count == 3  # main grid + one per Z value, no cells
    sub = plot.images[1]
    assert plot.images[0].width == 2 * sub.width and plot.images[0].height > sub.height
    plot = run_xyz(tiny_model, p, dict(x_type="Steps", x_values="1-2", draw_legend=False))
    assert plot.images[0].size == (128, 64)
    with pytest.raises(InvalidParameter, match="between"):
        run_xyz(tiny_model, p, dict(x_type="Steps", x_values="1, 500"))  # checked before anything runs
    with pytest.raises(InvalidParameter, match="Prompt S/R did not find"):
        run_xyz(tiny_model, p, dict(x_type="Prompt S/R", x_values="green, blue"))


# ---- through the real server: API and page --------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.server import start_server
    from tests.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("xyz")
    model = build_tiny_sd(root / "models" / "tiny-sd")
    srv = start_server(model, "--api", "--outdir-samples", str(root / "outputs" / "txt2img-images"))
    srv.root, srv.model_dir = root, model
    yield srv
    srv.stop()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_api_xyz_plot(server):
    import requests

    url = server.url + "/sdapi/v1/txt2img"
    r = requests.post(url, json={**BASE, "script_name": "x/y/z plot", "script_args": ARGS, "save_images": True},
                      timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert info["x_labels"] == X_LABELS and info["y_labels"] == Y_LABELS and info["grid_count"] == 1
    images = [decode(b) for b in body["images"]]
    assert len(images) == 7
    check_grid(images[0], images[1:])
    assert images[0].info["parameters"] == info["infotexts"][0]
    for i, cell in enumerate(images[1:]):  # each cell equals a single run of the same server
        single = requests.post(url, json={**BASE, "cfg_scale": (3.0, 7.0)[i % 2],
                                          "negative_prompt": ("", "red", "blue")[i // 2]}, timeout=120)
        assert np.array_equal(np.asarray(cell), np.asarray(decode(single.json()["images"][0]))), i
    assert len(list((server.root / "outputs" / "txt2img-grids").rglob("*.png"))) == 1
    assert requests.get(server.url + "/sdapi/v1/scripts", timeout=30).json()["txt2img"] == ["x/y/z plot"]
    for bad in ({"x_type": "Hires steps", "x_values": "1"}, {"x_type": "Steps", "x_values": "a, b"},
                {"x_type": "Steps", "x_values": "1, 900"}, {"x_type": "Sampler", "x_values": "nope"},
                {"x_typo": "Steps"}, ["CFG Scale", "3, 7"]):
        r = requests.post(url, json={**BASE, "script_name": "x/y/z plot", "script_args": bad}, timeout=120)
        assert r.status_code == 422, (bad, r.status_code, r.text)
    r = requests.post(url, json={**BASE, "script_name": "prompt matrix"}, timeout=120)
    assert r.status_code == 422 and "script" in r.json()["detail"]


def test_page_xyz_plot(server):
    """The Script dropdown on the txt2img tab: the gallery shows the grid, then the six cells."""
    import requests

    from tests.browser import CHROMIUM, CHROMIUM_ARGS, require_browser

    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(90_000)
        page.goto(server.url + "/")
        page.fill("#txt2img_prompt textarea", BASE["prompt"])
        for elem_id, value in (("txt2img_steps", BASE["steps"]), ("txt2img_seed", BASE["seed"])):
            box = page.locator(f"#{elem_id} input").first
            box.fill(str(value))
            box.press("Enter")
        assert not page.locator("#script_txt2img_xyz_plot_x_values").is_visible()
        page.click("#script_list input")
        page.get_by_role("option", name="X/Y/Z plot").click()
        page.wait_for_selector("#script_txt2img_xyz_plot_x_values textarea", state="visible")
        assert page.input_value("#script_txt2img_xyz_plot_x_type input") == "CFG Scale"
        assert page.input_value("#script_txt2img_xyz_plot_y_type input") == "Negative prompt"
        page.fill("#script_txt2img_xyz_plot_x_values textarea", ARGS["x_values"])
        page.fill("#script_txt2img_xyz_plot_y_values textarea", ARGS["y_values"])
        page.click("#txt2img_generate")
        page.wait_for_function("/^Done/.test(document.querySelector('#txt2img_progress .sdneg-progress-text')"
                               "?.innerText || '')", timeout=180_000)
        srcs = page.eval_on_selector_all("#txt2img_gallery .thumbnail-item img", "imgs => imgs.map(i => i.src)")
        info = page.inner_text("#html_info_txt2img")
        browser.close()
    assert len(srcs) == 7, srcs
    images = [Image.open(io.BytesIO(requests.get(src, timeout=60).content)) for src in srcs]
    check_grid(images[0], images[1:])
    assert f"Seed: {BASE['seed']}" in info and BASE["prompt"] in info  # the grid's infotext: the base job
    url = server.url + "/sdapi/v1/txt2img"
    for i, cell in enumerate(images[1:]):  # each cell equals a single run with the same settings
        single = requests.post(url, json={**BASE, "cfg_scale": (3.0, 7.0)[i % 2],
                                          "negative_prompt": ("", "red", "blue")[i // 2]}, timeout=120)
        assert np.array_equal(np.asarray(cell.convert("RGB")), np.asarray(decode(single.json()["images"][0]))), i


def test_interrupt_stops_the_plot_and_keeps_the_grid(tiny_model):
    from modules.job_state import JobState

    state = JobState()
    p = processing.StableDiffusionProcessingTxt2Img(**BASE, do_not_save_samples=True)
    plot = run_xyz(tiny_model, p, dict(x_type="Steps", x_values="2, 3, 4"), hooks=[lambda info: state.interrupt()],
                   state=state)
    assert plot.interrupted and len(plot.images) == 1 + 1  # the grid, and the one cell that started
    grid = np.asarray(plot.images[0])
    lay = plot.layout
    assert grid[lay.cell_box(2, 0)[1]:lay.cell_box(2, 0)[3], lay.cell_box(2, 0)[0]:lay.cell_box(2, 0)[2]].max() == 0


# ---- hostile values: ranges are counted before they are expanded ---------------------------------

import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402


@pytest.mark.parametrize("axis,which,text,count", [
    ("Seed", "x", "1-10000000", "10000000"),
    ("CFG Scale", "y", "1-10 [100000000000]", "100000000000"),
    ("CFG Scale", "z", "0-1000000 (+0.0001)", "10000000001"),
    ("Steps", "x", "1-400, 1-400", "800"),
    ("Seed", "x", "1-10" + "0" * 40, "about 1.00e+41"),
    ("Negative weight", "y", "0-1 (+0." + "0" * 300 + "1)", "about 1.00e+301"),
    ("Negative weight", "y", "0-1 (+0." + "0" * 319 + "1)", "too many values to count"),  # a denormal step
    ("Seed", "x", ", ".join(str(i) for i in range(600)), "at least 513"),
    ("Prompt S/R", "x", ", ".join(f"w{i}" for i in range(600)), "600"),
])
def test_ranges_over_the_cell_limit_are_refused_before_expanding(axis, which, text, count):
    start = time.perf_counter()
    with pytest.raises(InvalidParameter) as e:
        parse_axis_values(find_axis(axis), text, which)
    assert time.perf_counter() - start < 0.5  # well under 100 ms on a quiet machine
    assert e.value.field == f"{which}_values"
    assert f"{axis} axis ({which.upper()})" in str(e.value) and count in str(e.value)
    assert f"at most {xyz_grid.MAX_CELLS} cells" in str(e.value)


def test_an_axis_of_exactly_the_limit_is_accepted():
    assert len(parse_axis_values(find_axis("Seed"), f"1-{xyz_grid.MAX_CELLS}")) == xyz_grid.MAX_CELLS
    assert len(parse_axis_values(find_axis("CFG Scale"), f"1-2 [{xyz_grid.MAX_CELLS}]")) == xyz_grid.MAX_CELLS


@pytest.mark.parametrize("axis,text,match", [
    ("Steps", "1-5 (+0)", "step cannot be 0"),
    ("CFG Scale", "1-5 (+0.0)", "step cannot be 0"),
    ("CFG Scale", "inf", "not a finite number"),
    ("CFG Scale", "3, nan", "not a finite number"),
    ("CFG Scale", "-inf-3", "cannot read"),
    ("CFG Scale", "1-" + "9" * 400, "not a finite number"),
    ("CFG Scale", "1-10 [" + "9" * 400 + "]", "not a finite number"),
    ("Steps", "1-10 [0]", "count of at least 1"),
    ("Seed", "1-" + "9" * 5000, "cannot read"),  # Python refuses 5000-digit ints
])
def test_step_zero_and_non_finite_values_are_refused_clearly(axis, text, match):
    with pytest.raises(InvalidParameter, match=match) as e:
        parse_axis_values(find_axis(axis), text)
    assert e.value.field == "x_values" and len(str(e.value)) < 400


def test_value_patterns_take_linear_time():
    start = time.perf_counter()
    for text in ["1-" + " " * 20000 + "x", "1-1" + " " * 20000 + "x", "1.5-2." + "5" * 20000 + " (" + " " * 20000]:
        for axis in ("Seed", "CFG Scale"):
            with pytest.raises(InvalidParameter):
                parse_axis_values(find_axis(axis), text)
    assert time.perf_counter() - start < 1  # A1111's patterns: about 10 s for each of the first


def test_value_patterns_read_as_automatic1111s():
    a1111 = [r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*",
             r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*",
             r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*",
             r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\[(\d+(?:\.\d*)?)\s*])?\s*"]
    ours = [xyz_grid.re_range, xyz_grid.re_range_float, xyz_grid.re_range_count, xyz_grid.re_range_count_float]
    rng = random.Random(8)
    tokens = ["1", "2", "0", " ", "-", "+", ".", "(", ")", "[", "]", "5", "x", "  "]
    for pattern, our in zip(a1111, ours):
        theirs = re.compile(pattern)
        for _ in range(3000):
            text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 12)))
            a, b = theirs.fullmatch(text), our.fullmatch(text)
            assert (a is None) == (b is None) and (a is None or a.groups() == b.groups()), text


def test_float_ranges_are_counted_as_numpy_expands_them():
    rng = random.Random(2)
    for _ in range(2000):
        start, end = round(rng.uniform(-5, 5), rng.randint(0, 3)), round(rng.uniform(-5, 5), rng.randint(0, 3))
        step = round(rng.choice([-1, 1]) * rng.uniform(0.01, 2), rng.randint(1, 3)) or 0.5
        assert xyz_grid._count_float_range(start, end, step) == len(np.arange(start, end + step, step))
    assert xyz_grid._count_int_range(1, 10, 3) == len(range(1, 11, 3))
    assert xyz_grid._count_int_range(10, 1, -4) == len(range(10, 0, -4))
    assert xyz_grid._count_int_range(5, 1, 1) == 0 and xyz_grid._count_float_range(0, 1, math.inf) == -1
