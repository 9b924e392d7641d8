"""The /sdapi/v1 API, through the real server process over HTTP (tests/server.py starts it).

Three servers per module, on tiny random-weight models (64x64 images, 8x8 latents):
`--api --gradio-auth` (API beside the UI; the API without auth), `--nowebui --api-auth` (API
only, HTTP Basic, --api-log) and `--share` (UI only: the public link cannot be made offline).
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.server import start_server
from tests.tiny_sd import build_tiny_sd

SMALL = {"prompt": "a red circle on a white background", "negative_prompt": "blue", "steps": 4, "cfg_scale": 7,
         "width": 64, "height": 64, "seed": 1234, "sampler_name": "DDIM"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return build_tiny_sd(root / "tiny-a", seed=0), build_tiny_sd(root / "tiny-b", seed=1)


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def extras(tmp_path_factory):
    """A styles file, an embeddings folder (one that fits the tiny models, one that does not) and a LoRA folder."""
    import torch

    from modules import textual_inversion as ti

    root = tmp_path_factory.mktemp("extras")
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nShiny,"{prompt}, shiny","tinyneg, dull"\n')
    (root / "embeddings").mkdir()
    ti.save_embedding(ti.Embedding("tinyneg", torch.randn(2, 32, generator=torch.Generator().manual_seed(0))),
                      root / "embeddings" / "tinyneg.safetensors")
    ti.save_embedding(ti.Embedding("wide", torch.zeros(1, 768)), root / "embeddings" / "wide.safetensors")
    (root / "Lora").mkdir()
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}, str(root / "Lora" / "detail.safetensors"))
    return root


@pytest.fixture(scope="module")
def api(models, outdir, extras):
    server = start_server(models[0], "--api", "--gradio-auth", "ui:pw", "--ckpt-dir", str(models[0].parent),
                          "--outdir-samples", str(outdir), "--styles-file", str(extras / "styles.csv"),
                          "--embeddings-dir", str(extras / "embeddings"), "--lora-dir", str(extras / "Lora"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_api(models, outdir):
    server = start_server(models[0], "--nowebui", "--api-auth", "alice:s3cret,bob:pw:with:colons", "--api-log",
                          "--outdir-samples", str(outdir))
    yield server
    server.stop()


def post(server, route, payload=None, **kw):
    return requests.post(f"{server.url}/sdapi/v1/{route}", json=payload, timeout=120, **kw)


def get(server, route, **kw):
    return requests.get(f"{server.url}/sdapi/v1/{route}", timeout=60, **kw)


def txt2img(server, **fields):
    r = post(server, "txt2img", {**SMALL, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB"))


# -- txt2img -----------------------------------------------------------------------------------

def test_txt2img_round_trip(api):
    res = txt2img(api)
    assert set(res) == {"images", "parameters", "info"}
    assert len(res["images"]) == 1
    image = decode(res["images"][0])
    assert image.size == (64, 64) and image.format == "PNG"
    info = json.loads(res["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234]
    assert info["prompt"] == SMALL["prompt"] and info["negative_prompt"] == "blue"
    assert info["width"] == 64 and info["height"] == 64 and info["steps"] == 4 and info["sampler_name"] == "DDIM"
    assert info["sd_model_name"] == "tiny-a" and len(info["sd_model_hash"]) == 10
    for key in ("all_prompts", "all_negative_prompts", "subseed", "all_subseeds", "cfg_scale", "batch_size",
                "job_timestamp", "infotexts", "version"):
        assert key in info
    infotext = image.info["parameters"]
    assert infotext == info["infotexts"][0]
    assert infotext.startswith(SMALL["prompt"] + "\nNegative prompt: blue\n")
    assert "Seed: 1234" in infotext and "Size: 64x64" in infotext and "Steps: 4" in infotext
    assert res["parameters"]["prompt"] == SMALL["prompt"] and res["parameters"]["seed"] == 1234


def test_same_seed_same_pixels_and_batch_seeds(api):
    single = txt2img(api, seed=777)
    again = txt2img(api, seed=777)
    assert np.array_equal(pixels(single["images"][0]), pixels(again["images"][0]))
    other = txt2img(api, seed=778)
    assert not np.array_equal(pixels(single["images"][0]), pixels(other["images"][0]))

    batch = txt2img(api, seed=777, batch_size=3)
    info = json.loads(batch["info"])
    assert info["all_seeds"] == [777, 778, 779] and len(batch["images"]) == 3
    assert [f"Seed: {s}," in t for s, t in zip([777, 778, 779], info["infotexts"])] == [True] * 3
    assert np.array_equal(pixels(batch["images"][0]), pixels(single["images"][0]))
    # later images of a batch go through batched UNet calls: equal to their single runs within 8-bit rounding
    diff = np.abs(pixels(batch["images"][1]).astype(int) - pixels(other["images"][0]).astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01


def test_random_seed_is_reported(api):
    info = json.loads(txt2img(api, seed=-1)["info"])
    assert info["seed"] >= 0 and f"Seed: {info['seed']}," in info["infotexts"][0]


def test_a1111_client_payload_with_unimplemented_features_off_is_accepted(api):
    """The fields AUTOMATIC1111's clients send by default, features off, plus unknown ones."""
    payload = {**SMALL, "sampler_name": None, "sampler_index": "DDIM", "scheduler": "automatic", "styles": [],
               "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
               "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
               "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_prompt": "",
               "hr_negative_prompt": "", "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
               "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "restore_faces": False, "tiling": False,
               "do_not_save_samples": False, "do_not_save_grid": False, "eta": 1.0, "s_churn": 0, "s_tmax": 0,
               "s_tmin": 0, "s_noise": 1, "override_settings": {"some_unknown_option": 3},
               "override_settings_restore_afterwards": True, "script_args": [], "script_name": None,
               "send_images": True, "save_images": False, "alwayson_scripts": {}, "comments": {},
               "a_field_no_client_sends": [1, 2]}
    r = post(api, "txt2img", payload)
    assert r.status_code == 200, r.text
    assert "Sampler: DDIM" in json.loads(r.json()["info"])["infotexts"][0]


