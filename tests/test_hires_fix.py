"""The hires fix: target sizes, upscalers, the second pass's prompts / negative / sampler / CFG, hooks
and progress across both passes, infotext, validation; on the embedded model, 64 -> 128."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modules import processing, sd_models
from modules.errors import InvalidParameter, SamplerNotFound
from modules.job_state import JobState
from modules.processing import StableDiffusionProcessingTxt2Img

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "models" / "Stable-diffusion" / "tiny-shapes"


def hires(**kw) -> StableDiffusionProcessingTxt2Img:
    defaults = dict(prompt="a red circle", negative_prompt="blue square", steps=4, seed=5, width=64, height=64,
                    enable_hr=True, hr_scale=2.0, denoising_strength=0.6, do_not_save_samples=True)
    return StableDiffusionProcessingTxt2Img(**{**defaults, **kw})


class ApplyModelRecorder:
    """Wraps model.apply_model: what the UNet got at each call (latent shape and the conditioning batch)."""

    def __init__(self, model, monkeypatch):
        self.calls: list[tuple[tuple, torch.Tensor]] = []
        real = model.apply_model

        def record(x, t, cond, image_conditioning=None):
            self.calls.append((tuple(x.shape), cond.clone()))
            return real(x, t, cond, image_conditioning=image_conditioning)

        monkeypatch.setattr(model, "apply_model", record)


@pytest.mark.parametrize("kw,size", [
    (dict(hr_scale=2.0), (128, 128)),
    (dict(hr_scale=1.5), (96, 96)),
    (dict(hr_resize_x=96), (96, 96)),
    (dict(hr_resize_y=128, width=128, height=64), (256, 128)),
    (dict(hr_resize_x=128, hr_resize_y=96), (128, 96)),  # covers 128x128, the latent cropped to 128x96
    (dict(hr_upscaler="Lanczos", hr_scale=1.5), (96, 96)),
    (dict(hr_upscaler="Nearest"), (128, 128)),
    (dict(hr_upscaler="None"), (128, 128)),
    (dict(hr_upscaler="Latent (bicubic antialiased)"), (128, 128)),
    (dict(hr_upscaler="Latent (nearest-exact)", hr_second_pass_steps=2), (128, 128)),
])
def test_target_sizes_and_upscalers(tiny_model, kw, size):
    result = processing.process_images(tiny_model, hires(**kw))
    assert result.images[0].size == size
    assert result.width == kw.get("width", 64)  # AUTOMATIC1111 reports the first pass's size


def test_hooks_see_both_passes(tiny_model):
    state = JobState()
    seen = []

    def hook(info):
        seen.append((info.pass_label, info.step, info.steps, tuple(info.x.shape[-2:]), state.textinfo,
                     state.sampling_steps, state.job_no))

    processing.process_images(tiny_model, hires(steps=5, hr_second_pass_steps=3), hooks=[hook], state=state)
    assert [s[:4] for s in seen] == [("txt2img", i, 5, (8, 8)) for i in range(5)] + \
        [("hires", i, 3, (16, 16)) for i in range(3)]
    assert {s[4] for s in seen[:5]} == {None} and {s[4] for s in seen[5:]} == {"Hires fix"}
    assert [s[5] for s in seen] == [5] * 5 + [3] * 3 and [s[6] for s in seen] == [0] * 5 + [1] * 3
    assert state.textinfo is None


def test_second_pass_uses_hr_prompts_and_negative(tiny_model, monkeypatch):
    """AUTOMATIC1111 once shipped a hires pass that dropped the negative prompt; here the second pass's
    UNet calls get hr_negative_prompt's conditioning (and hr_prompt's), the first pass's its own."""
    enc = tiny_model.get_learned_conditioning
    rec = ApplyModelRecorder(tiny_model, monkeypatch)
    processing.process_images(tiny_model, hires(hr_prompt="a green square", hr_negative_prompt="ugly", steps=3,
                                                hr_second_pass_steps=2))
    first = [c for shape, c in rec.calls if shape[-1] == 8]
    second = [c for shape, c in rec.calls if shape[-1] == 16]
    assert len(first) == 3 and len(second) == 2
    for cond in first:
        torch.testing.assert_close(cond[0:1], enc("blue square"), rtol=0, atol=0)
        torch.testing.assert_close(cond[1:2], enc("a red circle"), rtol=0, atol=0)
    for cond in second:
        torch.testing.assert_close(cond[0:1], enc("ugly"), rtol=0, atol=0)
        torch.testing.assert_close(cond[1:2], enc("a green square"), rtol=0, atol=0)
    rec.calls.clear()
    processing.process_images(tiny_model, hires(steps=2, hr_second_pass_steps=2))  # by default: the first pass's
    for shape, cond in rec.calls:
        torch.testing.assert_close(cond[0:1], enc("blue square"), rtol=0, atol=0)


def test_hr_cfg_sampler_and_schedule(tiny_model, monkeypatch):
    rec = ApplyModelRecorder(tiny_model, monkeypatch)
    result = processing.process_images(tiny_model, hires(hr_cfg=1.0, hr_sampler_name="Euler", hr_scheduler="Karras",
                                                         hr_second_pass_steps=3, steps=2))
    assert [shape[0] for shape, _ in rec.calls] == [2, 2, 1, 1, 1]  # CFG 1 in the hires pass: no uncond rows
    text = result.infotexts[0]
    assert "Hires sampler: Euler, Hires schedule type: Karras, Hires CFG Scale: 1" in text
    # DDIM after a Karras first pass: the carried-over schedule type the hires sampler cannot take is Automatic
    ok = processing.process_images(tiny_model, hires(sampler_name="Euler", scheduler="Karras", hr_sampler_name="DDIM",
                                                     steps=2, hr_second_pass_steps=2))
    assert "Hires sampler: DDIM, Hires schedule type: Automatic" in ok.infotexts[0]


