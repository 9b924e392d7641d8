"""The txt2img engine on a tiny random-weight SD model: parity with diffusers, schedules, batching, seeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules import processing
from modules.errors import InterruptedException
from modules.processing import StableDiffusionProcessingTxt2Img
from tests.tiny_sd import diffusers_pipeline


def txt2img(**kw) -> StableDiffusionProcessingTxt2Img:
    defaults = dict(prompt="a red circle", negative_prompt="blue square", steps=10, cfg_scale=7.0, seed=5,
                    width=64, height=64, do_not_save_samples=True)
    return StableDiffusionProcessingTxt2Img(**{**defaults, **kw})


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


class UNetRecorder:
    """Records what the real UNet receives, through a forward pre-hook (nothing is replaced)."""

    def __init__(self, unet):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((args[0].shape, kwargs["encoder_hidden_states"].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("steps,cfg", [(10, 7.5), (20, 3.0), (25, 12.0), (8, 1.0)])
def test_ddim_equals_diffusers_pipeline(tiny_model, tiny_model_dir, steps, cfg):
    pipe = diffusers_pipeline(tiny_model_dir)
    ours = pixels(processing.process_images(tiny_model, txt2img(steps=steps, cfg_scale=cfg)).images[0])
    latents = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))[None]
    ref = pipe("a red circle", negative_prompt="blue square", num_inference_steps=steps, guidance_scale=cfg,
               latents=latents, output_type="np").images[0]
    assert np.abs(ours - (ref * 255).round()).mean() < 1.0


def test_negative_prompt_changes_the_image(tiny_model):
    base = pixels(processing.process_images(tiny_model, txt2img(cfg_scale=12)).images[0])
    other = pixels(processing.process_images(tiny_model, txt2img(cfg_scale=12, negative_prompt="green triangle")).images[0])
    same = pixels(processing.process_images(tiny_model, txt2img(cfg_scale=12)).images[0])
    assert np.array_equal(base, same)
    assert np.abs(base - other).mean() > 1.0  # parity with diffusers is exact; a negative moves whole levels


def test_scheduled_prompt_and_negative_switch_at_the_expected_step(tiny_model):
    enc = tiny_model.get_learned_conditioning
    a, b, neg_early, neg_late = enc("a"), enc("b"), enc(""), enc("ugly")
    with UNetRecorder(tiny_model.unet) as rec:
        processing.process_images(tiny_model, txt2img(prompt="[a:b:0.5]", negative_prompt="[:ugly:0.3]", steps=10))
    assert len(rec.calls) == 10
    for step, (_, hidden) in enumerate(rec.calls):
        uncond, cond = hidden[0:1], hidden[1:2]
        # As AUTOMATIC1111: schedule [[5, "a"], [10, "b"]]; 0-based step s uses the first entry with s <= 5,
        # so "a" for steps 0..5 and "b" from step 6; the negative [[3, ""], [10, "ugly"]] switches after step 3.
        torch.testing.assert_close(cond, a if step <= 5 else b, rtol=0, atol=0)
        torch.testing.assert_close(uncond, neg_early if step <= 3 else neg_late, rtol=0, atol=0)


def test_long_prompt_short_negative_one_unet_call_per_step(tiny_model):
    prompt = " ".join(["red"] * 120)
    with UNetRecorder(tiny_model.unet) as rec:
        processing.process_images(tiny_model, txt2img(prompt=prompt, negative_prompt="blue", steps=6))
    assert len(rec.calls) == 6
    shape, hidden = rec.calls[0]
    assert shape[0] == 2 and hidden.shape[:2] == (2, 154)
    # the negative prompt's missing second chunk is the empty prompt's encoding
    torch.testing.assert_close(hidden[0:1, 77:], tiny_model.get_learned_conditioning(""), rtol=0, atol=0)
    torch.testing.assert_close(hidden[0:1, :77], tiny_model.get_learned_conditioning("blue"), rtol=0, atol=0)


def test_identical_texts_are_encoded_once_per_job(tiny_model, monkeypatch):
    seen = []
    real = tiny_model.cond_stage.encode

    def counting(text, clip_skip=None):
        seen.append(text)
        return real(text, clip_skip)

    monkeypatch.setattr(tiny_model.cond_stage, "encode", counting)
    processing.process_images(tiny_model, txt2img(prompt="[x:y:3] AND x", negative_prompt="x", batch_size=2, n_iter=2))
    assert sorted(seen) == ["", "x", "y"]  # "" pads conditionings of unequal length


def test_cfg_scale_one_skips_the_uncond_pass(tiny_model):
    with UNetRecorder(tiny_model.unet) as rec:
        processing.process_images(tiny_model, txt2img(cfg_scale=1.0, steps=4, batch_size=2))
    assert [shape[0] for shape, _ in rec.calls] == [2, 2, 2, 2]


def test_and_parts_are_batched_with_the_uncond(tiny_model):
    with UNetRecorder(tiny_model.unet) as rec:
        result = processing.process_images(tiny_model, txt2img(prompt="a red circle AND a blue square:0.5", steps=4))
    assert [shape[0] for shape, _ in rec.calls] == [3] * 4  # uncond + 2 parts, one call per step
    plain = processing.process_images(tiny_model, txt2img(prompt="a red circle", steps=4))
    assert not np.array_equal(pixels(result.images[0]), pixels(plain.images[0]))


def test_batch_seeds_and_batch_size_independence(tiny_model):
    batch = processing.process_images(tiny_model, txt2img(batch_size=3, seed=100))
    assert batch.all_seeds == [100, 101, 102]
    single = processing.process_images(tiny_model, txt2img(batch_size=1, seed=100))
    assert np.abs(pixels(batch.images[0]) - pixels(single.images[0])).max() <= 1
    third = processing.process_images(tiny_model, txt2img(batch_size=1, seed=102))
    assert np.abs(pixels(batch.images[2]) - pixels(third.images[0])).max() <= 1
    assert not np.array_equal(pixels(batch.images[0]), pixels(batch.images[1]))


def test_random_seed_is_reported_and_reproduces(tiny_model):
    first = processing.process_images(tiny_model, txt2img(seed=-1))
    assert first.seed >= 0 and f"Seed: {first.seed}," in first.infotexts[0]
    again = processing.process_images(tiny_model, txt2img(seed=first.seed))
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_eta_uses_per_image_noise(tiny_model):
    a = processing.process_images(tiny_model, txt2img(eta=1.0, batch_size=2, seed=7))
    b = processing.process_images(tiny_model, txt2img(eta=1.0, batch_size=1, seed=8))
    c = processing.process_images(tiny_model, txt2img(eta=0.0, batch_size=1, seed=8))
    assert np.abs(pixels(a.images[1]) - pixels(b.images[0])).max() <= 1
    assert not np.array_equal(pixels(b.images[0]), pixels(c.images[0]))
    assert "Eta DDIM: 1.0" in b.infotexts[0]


def test_after_sample_hook_sees_every_step_with_branches(tiny_model):
    infos = []
    processing.process_images(tiny_model, txt2img(steps=7, batch_size=2), hooks=[infos.append])
    assert [i.step for i in infos] == list(range(7))
    assert all(i.steps == 7 for i in infos)
    last = infos[-1]
    assert last.pred_x0.shape == last.x.shape == (2, 4, 8, 8)
    assert set(last.branches) == {"prompt", "negative"}
    # CFG is linear: guided = negative + scale * (prompt - negative) holds for the pred_x0s too
    guided = last.branches["negative"] + 7.0 * (last.branches["prompt"] - last.branches["negative"])
    torch.testing.assert_close(last.pred_x0, guided, rtol=1e-4, atol=1e-4)
    assert [i.timestep for i in infos] == [k * (1000 // 7) + 1 for k in range(7)][::-1]


def test_a_hook_can_interrupt_and_the_run_returns_what_it_has(tiny_model):
    steps_seen = []

    def stop_at_three(info):
        steps_seen.append(info.step)
        if info.step == 2:
            raise InterruptedException()

    result = processing.process_images(tiny_model, txt2img(steps=10), hooks=[stop_at_three])
    assert steps_seen == [0, 1, 2]
    assert len(result.images) == 1 and result.images[0].size == (64, 64)


def test_job_state_interrupt_stops_the_whole_job(tiny_model):
    from modules.job_state import JobState

    state = JobState()

    def interrupt_midway(info):
        if info.step == 3:
            state.interrupt()

    result = processing.process_images(tiny_model, txt2img(steps=10, n_iter=3), hooks=[interrupt_midway], state=state)
    assert result.interrupted and len(result.images) == 1