def test_legacy_sampler_name_and_schedule_type(api):
    info = json.loads(txt2img(api, sampler_name="DPM++ 2M Karras", steps=3)["info"])
    assert "Sampler: DPM++ 2M," in info["infotexts"][0] and "Schedule type: Karras" in info["infotexts"][0]
    info = json.loads(txt2img(api, sampler_name=None, sampler_index="Euler", scheduler="Exponential", steps=3)["info"])
    assert "Sampler: Euler," in info["infotexts"][0] and "Schedule type: Exponential" in info["infotexts"][0]


def test_send_images_false_and_save_images(api, outdir):
    before = set(outdir.rglob("*.png"))
    res = txt2img(api, send_images=False, seed=4242)
    assert res["images"] == [] and json.loads(res["info"])["seed"] == 4242
    assert set(outdir.rglob("*.png")) == before  # save_images defaults to false in the API
    txt2img(api, save_images=True, seed=4243)
    new = set(outdir.rglob("*.png")) - before
    assert len(new) == 1 and next(iter(new)).name.endswith("-4243.png")
    assert "Seed: 4243" in Image.open(next(iter(new))).info["parameters"]


def test_override_settings_clip_skip_and_infotext_field(api):
    info = json.loads(txt2img(api, override_settings={"CLIP_stop_at_last_layers": 2})["info"])
    assert "Clip skip: 2" in info["infotexts"][0]
    # `infotext` fills what the request does not set (AUTOMATIC1111 1.7+)
    r = post(api, "txt2img", {"infotext": "an infotext prompt\nSteps: 3, Sampler: DDIM, CFG scale: 5, Seed: 99, "
                                          "Size: 64x64", "seed": 100})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["prompt"] == "an infotext prompt" and info["steps"] == 3 and info["cfg_scale"] == 5
    assert info["seed"] == 100  # the request's own field wins


# -- png-info ----------------------------------------------------------------------------------

