"""The CFG-distilled LoRA of the embedded model (training/train_cfg_distill.py): what it ships and how it is made.

At CFG 1 the shipped LoRA must sample what the base model samples at CFG 7 (what a Turbo / LCM-style
LoRA promises), much closer than the base model at CFG 1 does; the trainer is deterministic and
resumable like the project's other trainers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))
MODEL_DIR = REPO / "models" / "Stable-diffusion" / "tiny-shapes"
LORA_DIR = REPO / "models" / "Lora"
LORA = "tiny-shapes-cfg-distill"


def images(model, prompt: str, cfg: float, n: int = 8, steps: int = 20) -> np.ndarray:
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, negative_prompt="", steps=steps, cfg_scale=cfg, seed=500, sampler_name="DDIM",
        width=model.default_size, height=model.default_size, batch_size=n, do_not_save_samples=True)
    res = processing.process_images(model, p)
    assert not res.comments, res.comments
    return np.stack([np.asarray(im, dtype=np.int16) for im in res.images]), res


@pytest.fixture(scope="module")
def shapes_model():
    from modules import sd_models

    return sd_models.load_model(MODEL_DIR, device="cpu", lora_dir=LORA_DIR)


def test_shipped_lora_at_cfg_1_samples_what_the_base_model_samples_at_cfg_7(shapes_model):
    import shapes as S

    prompt = "a circle on a white background"
    base7, _ = images(shapes_model, prompt, 7.0)
    base1, _ = images(shapes_model, prompt, 1.0)
    lora1, res = images(shapes_model, f"{prompt} <lora:{LORA}:1>", 1.0)
    assert f'Lora hashes: "{LORA}: ' in res.infotexts[0]

    def right(imgs):  # what the prompt asks, judged from pixels
        return sum((j["shape"], j["background"]) == ("circle", "white")
                   for j in (S.judge(im.astype(np.uint8)) for im in imgs))

    assert right(lora1) == right(base7) == 8 > right(base1), (right(lora1), right(base7), right(base1))
    near, far = np.abs(lora1 - base7).mean(), np.abs(base1 - base7).mean()
    assert near < 0.8 * far, (near, far)
    # the LoRA is gone after its job: the base model at CFG 1 again, bit for bit
    again, _ = images(shapes_model, prompt, 1.0)
    assert np.array_equal(again, base1)


def test_training_is_deterministic_and_resumable(tmp_path):
    import train_cfg_distill as D
    from modules import sd_models
    from safetensors.torch import load_file

    def run(work, steps, stop_after=None, resume=False):
        model = sd_models.load_model(MODEL_DIR, device="cpu")
        res = D.train(model, steps, rank=2, batch=2, pool=8, work_dir=work, resume=resume, stop_after=stop_after)
        return model, res

    model, straight = run(tmp_path / "a", 3)
    D.export(model, tmp_path / "a.safetensors", {"rank": 2})
    run(tmp_path / "b", 3, stop_after=1)
    model, resumed = run(tmp_path / "b", 3, resume=True)
    D.export(model, tmp_path / "b.safetensors", {"rank": 2})
    assert straight["step"] == resumed["step"] == 3 and straight["losses"] == resumed["losses"]
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(k.startswith("unet.") and ".lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it learnt something
