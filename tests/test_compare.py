"""Compare without negative (webui/compare.py): the variant job, the difference images,
`POST /sdapi/v1/txt2img-compare` (in-process FastAPI app on the tiny random model), and on the
embedded tiny-shapes model the effect the button exists to show: with the negative `red`, red
circles go away (judged from pixels by training/shapes.py).
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules.errors import InvalidParameter
from modules.processing import StableDiffusionProcessingTxt2Img
from webui import compare

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "models" / "Stable-diffusion" / "tiny-shapes"


def test_variant_changes_one_thing_only():
    p = StableDiffusionProcessingTxt2Img(prompt="a circle", negative_prompt="red", seed=-1, steps=7, guidance="CFG")
    fixed = compare.fix_seeds(p)
    assert fixed.seed != -1 and fixed.subseed != -1 and p.seed == -1
    q = compare.variant(fixed, "no negative")
    assert (q.negative_prompt, q.prompt, q.seed, q.steps, q.guidance) == ("", "a circle", fixed.seed, 7, "CFG")
    r = compare.variant(fixed, "perp-neg pixel")
    assert (r.guidance, r.negative_prompt) == ("Perp-Neg pixel", "red")
    assert compare.resolve_mode("Without negative prompt") == compare.WITHOUT_NEGATIVE
    assert compare.compare_modes()[0] == compare.WITHOUT_NEGATIVE and "Perp-Neg" in compare.compare_modes()
    with pytest.raises(InvalidParameter, match="compare_with"):
        compare.resolve_mode("sharper")


def test_difference_is_zero_for_equal_images_and_stretched_on_request():
    a = Image.new("RGB", (4, 4), (10, 20, 30))
    b = a.copy()
    b.putpixel((1, 1), (14, 20, 30))
    assert np.asarray(compare.difference(a, a)).max() == 0 and compare.mean_difference(a, a) == 0
    d = np.asarray(compare.difference(a, b))
    assert d[1, 1].tolist() == [4, 0, 0] and d.sum() == 4
    assert np.asarray(compare.difference(a, b, amplify=True))[1, 1].tolist() == [255, 0, 0]


def api_client(model, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modules import cmd_args
    from webui.api import Api
    from webui.context import WebUIContext

    args = cmd_args.parse_args(["--precision", "full",
                                "--ckpt", str(model.path), "--outdir-samples", str(tmp_path / "outputs"),
                                "--ui-settings-file", str(tmp_path / "config.json")])
    app = FastAPI()
    Api(app, WebUIContext(args, model))
    return TestClient(app)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


SMALL = {"prompt": "a red circle on a white background", "steps": 4, "cfg_scale": 7, "width": 64, "height": 64,
         "seed": -1, "batch_size": 2, "sampler_name": "DDIM"}


def test_compare_endpoint_returns_both_runs_and_their_difference(tiny_model, tmp_path):
    client = api_client(tiny_model, tmp_path)
    r = client.post("/sdapi/v1/txt2img-compare", json={**SMALL, "negative_prompt": "blue square"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["compare_with"] == compare.WITHOUT_NEGATIVE
    assert len(body["images"]) == len(body["images_compare"]) == len(body["differences"]) == 2
    info, other = json.loads(body["info"]), json.loads(body["info_compare"])
    assert info["all_seeds"] == other["all_seeds"] and info["seed"] != -1  # one random seed, drawn once
    assert info["negative_prompt"] == "blue square" and other["negative_prompt"] == ""
    assert "Negative prompt: blue square" in decode(body["images"][0]).info["parameters"]
    assert all(m > 0 for m in body["mean_differences"])
    assert np.asarray(decode(body["differences"][0])).max() > 0
    a, b = decode(body["images"][1]), decode(body["images_compare"][1])
    assert np.array_equal(np.asarray(decode(body["differences"][1])), np.asarray(compare.difference(a, b)))

    # the negative already empty: the rerun is the same job, the difference exactly zero
    r = client.post("/sdapi/v1/txt2img-compare", json={**SMALL, "negative_prompt": "", "compare_with": "no negative"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mean_differences"] == [0.0, 0.0]
    assert all(np.asarray(decode(d)).max() == 0 for d in body["differences"])

    # another guidance rule
    r = client.post("/sdapi/v1/txt2img-compare", json={**SMALL, "batch_size": 1, "negative_prompt": "blue",
                                                       "compare_with": "Perp-Neg"})
    assert r.status_code == 200, r.text
    assert r.json()["compare_with"] == "Perp-Neg" and "Guidance: Perp-Neg" in json.loads(r.json()["info_compare"])[
        "infotexts"][0]

    r = client.post("/sdapi/v1/txt2img-compare", json={**SMALL, "compare_with": "sharper"})
    assert r.status_code == 422 and r.json()["field"] == "compare_with"
    r = client.post("/sdapi/v1/txt2img-compare", json={**SMALL, "script_name": "x/y/z plot"})
    assert r.status_code == 422 and r.json()["field"] == "script_name"


@pytest.mark.skipif(not (EMBEDDED / "model_index.json").is_file(),
                    reason="the embedded model models/Stable-diffusion/tiny-shapes is not there (not trained yet)")
def test_without_the_negative_red_circles_come_back_on_the_embedded_model(tmp_path):
    """Prompt `a circle on a white background`, negative `red`, 8 seeds: judged from pixels,
    the run without the negative has red circles where the run with it has (nearly) none."""
    from modules import sd_models
    from training.shapes import judge

    model = sd_models.load_model(EMBEDDED, device="cpu")
    client = api_client(model, tmp_path)
    r = client.post("/sdapi/v1/txt2img-compare", json={
        "prompt": "a circle on a white background", "negative_prompt": "red", "compare_with": "no negative",
        "seed": 100, "batch_size": 8, "steps": 20, "cfg_scale": 7, "sampler_name": "DDIM"})
    assert r.status_code == 200, r.text
    body = r.json()

    def judged(images: list[str]) -> list[dict]:
        return [judge(np.asarray(decode(b).convert("RGB"))) for b in images]

    with_negative, without = judged(body["images"]), judged(body["images_compare"])
    red_circles = [sum(v["color"] == "red" and v["shape"] == "circle" for v in run) for run in (with_negative, without)]
    red = [sum(v["color"] == "red" for v in run) for run in (with_negative, without)]
    # seeds 100-107 on the shipped model: 0 red circles (0 red objects) with the negative, 4 (4) without
    assert red_circles[1] > red_circles[0] and red_circles[0] <= 1, red_circles
    assert red[1] > red[0] and red[0] <= 1, red


def test_a_compare_rerun_is_the_sessions_job_but_keeps_its_files(tmp_path):
    """Compare registers its rerun like a job (Interrupt stops it, one job per session) without
    deleting the result it is compared with."""
    from modules.job_state import JobState
    from webui.ui_common import SessionJobs

    jobs, files = SessionJobs(), tmp_path / "job"
    files.mkdir()
    first = JobState()
    assert jobs.start("k", first, files)
    jobs.finish("k", first)
    rerun = JobState()
    assert jobs.start("k", rerun)  # no job folder of its own
    assert not jobs.start("k", JobState(), tmp_path / "other")  # one at a time
    assert jobs.interrupt("k") and rerun.interrupted
    jobs.finish("k", rerun)
    assert files.exists()


def test_without_styles_and_without_lora_rerun_the_plain_job(tiny_model_dir, tmp_path):
    """Compare "Without styles" reruns the prompts as sent (before the styles), "Without LoRA" the prompt with
    its `<lora:...>` tags taken out: each rerun equals the plain job bit for bit, and differs from the result
    where the style or the LoRA acted."""
    from fastapi.testclient import TestClient

    from modules import cmd_args, sd_models
    from tests.test_lora import kohya_lora, save

    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    model = sd_models.load_model(tiny_model_dir, device="cpu", lora_dir=lora_dir)
    save(kohya_lora(model.unet, {"lora_te_": model.cond_stage.text_encoder}), lora_dir / "tiny.safetensors")
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nSquare,"{prompt}, blue square","red"\n')
    args = cmd_args.parse_args(["--precision", "full",
                                "--ckpt", str(model.path), "--outdir-samples", str(tmp_path / "outputs"),
                                "--ui-settings-file", str(tmp_path / "config.json"), "--styles-file", str(styles)])
    client = TestClient(_app(args, model))
    job = {**SMALL, "seed": 5, "negative_prompt": "green"}

    def pixels(images):
        return [np.asarray(decode(b).convert("RGB")) for b in images]

    def plain(**fields):
        r = client.post("/sdapi/v1/txt2img", json={**job, **fields})
        assert r.status_code == 200, r.text
        return pixels(r.json()["images"])

    r = client.post("/sdapi/v1/txt2img-compare", json={**job, "styles": ["Square"], "compare_with": "no styles"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["compare_with"] == compare.WITHOUT_STYLES
    assert json.loads(body["info"])["negative_prompt"] == "green, red"  # the style acted on both prompts
    assert json.loads(body["info_compare"])["prompt"] == SMALL["prompt"]
    styled, rerun = pixels(body["images"]), pixels(body["images_compare"])
    assert all(np.array_equal(a, b) for a, b in zip(rerun, plain()))
    assert all(m > 0 for m in body["mean_differences"])
    assert all(np.array_equal(a, b) for a, b in zip(styled, plain(prompt=SMALL["prompt"] + ", blue square",
                                                                  negative_prompt="green, red")))

    r = client.post("/sdapi/v1/txt2img-compare", json={**job, "prompt": SMALL["prompt"] + " <lora:tiny:1>",
                                                       "compare_with": "Without LoRA"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Lora hashes" in json.loads(body["info"])["infotexts"][0]
    assert "Lora hashes" not in json.loads(body["info_compare"])["infotexts"][0]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(body["images_compare"]), plain()))
    assert all(m > 0 for m in body["mean_differences"])
    # a job without styles or LoRA: the rerun is the same job
    r = client.post("/sdapi/v1/txt2img-compare", json={**job, "compare_with": "no styles"})
    assert r.status_code == 200 and r.json()["mean_differences"] == [0.0, 0.0]


def _app(args, model):
    from fastapi import FastAPI

    from webui.api import Api
    from webui.context import WebUIContext

    app = FastAPI()
    Api(app, WebUIContext(args, model))
    return app


def test_variant_without_styles_and_lora_changes_only_the_prompts():
    p = StableDiffusionProcessingTxt2Img(prompt="a cat, sharp <lora:x:0.5>", negative_prompt="blurry", seed=3,
                                         hr_prompt="<lora:y:1> a cat")
    q = compare.variant(p, "no lora")
    assert (q.prompt, q.hr_prompt, q.negative_prompt, q.seed) == ("a cat, sharp ", " a cat", "blurry", 3)
    r = compare.variant(p, "Without styles", unstyled=("a cat", ""))
    assert (r.prompt, r.negative_prompt, r.seed) == ("a cat", "", 3)
    assert compare.variant(p, "no styles") == p
    assert compare.compare_modes()[:3] == [compare.WITHOUT_NEGATIVE, compare.WITHOUT_STYLES, compare.WITHOUT_LORA]
