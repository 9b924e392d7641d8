"""Guidance rules beyond plain CFG: equalities, UNet work, schedules, and the pure functions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules import images, processing, sd_guidance
from modules.errors import InvalidParameter
from modules.processing import StableDiffusionProcessingTxt2Img
from tests.test_engine import UNetRecorder


def run(model, hooks=(), **kw):
    defaults = dict(prompt="a red circle", negative_prompt="blue square", steps=8, cfg_scale=7.0, seed=11,
                    width=64, height=64, batch_size=2, do_not_save_samples=True)
    return processing.process_images(model, StableDiffusionProcessingTxt2Img(**{**defaults, **kw}), hooks=list(hooks))


def pixels(result):
    return np.stack([np.asarray(im).astype(np.float64) for im in result.images])


@pytest.fixture(scope="module")
def plain(tiny_model):
    return pixels(run(tiny_model))


@pytest.mark.parametrize("fields", [
    dict(guidance="CFG"), dict(guidance_interval=(0.0, 1.0)), dict(cfg_rescale=0.0),
    dict(negative_start=0.0, negative_end=1.0), dict(s_min_uncond=0.0), dict(negative_weight=1.0),
])
def test_neutral_settings_equal_plain_cfg_to_the_bit(tiny_model, plain, fields):
    assert np.array_equal(pixels(run(tiny_model, **fields)), plain)


def test_settings_that_act_change_the_image(tiny_model, plain):
    for fields in [dict(guidance="Perp-Neg"), dict(negative_weight=0.5), dict(negative_start=0.5),
                   dict(guidance_interval=(0.3, 1.0)), dict(cfg_rescale=0.7), dict(s_min_uncond=100.0)]:
        assert not np.array_equal(pixels(run(tiny_model, **fields)), plain), fields


def test_negative_weight_zero_equals_empty_negative(tiny_model):
    assert np.array_equal(pixels(run(tiny_model, negative_weight=0.0)), pixels(run(tiny_model, negative_prompt="")))


def test_negative_weight_interpolates_the_uncond_conditioning(tiny_model):
    with UNetRecorder(tiny_model.unet) as rec:
        run(tiny_model, negative_weight=0.25, batch_size=1, steps=2)
    empty, neg = tiny_model.get_learned_conditioning(""), tiny_model.get_learned_conditioning("blue square")
    torch.testing.assert_close(rec.calls[0][1][0:1], empty + 0.25 * (neg - empty))


def test_perp_neg_with_empty_negative_equals_cfg_with_empty_negative(tiny_model):
    a = pixels(run(tiny_model, guidance="Perp-Neg", negative_prompt=""))
    b = pixels(run(tiny_model, guidance="CFG", negative_prompt=""))
    assert np.abs(a - b).max() <= 1


def test_delayed_negative_is_prompt_editing_of_the_negative(tiny_model):
    assert np.array_equal(pixels(run(tiny_model, negative_start=0.3)),
                          pixels(run(tiny_model, negative_prompt="[:blue square:0.3]")))
    assert np.array_equal(pixels(run(tiny_model, negative_end=0.6)),
                          pixels(run(tiny_model, negative_prompt="[blue square::0.6]")))
    assert np.array_equal(pixels(run(tiny_model, negative_start=0.25, negative_end=0.75)),
                          pixels(run(tiny_model, negative_prompt="[[:blue square:0.25]::0.75]")))


def test_unet_work_one_call_per_step_for_every_rule(tiny_model):
    cases = {
        "CFG": (dict(), [4] * 8),
        "Perp-Neg": (dict(guidance="Perp-Neg"), [6] * 8),  # [empty, prompt, negative] per image
        "interval": (dict(guidance_interval=(0.5, 1.0)), [2] * 4 + [4] * 4),  # outside: prompt only
        "Perp-Neg interval": (dict(guidance="Perp-Neg", guidance_interval=(0.0, 0.5)), [6] * 4 + [2] * 4),
        # NGMS skips the uncond pass on odd steps whose sigma is below s_min_uncond (sigma < 100: all of them)
        "NGMS": (dict(s_min_uncond=100.0), [4, 2] * 4),
        "NGMS low": (dict(s_min_uncond=1.0), None),
    }
    for name, (fields, expected) in cases.items():
        with UNetRecorder(tiny_model.unet) as rec:
            run(tiny_model, **fields)
        batches = [shape[0] for shape, _ in rec.calls]
        assert len(batches) == 8, name
        if expected is not None:
            assert batches == expected, name
        else:  # sigma falls below 1 only in the late steps: early odd steps keep the uncond pass
            assert batches[1] == 4 and batches[-1] == 2, (name, batches)


def test_perp_neg_branches_and_stats_reach_the_hooks(tiny_model):
    infos = []
    run(tiny_model, guidance="Perp-Neg", hooks=[infos.append])
    last = infos[-1]
    assert set(last.branches) == {"prompt", "negative", "empty"}
    assert set(last.stats) == {"parallel_removed", "negative_applied", "guidance"}
    assert all(v.shape == (2,) and torch.all(v >= 0) for v in last.stats.values())


def test_perp_neg_removes_exactly_the_parallel_part():
    base = torch.zeros(2, 4, 2, 2)
    d_pos = torch.randn(2, 4, 2, 2)
    parallel_only = 0.7 * d_pos
    guided, stats = sd_guidance.perp_neg(base, d_pos, 5.0, delta_neg=parallel_only)
    torch.testing.assert_close(guided, 5.0 * d_pos)  # a negative along the prompt does nothing
    torch.testing.assert_close(stats["parallel_removed"], parallel_only.flatten(1).norm(dim=1))
    ortho = torch.randn(2, 4, 2, 2)
    flat_p, flat_o = d_pos.flatten(1), ortho.flatten(1)
    ortho = (flat_o - ((flat_o * flat_p).sum(1) / (flat_p * flat_p).sum(1))[:, None] * flat_p).view_as(d_pos)
    guided, _ = sd_guidance.perp_neg(base, d_pos, 5.0, delta_neg=ortho, negative_weight=2.0)
    torch.testing.assert_close(guided, 5.0 * (d_pos - 2.0 * ortho), rtol=1e-5, atol=1e-5)


def test_perp_neg_pixel_projection_is_per_position():
    d_pos = torch.randn(1, 4, 3, 3)
    d_neg = torch.randn(1, 4, 3, 3)
    guided, _ = sd_guidance.perp_neg(torch.zeros_like(d_pos), d_pos, 1.0, delta_neg=d_neg, projection="pixel")
    removed = d_pos - guided  # the perpendicular part, per position orthogonal to d_pos over the channels
    torch.testing.assert_close((removed * d_pos).sum(1), torch.zeros(1, 3, 3), rtol=0, atol=1e-5)
    image_level, _ = sd_guidance.perp_neg(torch.zeros_like(d_pos), d_pos, 1.0, delta_neg=d_neg)
    assert not torch.allclose(guided, image_level)


def test_cfg_rescale_matches_the_prompt_branch_std():
    positive, guided = torch.randn(3, 4, 8, 8), 5 * torch.randn(3, 4, 8, 8)
    full = sd_guidance.rescale_cfg(guided, positive, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), positive.std(dim=(1, 2, 3)))
    assert torch.equal(sd_guidance.rescale_cfg(guided, positive, 0.0), guided)


@pytest.mark.parametrize("field,value", [
    ("guidance", "Nope"), ("negative_weight", -0.1), ("negative_weight", 5.5), ("negative_start", 1.5),
    ("negative_end", -1), ("guidance_interval", (0.8, 0.2)), ("guidance_interval", (0, 2)),
    ("guidance_interval", "x"), ("cfg_rescale", 1.2), ("s_min_uncond", -1),
])
def test_bad_guidance_values_are_rejected(tiny_model, field, value):
    with pytest.raises(InvalidParameter) as err:
        run(tiny_model, **{field: value})
    assert err.value.field == field


def test_guidance_fields_round_trip_through_the_infotext(tiny_model):
    fields = dict(guidance="Perp-Neg", negative_weight=0.5, negative_start=0.2, negative_end=0.9,
                  guidance_interval=(0.1, 0.8), cfg_rescale=0.3, s_min_uncond=1.5)
    text = run(tiny_model, batch_size=1, steps=4, **fields).infotexts[0]
    assert "Guidance: Perp-Neg, Negative weight: 0.5, Negative start: 0.2, Negative end: 0.9" in text
    parsed = images.infotext_to_fields(images.parse_generation_parameters(text))
    assert {k: parsed[k] for k in fields} == fields
    assert "Guidance" not in run(tiny_model, batch_size=1, steps=2).infotexts[0]
