"""The shipped tiny-shapes model: folder format and a fixed prompt + seed (catches a broken model or loader)."""
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "Stable-diffusion" / "tiny-shapes"
pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="tiny-shapes not exported")


def test_folder_format_and_size():
    idx = json.loads((MODEL / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (MODEL / sub).is_dir(), sub
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024
    assert max(f.stat().st_size for f in files) <= 20 * 1024 * 1024
    sched = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["clip_sample"] is False
    assert sched["num_train_timesteps"] == 1000
    rgb = json.loads((MODEL / "latent_rgb.json").read_text())
    assert len(rgb["factors"]) == 4 and all(len(r) == 3 for r in rgb["factors"]) and len(rgb["bias"]) == 3
    vae = json.loads((MODEL / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 4 and 0 < vae["scaling_factor"]
    for f in ("vocab.json", "merges.txt"):
        assert (MODEL / "tokenizer" / f).read_bytes() == (REPO / "configs" / "clip-tokenizer" / f).read_bytes()


def test_fixed_prompt_and_seed():
    pytest.importorskip("diffusers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "training"))
    import evaluate as E
    import shapes as S

    img = E.generate(MODEL, ["a red square on a black background"], None, [0])[0]
    assert img.shape == (64, 64, 3)
    j = S.judge(img)
    assert (j["color"], j["shape"], j["background"]) == ("red", "square", "black"), j


def test_sampler_rows_merge_and_pass_at_a_usual_step_count():
    """A second samplers run adds a sampler at another step count; a sampler passes when some row
    in 20-30 steps reaches 90%, and a row outside that range does not count."""
    import evaluate as E

    first = {"per_sampler": {"DDIM": dict(sampler="DDIM", steps=20, color_and_shape=1.0),
                             "PLMS": dict(sampler="PLMS", steps=20, color_and_shape=0.889)}}
    merged = E.merge_sampler_rows({}, first, "run 1")
    assert not merged["passed"] and merged["per_sampler"]["PLMS"]["command"] == "run 1"
    far = E.merge_sampler_rows(merged, {"per_sampler": {
        "PLMS, 50 steps": dict(sampler="PLMS", steps=50, color_and_shape=1.0)}}, "run 2")
    assert not far["passed"]
    near = E.merge_sampler_rows(far, {"per_sampler": {
        "PLMS, 25 steps": dict(sampler="PLMS", steps=25, color_and_shape=0.93)}}, "run 3")
    assert near["passed"] and list(near["per_sampler"]) == ["DDIM", "PLMS", "PLMS, 50 steps", "PLMS, 25 steps"]
