"""The options on a running server: an AUTOMATIC1111 client from PyPI, the JSON round trip, refused
writes, the Settings tab in a real browser, and AUTOMATIC1111's options test across a restart.

One server (API and page) serves the module; the last test stops it and starts a new process on
the same --ui-settings-file (API only, --nowebui: the page is not needed after it).
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.browser import open_page, require_browser, set_number
from tests.server import start_server

JOB = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "seed": 11, "width": 64, "height": 64,
       "sampler_name": "Euler a"}

# AUTOMATIC1111's options test in spirit: 10 keys of different kinds, each to a value other than its default.
TEN = {
    "send_seed": False,  # bool, stored only
    "samples_format": "webp",  # text with fixed choices, takes effect
    "CLIP_stop_at_last_layers": 2,  # int, takes effect
    "eta_ddim": 0.25,  # float
    "eta_noise_seed_delta": 31337,  # int without a range
    "quicksettings_list": ["sd_model_checkpoint", "sd_vae"],  # list of text
    "img_downscale_threshold": 2,  # number: an int stays an int
    "upscaler_for_img2img": "Lanczos",  # text or null
    "randn_source": "NV",
    "my_extension_setting": {"nested": [1, 2]},  # a key the table does not know (an extension's)
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("settings")
    model = tiny_model_dir
    config = {k: v for k, v in AutoencoderKL.load_config(model / "vae").items() if not k.startswith("_")}
    (root / "VAE").mkdir()
    for name, changes in (("good", {}), ("wide-16ch", {"latent_channels": 16})):
        torch.manual_seed(1)
        vae = AutoencoderKL(**{**config, **changes})
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / "VAE" / f"{name}.safetensors"))
    flags = ("--api", "--vae-dir", str(root / "VAE"), "--outdir-samples", str(root / "outputs"),
             "--ui-settings-file", str(root / "config.json"))
    server = start_server(model, *flags)
    state = {"server": server, "model": model, "flags": flags, "root": root}
    yield state
    state["server"].stop()


def url(world, route: str) -> str:
    return f"{world['server'].url}/sdapi/v1/{route}"


def options(world) -> dict:
    return requests.get(url(world, "options"), timeout=30).json()


def txt2img(world, **changes) -> tuple[np.ndarray, dict]:
    r = requests.post(url(world, "txt2img"), json={**JOB, **changes}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    return np.asarray(image.convert("RGB")).astype(int), {**json.loads(body["info"]), "format": image.format}


def test_webuiapi_reads_and_writes_the_options(world):
    webuiapi = pytest.importorskip("webuiapi")
    client = webuiapi.WebUIApi(host="127.0.0.1", port=world["server"].port)
    opts = client.get_options()
    assert len(opts) >= 300 and opts["send_seed"] is True and opts["samples_format"] == "png"
    client.set_options({"send_seed": False, "jpeg_quality": 95})
    assert {k: client.get_options()[k] for k in ("send_seed", "jpeg_quality")} == {"send_seed": False, "jpeg_quality": 95}
    client.set_options({"send_seed": True, "jpeg_quality": 80})
    schedulers = client.get_schedulers()
    assert [s["name"] for s in schedulers][:3] == ["automatic", "uniform", "karras"]
    assert set(schedulers[0]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    assert {"Lanczos", "Nearest"} <= {u["name"] for u in client.get_upscalers()}
    assert sorted(v["model_name"] for v in client.get_sd_vae()) == ["good.safetensors", "wide-16ch.safetensors"]
    memory = client.get_memory()
    assert memory["ram"]["total"] > 0 and "cuda" in memory


def test_the_full_option_json_round_trips(world):
    first = requests.get(url(world, "options"), timeout=30)
    assert requests.post(url(world, "options"), json=first.json(), timeout=60).status_code == 200
    second = requests.get(url(world, "options"), timeout=30)
    assert second.json() == first.json() and json.dumps(second.json()) == json.dumps(first.json())


def test_refused_writes_change_nothing_and_the_server_keeps_serving(world):
    before = options(world)
    r = requests.post(url(world, "options"), json={"an_extension_key": 1, "eta_ddim": "high"}, timeout=30)
    assert r.status_code == 422 and "eta_ddim" in r.text
    r = requests.post(url(world, "options"), json={"send_seed": False, "sd_vae": "wide-16ch.safetensors"}, timeout=60)
    assert 400 <= r.status_code < 500 and "wide-16ch" in r.text and "does not fit" in r.text
    assert options(world) == before  # neither the unknown key, nor send_seed, nor the VAE
    pixels, info = txt2img(world)
    assert "VAE" not in info["infotexts"][0]
    assert requests.post(url(world, "options"), json={"sd_vae": "good.safetensors"}, timeout=60).status_code == 200
    assert "VAE: good.safetensors" in txt2img(world)[1]["infotexts"][0]
    assert requests.post(url(world, "options"), json={"sd_vae": "Automatic"}, timeout=60).status_code == 200


def apply(page, expected: str, tries: int = 10, typing=lambda: None) -> None:
    """Press Apply settings until the result line reads `expected` (a number typed just before may
    reach Gradio's state a moment after the click: the first press can still see the old value)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(tries):  # Apply also writes the stored values back into the controls: type again each try
        typing()
        page.click("#settings_submit")
        try:
            page.wait_for_function("t => document.querySelector('#settings_result').innerText.includes(t)",
                                   arg=expected, timeout=3000)
            return
        except PlaywrightTimeout:
            continue
    assert expected in page.inner_text("#settings_result")


def test_settings_tab_applies_to_the_options_and_the_next_job(world, browser):
    require_browser()
    before, _ = txt2img(world)
    page = open_page(browser, world["server"])
    assert page.locator("#setting_sd_vae").count() == 1 and page.locator("#setting_CLIP_stop_at_last_layers").count() == 1
    page.get_by_role("tab", name="Settings").click()
    for key in ("samples_format", "eta_noise_seed_delta", "randn_source", "live_preview_content", "outdir_samples"):
        assert page.locator(f"#setting_{key}").count() == 1, key
    search = page.locator("#settings_search textarea, #settings_search input")
    search.press_sequentially("seed delta")  # typed: Gradio's input event
    page.wait_for_function("() => getComputedStyle(document.querySelector('#setting_samples_format')).display === 'none'")
    assert page.locator("#setting_eta_noise_seed_delta").is_visible()
    for _ in "seed delta":  # deleted key by key, as typed
        search.press("Backspace")
    page.wait_for_function("() => getComputedStyle(document.querySelector('#setting_samples_format')).display !== 'none'")
    apply(page, "1 setting changed: eta_noise_seed_delta.",
          typing=lambda: set_number(page, "setting_eta_noise_seed_delta", 31337))
    assert options(world)["eta_noise_seed_delta"] == 31337
    after, info = txt2img(world)
    assert np.abs(after - before).mean() > 0 and "ENSD: 31337" in info["infotexts"][0]
    def out_of_range():  # refused, named, nothing changed
        set_number(page, "setting_sdxl_crop_top", -8)
        set_number(page, "setting_eta_noise_seed_delta", 0)

    apply(page, "Error: option sdxl_crop_top must be a whole number at least 0, got -8 (nothing was changed)",
          typing=out_of_range)
    assert options(world)["eta_noise_seed_delta"] == 31337
    page.context.close()
    requests.post(url(world, "options"), json={"eta_noise_seed_delta": 0}, timeout=30)


def test_ten_options_survive_a_restart(world):
    """Write, read back, restart the server on the same settings file, read back again; and they take effect."""
    assert requests.post(url(world, "options"), json=TEN, timeout=60).status_code == 200
    assert {k: options(world)[k] for k in TEN} == TEN
    world["server"].stop()
    world["server"] = start_server(world["model"], *world["flags"], "--nowebui")  # API only: it starts sooner
    back = options(world)
    assert {k: back[k] for k in TEN} == TEN
    for k, v in TEN.items():
        assert type(back[k]) is type(v), k
    pixels, info = txt2img(world)
    assert info["format"] == "WEBP"  # samples_format: the API sends the job's images as AUTOMATIC1111 does
    assert "RNG: NV" in info["infotexts"][0] and "Clip skip: 2" in info["infotexts"][0]