def test_png_info_data_uri_and_raw_base64(api):
    res = txt2img(api, seed=31337)
    infotext = json.loads(res["info"])["infotexts"][0]
    for image in (res["images"][0], "data:image/png;base64," + res["images"][0]):
        r = post(api, "png-info", {"image": image})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["info"] == infotext
        assert body["parameters"]["Seed"] == "31337" and body["parameters"]["Prompt"] == SMALL["prompt"]
        assert body["parameters"]["Negative prompt"] == "blue" and body["parameters"]["Size-1"] == "64"
        assert "parameters" not in body["items"]


def test_png_info_of_image_without_infotext_and_empty(api):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    r = post(api, "png-info", {"image": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 200 and r.json()["info"] == "" and r.json()["parameters"] == {}
    r = post(api, "png-info", {"image": ""})
    assert r.status_code == 200 and r.json()["info"] == ""


# -- progress, skip, interrupt, queue ----------------------------------------------------------

def test_progress_when_idle(api):
    r = get(api, "progress")
    assert r.status_code == 200
    body = r.json()
    assert body["progress"] == 0 and body["current_image"] is None
    assert {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no", "sampling_step",
            "sampling_steps"} <= set(body["state"])
    assert post(api, "interrupt").status_code == 200 and post(api, "skip").status_code == 200


def test_progress_skip_interrupt_and_queue(api):
    """A long job (3 batches of 8, 150 steps): progress mid-run with a preview, skip ends batch 1,
    interrupt ends the job with the images made so far; a job queued behind it is not interrupted."""
    results = {}

    def run(name, payload):
        results[name] = post(api, "txt2img", payload)

    long_job = threading.Thread(target=run, args=("long", {**SMALL, "steps": 150, "batch_size": 8, "n_iter": 3}))
    long_job.start()
    deadline = time.monotonic() + 60
    body = None
    while time.monotonic() < deadline:
        body = get(api, "progress").json()
        if body["state"]["sampling_step"] >= 2 and body["current_image"]:
            break
        time.sleep(0.1)
    assert body["state"]["job"] == "txt2img" and body["state"]["job_count"] == 3 and body["state"]["job_no"] == 0
    assert body["state"]["sampling_steps"] == 150 and 0 < body["state"]["sampling_step"] < 150
    assert 0 < body["progress"] < 1 and body["eta_relative"] > 0
    preview = decode(body["current_image"])
    assert preview.size == (3 * 64, 3 * 64)  # the batch of 8 as a 3x3 grid at image size
    assert get(api, "progress", params={"skip_current_image": "true"}).json()["current_image"] is None

    queued = threading.Thread(target=run, args=("queued", {**SMALL, "seed": 5}))
    queued.start()
    assert post(api, "skip").status_code == 200  # ends batch 1 early; batch 2 starts
    while time.monotonic() < deadline:
        body = get(api, "progress", params={"skip_current_image": "true"}).json()
        if body["state"]["job_no"] >= 1:
            break
        time.sleep(0.05)
    assert body["state"]["job_no"] == 1
    assert post(api, "interrupt").status_code == 200
    long_job.join(60)
    queued.join(60)
    assert results["long"].status_code == 200, results["long"].text
    info = json.loads(results["long"].json()["info"])
    assert len(results["long"].json()["images"]) == 16  # batches 1 (skipped) and 2 (interrupted); 3 never ran
    assert len(info["infotexts"]) == 16
    assert results["queued"].status_code == 200  # waited its turn, was not interrupted
    assert json.loads(results["queued"].json()["info"])["seed"] == 5 and len(results["queued"].json()["images"]) == 1


# -- lists, options, checkpoints ---------------------------------------------------------------

def test_samplers_schedulers_models_flags(api):
    samplers = get(api, "samplers").json()
    assert {"name": "DDIM", "aliases": ["ddim"], "options": {"default_eta_is_0": True}} in samplers or \
        any(s["name"] == "DDIM" for s in samplers)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = get(api, "schedulers").json()
    assert schedulers and all({"name", "label"} <= set(s) for s in schedulers)
    models = get(api, "sd-models").json()
    names = [m["model_name"] for m in models]
    assert "tiny-a" in names and "tiny-b" in names
    for m in models:
        assert m["title"] == f"{m['model_name']} [{m['hash']}]" and m["sha256"].startswith(m["hash"])
    assert post(api, "refresh-checkpoints").status_code == 200
    flags = get(api, "cmd-flags").json()
    assert flags["api"] is True and flags["nowebui"] is False and flags["port"] == api.port
    assert get(api, "scripts").json() == {"txt2img": ["x/y/z plot"], "img2img": ["x/y/z plot", "sd upscale"]}
    info = {(s["name"], s["is_img2img"]): s["args"] for s in get(api, "script-info").json()}
    assert set(info) == {("x/y/z plot", False), ("x/y/z plot", True), ("sd upscale", True)}
    upscale = {a["label"]: a for a in info[("sd upscale", True)]}
    assert upscale["Tile overlap"]["value"] == 64 and upscale["Upscaler"]["choices"][:3] == ["None", "Lanczos", "Nearest"]


def test_options_switch_checkpoint_and_override(api):
    models = {m["model_name"]: m for m in get(api, "sd-models").json()}
    opts = get(api, "options").json()
    assert opts["sd_model_checkpoint"] == models["tiny-a"]["title"]

    # one job on tiny-b through override_settings; the loaded model stays tiny-a
    info = json.loads(txt2img(api, override_settings={"sd_model_checkpoint": models["tiny-b"]["title"]})["info"])
    assert info["sd_model_name"] == "tiny-b" and info["sd_model_hash"] == models["tiny-b"]["hash"]
    assert get(api, "options").json()["sd_model_checkpoint"] == models["tiny-a"]["title"]
    pixels_b = pixels(txt2img(api, override_settings={"sd_model_checkpoint": "tiny-b"})["images"][0])

    r = post(api, "options", {"sd_model_checkpoint": models["tiny-b"]["title"], "unknown_option": 1})
    assert r.status_code == 200, r.text
    try:
        assert get(api, "options").json()["sd_model_checkpoint"] == models["tiny-b"]["title"]
        res = txt2img(api)
        assert json.loads(res["info"])["sd_model_name"] == "tiny-b"
        assert np.array_equal(pixels(res["images"][0]), pixels_b)
    finally:
        assert post(api, "options", {"sd_model_checkpoint": "tiny-a"}).status_code == 200
    assert json.loads(txt2img(api)["info"])["sd_model_name"] == "tiny-a"


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, status, words", [
    ({"sampler_name": "No Such Sampler"}, 404, "Sampler not found"),
    ({"sampler_name": None, "sampler_index": "No Such Sampler"}, 404, "Sampler not found"),
    ({"override_settings": {"sd_model_checkpoint": "no-such-model"}}, 404, "no-such-model"),
    ({"scheduler": "No Such Schedule"}, 422, "scheduler"),
    ({"steps": 0}, 422, "steps"),
    ({"steps": 1000}, 422, "steps"),
    ({"steps": "many"}, 422, "steps"),
    ({"steps": 2.5}, 422, "steps"),
    ({"width": 65}, 422, "width"),
    ({"height": 0}, 422, "height"),
    ({"width": 99999}, 422, "width"),
    ({"cfg_scale": 100}, 422, "cfg_scale"),
    ({"cfg_scale": "high"}, 422, "cfg_scale"),
    ({"batch_size": 9}, 422, "batch_size"),
    ({"n_iter": 0}, 422, "n_iter"),
    ({"eta": 5}, 422, "eta"),
    ({"seed": 2 ** 70}, 422, "seed"),
    ({"prompt": 123}, 422, "prompt"),
    ({"subseed_strength": 2}, 422, "subseed_strength"),
    ({"restore_faces": True}, 422, "restore_faces"),
    ({"script_name": "prompt matrix"}, 422, "script_name"),
    ({"script_name": "x/y/z plot", "script_args": {"x_type": "Hires steps", "x_values": "1"}}, 422, "x_type"),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, 422, "alwayson_scripts"),
    ({"seed_resize_from_w": 512}, 422, "seed_resize_from_w"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 99}}, 422, "clip_skip"),
])
def test_txt2img_errors(api, fields, status, words):
    r = post(api, "txt2img", {**SMALL, **fields})
    assert r.status_code == status, r.text
    assert words in json.dumps(r.json()["detail"]) + json.dumps(r.json())