def test_infotext_round_trip(tiny_model):
    p = hires(hr_resize_x=128, hr_resize_y=96, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=3,
              hr_prompt="a blue circle", hr_negative_prompt="red, ugly", hr_sampler_name="Euler a", hr_cfg=5.0,
              denoising_strength=0.55, steps=3)
    result = processing.process_images(tiny_model, p)
    text = result.infotexts[0]
    assert ("Denoising strength: 0.55, RNG: CPU, Hires resize: 128x96, Hires steps: 3, Hires upscaler: Latent (bicubic), "
            "Hires sampler: Euler a, Hires prompt: a blue circle, Hires negative prompt: \"red, ugly\", "
            "Hires CFG Scale: 5") in text
    fields = processing.infotext_fields(text)
    expected = dict(enable_hr=True, denoising_strength=0.55, hr_resize_x=128, hr_resize_y=96,
                    hr_upscaler="Latent (bicubic)", hr_second_pass_steps=3, hr_prompt="a blue circle",
                    hr_negative_prompt="red, ugly", hr_sampler_name="Euler a", hr_cfg=5.0)
    assert {k: fields[k] for k in expected} == expected
    by_scale = processing.process_images(tiny_model, hires(hr_scale=1.5, steps=2))
    assert "Hires upscale: 1.5" in by_scale.infotexts[0] and "Hires upscaler" not in by_scale.infotexts[0]
    assert processing.infotext_fields(by_scale.infotexts[0])["hr_scale"] == 1.5
    assert by_scale.js()["denoising_strength"] == 0.6


def test_interrupted_first_pass_skips_the_hires_pass(tiny_model):
    state = JobState()
    seen = []

    def hook(info):
        seen.append(info.pass_label)
        if info.step == 1:
            state.interrupt()

    result = processing.process_images(tiny_model, hires(steps=4), hooks=[hook], state=state)
    assert seen == ["txt2img", "txt2img"] and result.interrupted
    assert result.images[0].size == (64, 64)


@pytest.mark.parametrize("field,kw", [
    ("hr_scale", dict(hr_scale=4.5)),
    ("hr_scale", dict(hr_scale=0.5)),
    ("hr_scale", dict(width=1024, height=1024, hr_scale=2.5)),  # 2560 px: over the engine's 2048
    ("hr_resize_x", dict(hr_resize_x=4096)),
    ("hr_resize_x", dict(hr_resize_x=2048, hr_resize_y=0, width=64, height=128)),  # 2048 x 4096
    ("hr_upscaler", dict(hr_upscaler="R-ESRGAN 4x+")),
    ("denoising_strength", dict(denoising_strength=1.2)),
    ("hr_second_pass_steps", dict(hr_second_pass_steps=-1)),
    ("hr_cfg", dict(hr_cfg=0.0)),
    ("hr_scheduler", dict(hr_scheduler="Sideways")),
])
def test_validation(tiny_model, field, kw):
    with pytest.raises(InvalidParameter) as e:
        processing.process_images(tiny_model, hires(**kw))
    assert e.value.field == field and e.value.status_code == 422
    if field == "hr_upscaler":
        assert "Latent (antialiased)" in str(e.value) and "Lanczos" in str(e.value)


def test_unknown_hires_sampler_is_a_404(tiny_model):
    with pytest.raises(SamplerNotFound) as e:
        processing.process_images(tiny_model, hires(hr_sampler_name="k_nope"))
    assert e.value.field == "hr_sampler_name" and e.value.status_code == 404


def test_hires_off_ignores_its_fields(tiny_model):
    plain = processing.process_images(tiny_model, hires(enable_hr=False, hr_scale=9, hr_upscaler="nope"))
    assert plain.images[0].size == (64, 64) and "Hires" not in plain.infotexts[0]
    assert "Denoising strength" not in plain.infotexts[0] and plain.js()["denoising_strength"] is None


def test_embedded_hires_keeps_colour_and_shape(monkeypatch):
    """64 -> 128 on the embedded model: the second pass runs at 128 px with the hires negative prompt's
    conditioning, and the result, downscaled to 64 px, keeps the first pass's colour and shape."""
    from PIL import Image

    from training.shapes import judge

    model = sd_models.load_model(EMBEDDED, device="cpu")
    prompt = "a red circle on a white background"
    first = processing.process_images(model, StableDiffusionProcessingTxt2Img(
        prompt=prompt, steps=20, seed=2, width=64, height=64, do_not_save_samples=True))
    rec = ApplyModelRecorder(model, monkeypatch)
    result = processing.process_images(model, StableDiffusionProcessingTxt2Img(
        prompt=prompt, hr_negative_prompt="green", steps=20, seed=2, width=64, height=64,
        enable_hr=True, hr_scale=2, denoising_strength=0.5, hr_second_pass_steps=10, do_not_save_samples=True))
    assert result.images[0].size == (128, 128)
    f = model.vae_scale_factor
    second = [c for shape, c in rec.calls if shape[-1] == 128 // f]
    assert len(second) == 10
    for cond in second:
        torch.testing.assert_close(cond[0:1], model.get_learned_conditioning("green"), rtol=0, atol=0)
    before = judge(np.asarray(first.images[0]))
    after = judge(np.asarray(result.images[0].resize((64, 64), Image.Resampling.LANCZOS)))
    assert before["color"] is not None and before["shape"] is not None
    assert (after["color"], after["shape"], after["background"]) == ("red", "circle", before["background"])