def test_malformed_requests_are_422(api):
    r = requests.post(f"{api.url}/sdapi/v1/txt2img", data=b"{not json", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "detail" in r.json()
    r = requests.post(f"{api.url}/sdapi/v1/txt2img", data=b"[1, 2]", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    for image in ("this is not base64!!", "data:image/png;base64,@@@@", base64.b64encode(b"plain text").decode(),
                  "data:text/plain,hello"):
        r = post(api, "png-info", {"image": image})
        assert r.status_code == 422 and "detail" in r.json(), (image, r.text)
    assert post(api, "png-info", {}).status_code == 422
    assert post(api, "png-info", {"image": 5}).status_code == 422
    r = post(api, "options", {"sd_model_checkpoint": "no-such-model"})
    assert r.status_code == 404 and "no-such-model" in r.json()["detail"]
    assert post(api, "options", {"CLIP_stop_at_last_layers": "two"}).status_code == 422
    assert post(api, "options", ["not", "a", "dict"]).status_code == 422
    assert get(api, "progress", params={"skip_current_image": "maybe"}).status_code == 422


# -- server wiring: docs, UI, auth, --nowebui, --share -----------------------------------------

def test_docs_and_ui_beside_the_api(api):
    assert requests.get(f"{api.url}/docs", timeout=30).status_code == 200
    spec = requests.get(f"{api.url}/openapi.json", timeout=30).json()
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/progress", "/sdapi/v1/png-info", "/sdapi/v1/options"} <= set(spec["paths"])
    properties = spec["components"]["schemas"]["StableDiffusionProcessingTxt2Img"]["properties"]
    assert {"prompt", "negative_prompt", "sampler_index", "send_images", "cfg_scale"} <= set(properties)
    r = requests.get(api.url + "/", timeout=30)
    assert r.status_code == 200 and "<html" in r.text.lower()  # the Gradio page is served too
    # --gradio-auth guards the UI only (the API has --api-auth), as in AUTOMATIC1111
    assert requests.get(api.url + "/config", timeout=30).status_code == 401
    session = requests.Session()
    assert session.post(api.url + "/login", data={"username": "ui", "password": "pw"}, timeout=30).json()["success"]
    assert session.get(api.url + "/config", timeout=30).status_code == 200


def test_auth_and_nowebui(auth_api):
    for route in ("samplers", "progress", "options", "sd-models"):
        assert get(auth_api, route).status_code == 401
        assert get(auth_api, route, auth=("alice", "wrong")).status_code == 401
        assert get(auth_api, route, auth=("alice", "s3cret")).status_code == 200
    r = post(auth_api, "txt2img", SMALL)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic"
    r = post(auth_api, "txt2img", SMALL, auth=("bob", "pw:with:colons"))
    assert r.status_code == 200 and json.loads(r.json()["info"])["seed"] == 1234
    assert requests.get(auth_api.url + "/", timeout=30).status_code == 404  # --nowebui: no UI
    assert requests.get(auth_api.url + "/docs", timeout=30).status_code == 200
    log = auth_api.output()
    assert "API " in log and "POST /sdapi/v1/txt2img" in log and " 401 " in log


def test_share_without_network_serves_locally(models, tmp_path):
    server = start_server(models[0], "--share", "--outdir-samples", str(tmp_path))
    try:
        r = requests.get(server.url + "/", timeout=30)
        assert r.status_code == 200 and "<html" in r.text.lower()
        assert requests.get(f"{server.url}/sdapi/v1/samplers", timeout=30).status_code == 404  # no --api
        deadline = time.monotonic() + 60
        while "Could not create share link" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        out = server.output()
        assert "Could not create share link" in out and "Serving locally" in out
        assert "--share without --gradio-auth" in out
        assert requests.get(server.url + "/", timeout=30).status_code == 200
    finally:
        server.stop()


# -- an AUTOMATIC1111 client library from PyPI, unchanged ----------------------------------------

def test_webuiapi_client(api, auth_api):
    webuiapi = pytest.importorskip("webuiapi")
    names = [s["name"] for s in get(api, "samplers").json()]
    sampler = "Euler a" if "Euler a" in names else "DDIM"  # webuiapi's default sampler, when this server has it
    client = webuiapi.WebUIApi(host="127.0.0.1", port=api.port, sampler=sampler, steps=4)
    result = client.txt2img(prompt="a blue square on a gray background", negative_prompt="red", seed=2024,
                            width=64, height=64, cfg_scale=7)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 2024 and result.info["all_seeds"] == [2024]
    assert "Seed: 2024" in result.image.info["parameters"]
    assert client.util_get_current_model().startswith("tiny-a")
    assert "tiny-b" in " ".join(client.util_get_model_names())
    png = client.png_info(result.image) if hasattr(client, "png_info") else None
    if png is not None:
        assert "Seed: 2024" in png.info

    authed = webuiapi.WebUIApi(host="127.0.0.1", port=auth_api.port, sampler=sampler, steps=3,
                               username="alice", password="s3cret")
    assert authed.txt2img(prompt="a circle", seed=9, width=64, height=64).info["seed"] == 9


def test_webuiapi_img2img_inpainting_and_extras(api):
    """webuiapi's img2img (with and without a mask) and extra_single_image, unchanged."""
    webuiapi = pytest.importorskip("webuiapi")
    client = webuiapi.WebUIApi(host="127.0.0.1", port=api.port, sampler="DDIM", steps=4)
    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    plain = client.img2img(images=[init], prompt="a blue circle", seed=31, width=64, height=64,
                           denoising_strength=0.5, cfg_scale=7)
    assert plain.image.size == (64, 64) and plain.info["seed"] == 31
    assert "Denoising strength: 0.5" in plain.image.info["parameters"]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = client.img2img(images=[init], mask_image=mask, mask_blur=0, inpaint_full_res=False,
                               prompt="a green triangle", seed=31, width=64, height=64, denoising_strength=0.9)
    out, src, keep = (np.asarray(inpainted.image.convert("RGB"), dtype=np.int16), np.asarray(init, dtype=np.int16),
                      np.asarray(mask) == 0)
    assert np.abs(out[keep] - src[keep]).max() <= 1  # outside the mask: the init image
    assert np.abs(out[~keep] - src[~keep]).mean() > 10
    upscaled = client.extra_single_image(image=init, upscaler_1="Lanczos", upscaling_resize=2)
    assert upscaled.image.size == (128, 128)


def test_webuiapi_embeddings_loras_styles(api):
    """webuiapi's get_embeddings, get_loras, get_prompt_styles and a txt2img with `styles`, unchanged: the
    style's text reaches the infotext, its negative embedding is used (TI hashes); a skipped embedding
    named in a prompt is a warning in `info` and the job runs."""
    webuiapi = pytest.importorskip("webuiapi")
    client = webuiapi.WebUIApi(host="127.0.0.1", port=api.port, sampler="DDIM", steps=3)
    embeddings = client.get_embeddings()
    assert embeddings["loaded"]["tinyneg"]["vectors"] == 2 and embeddings["loaded"]["tinyneg"]["shape"] == 32
    assert "wide" in embeddings["skipped"] and "wide" not in embeddings["loaded"]
    assert [lora["name"] for lora in client.get_loras()] == ["detail"]
    assert client.get_prompt_styles() == [{"name": "Shiny", "prompt": "{prompt}, shiny",
                                           "negative_prompt": "tinyneg, dull"}]
    result = client.txt2img(prompt="a red circle", negative_prompt="blue", styles=["Shiny"], seed=11, width=64,
                            height=64, cfg_scale=7)
    text = result.image.info["parameters"]
    assert text.startswith("a red circle, shiny\nNegative prompt: blue, tinyneg, dull\n"), text
    assert 'TI hashes: "tinyneg: ' in text and result.info["styles"] == ["Shiny"]
    result = client.txt2img(prompt="a red circle, wide", styles=["Nope"], seed=11, width=64, height=64)
    comments = result.info["comments"]
    assert "Style not found: Nope" in comments and "Embedding wide was skipped" in comments, comments
