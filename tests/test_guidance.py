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


NEUTRAL_APG = dict(guidance="APG", apg_eta=1.0, apg_norm_threshold=0.0, apg_momentum=0.0)
NEUTRAL_DYNTHRES = dict(guidance="Dynamic thresholding", dynthres_mimic_scale=7.0, dynthres_threshold_percentile=0.9)


@pytest.mark.parametrize("fields", [
    dict(guidance="CFG"), dict(guidance_interval=(0.0, 1.0)), dict(cfg_rescale=0.0),
    dict(negative_start=0.0, negative_end=1.0), dict(s_min_uncond=0.0), dict(negative_weight=1.0),
    dict(nag_scale=1.0, nag_tau=4.0, nag_alpha=1.0), dict(nag_scale=0.0), NEUTRAL_APG, NEUTRAL_DYNTHRES,
    dict(dng_scale=20.0, dng_prior=0.5, apg_eta=1.0, dynthres_mimic_scale=3.0),  # other rules' fields: inert
    dict(nag_follows_dng=True),  # NAG following the posterior: only with NAG on and guidance Dynamic negative
])
def test_neutral_settings_equal_plain_cfg_to_the_bit(tiny_model, plain, fields):
    assert np.array_equal(pixels(run(tiny_model, **fields)), plain)


def test_settings_that_act_change_the_image(tiny_model, plain):
    for fields in [dict(guidance="Perp-Neg"), dict(negative_weight=0.5), dict(negative_start=0.5),
                   dict(guidance_interval=(0.3, 1.0)), dict(cfg_rescale=0.7), dict(s_min_uncond=100.0),
                   dict(guidance="APG"), dict(NEUTRAL_APG, apg_eta=0.0), dict(NEUTRAL_APG, apg_momentum=-0.5),
                   dict(NEUTRAL_APG, apg_norm_threshold=0.5), dict(guidance="Dynamic negative"),
                   dict(NEUTRAL_DYNTHRES, dynthres_mimic_scale=3.0),
                   dict(NEUTRAL_DYNTHRES, dynthres_mimic_scale=5.0, dynthres_threshold_percentile=0.9),
                   dict(nag_scale=3.0)]:
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
    ("nag_scale", 0.5), ("nag_scale", 25.0), ("nag_tau", 0.5), ("nag_alpha", 1.5), ("nag_start", -0.1),
    ("nag_end", 2.0), ("dng_prior", 0.0), ("dng_prior", 0.95), ("dng_scale", -1.0), ("dng_temperature", -1.0),
    ("apg_momentum", 2.0), ("apg_norm_threshold", -1.0), ("apg_eta", "x"), ("dynthres_mimic_mode", "Nope"),
    ("dynthres_cfg_mode", ""), ("dynthres_threshold_percentile", 0.0), ("dynthres_mimic_scale", 0.5),
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


def test_nag_window_must_be_ordered(tiny_model):
    with pytest.raises(InvalidParameter) as err:
        run(tiny_model, nag_scale=3.0, nag_start=0.6, nag_end=0.4)
    assert err.value.field == "nag_start"


# -- APG --------------------------------------------------------------------------------------

def test_apg_update_splits_the_guidance_along_the_prompt_prediction():
    cond, diff = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    full, _ = sd_guidance.apg_update(diff, cond, eta=1.0, norm_threshold=0.0)
    torch.testing.assert_close(full, diff)
    ortho, stats = sd_guidance.apg_update(diff, cond, eta=0.0, norm_threshold=0.0)
    torch.testing.assert_close((ortho * cond).sum((1, 2, 3)), torch.zeros(3), rtol=0, atol=1e-4)
    parallel = diff - ortho
    torch.testing.assert_close(stats["apg_parallel"], parallel.flatten(1).norm(dim=1))
    cos = torch.nn.functional.cosine_similarity(parallel.flatten(1), cond.flatten(1))
    torch.testing.assert_close(cos.abs(), torch.ones(3))  # the removed part lies along cond
    clipped, _ = sd_guidance.apg_update(diff, cond, eta=1.0, norm_threshold=0.5)
    torch.testing.assert_close(clipped.flatten(1).norm(dim=1), torch.full((3,), 0.5))
    small, _ = sd_guidance.apg_update(diff * 1e-3, cond, eta=1.0, norm_threshold=0.5)
    torch.testing.assert_close(small, diff * 1e-3)  # below the threshold: untouched


def test_apg_rule_works_in_pred_x0_space_with_reverse_momentum():
    from modules.sd_samplers_common import to_x0

    x, alpha = torch.randn(2, 4, 6, 6), 0.4
    base, delta = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    settings = sd_guidance.GuidanceSettings(sd_guidance.find_guidance_rule("APG"), 5.0, params=sd_guidance.RuleParams(
        apg_eta=0.0, apg_norm_threshold=0.0, apg_momentum=-0.5))
    ctx = sd_guidance.StepContext(x, alpha, 0, 10, "epsilon", settings, {})
    guided, _ = sd_guidance.apg(base, delta, 5.0, ctx=ctx)
    x0 = lambda e: to_x0(e, x, alpha, "epsilon")  # noqa: E731
    d_x0 = x0(base + delta) - x0(base)
    expected, _ = sd_guidance.apg_update(d_x0, x0(base + delta), 0.0, 0.0)
    torch.testing.assert_close(x0(guided), x0(base + delta) + 4.0 * expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ctx.state["apg_running"], d_x0, rtol=1e-5, atol=1e-5)
    ctx2 = sd_guidance.StepContext(x, alpha, 1, 10, "epsilon", settings, ctx.state)
    sd_guidance.apg(base, delta, 5.0, ctx=ctx2)
    torch.testing.assert_close(ctx.state["apg_running"], d_x0 - 0.5 * d_x0, rtol=1e-5, atol=1e-5)


def test_apg_momentum_state_is_reset_per_image(tiny_model):
    fields = dict(guidance="APG", apg_momentum=-0.5, apg_norm_threshold=2.0, batch_size=1, steps=6)
    first, second = pixels(run(tiny_model, seed=21, **fields)), pixels(run(tiny_model, seed=22, **fields))
    two_batches = pixels(run(tiny_model, seed=21, **{**fields, "n_iter": 2}))
    assert np.abs(two_batches[0] - first[0]).max() <= 1 and np.abs(two_batches[1] - second[0]).max() <= 1
    batch_of_two = pixels(run(tiny_model, seed=21, **{**fields, "batch_size": 2}))
    assert np.abs(batch_of_two[0] - first[0]).max() <= 1 and np.abs(batch_of_two[1] - second[0]).max() <= 1
    no_momentum = pixels(run(tiny_model, seed=22, **{**fields, "apg_momentum": 0.0}))
    assert np.abs(no_momentum - second).max() > 1  # the momentum does act, so the equalities above mean something


# -- dynamic thresholding ----------------------------------------------------------------------

def test_dynamic_threshold_keeps_the_mimic_range_per_channel():
    uncond, rel = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    same = sd_guidance.dynamic_threshold(uncond, rel, 7.0, 7.0, 1.0)
    torch.testing.assert_close(same, uncond + 7.0 * rel, rtol=1e-5, atol=1e-5)
    out = sd_guidance.dynamic_threshold(uncond, rel, 12.0, 4.0, 1.0)
    mimic = uncond + 4.0 * rel
    centred = lambda t: t.flatten(2) - t.flatten(2).mean(2, keepdim=True)  # noqa: E731
    torch.testing.assert_close(centred(out).abs().amax(2), centred(mimic).abs().amax(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.flatten(2).mean(2), (uncond + 12.0 * rel).flatten(2).mean(2), rtol=1e-5, atol=1e-5)
    # the percentile only matters below the CFG scale: at mimic == cfg the clamp sits at the result's own maximum
    torch.testing.assert_close(sd_guidance.dynamic_threshold(uncond, rel, 7.0, 7.0, 0.5), uncond + 7.0 * rel,
                               rtol=1e-5, atol=1e-5)
    clamped = sd_guidance.dynamic_threshold(uncond, rel, 12.0, 4.0, 0.5)
    assert not torch.allclose(clamped, out)
    res_mean = (uncond + 12.0 * rel).flatten(2).mean(2, keepdim=True)
    torch.testing.assert_close((clamped.flatten(2) - res_mean).abs().amax(2), centred(mimic).abs().amax(2),
                               rtol=1e-5, atol=1e-5)


def test_dynamic_thresholding_scale_schedules():
    assert sd_guidance.scheduled_scale(7.0, "Constant", 1.0, 3, 10, 1.0) == 7.0
    assert sd_guidance.scheduled_scale(7.0, "Linear Down", 1.0, 0, 10, 1.0) == 7.0
    assert sd_guidance.scheduled_scale(7.0, "Linear Down", 1.0, 9, 10, 1.0) == 1.0
    assert sd_guidance.scheduled_scale(7.0, "Linear Up", 0.0, 9, 10, 1.0) == 7.0
    for mode in sd_guidance.DYNTHRES_MODES:
        assert 0.0 <= sd_guidance.scheduled_scale(7.0, mode, 0.0, 4, 10, 2.0) <= 7.0 + 1e-9, mode


# -- Dynamic negative guidance -------------------------------------------------------------------

def test_dng_posterior_rises_when_the_step_moves_towards_the_negative():
    x_old, eps_ref, eps_neg = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    a_old, a_new = 0.3, 0.4

    def step_with(eps):
        x0 = (x_old - (1 - a_old) ** 0.5 * eps) / a_old ** 0.5
        return a_new ** 0.5 * x0 + (1 - a_new) ** 0.5 * eps

    p = torch.full((3,), 0.1)
    towards = sd_guidance.dng_posterior_update(p, step_with(eps_neg), x_old, a_old, a_new, eps_ref, eps_neg,
                                               1.0, 0.0, 1e-6, 0.8)
    away = sd_guidance.dng_posterior_update(p, step_with(eps_ref), x_old, a_old, a_new, eps_ref, eps_neg,
                                            1.0, 0.0, 1e-6, 0.8)
    assert torch.all(towards > p) and torch.all(away < p)
    frozen = sd_guidance.dng_posterior_update(p, step_with(eps_neg), x_old, a_old, a_new, eps_ref, eps_neg,
                                              0.0, 0.0, 1e-6, 0.8)
    torch.testing.assert_close(frozen, p)  # temperature 0, no offset: the posterior stays at the prior
    huge = sd_guidance.dng_posterior_update(p, step_with(eps_neg), x_old, a_old, a_new, eps_ref, eps_neg,
                                            1e6, 0.0, 1e-6, 0.8)
    assert torch.all(huge == 0.8)  # clamped at p_max
    torch.testing.assert_close(sd_guidance.dng_negative_scale(torch.tensor([0.5, 0.8]), 3.0),
                               torch.tensor([3.0, 12.0]))


def test_dng_scale_and_posterior_are_reported_per_step(tiny_model):
    infos = []
    run(tiny_model, guidance="Dynamic negative", dng_scale=4.0, dng_prior=0.2, dng_temperature=0.5, hooks=[infos.append])
    assert len(infos) == 8
    for info in infos:
        assert {"dng_scale", "dng_posterior", "guidance"} <= set(info.stats)
        p, lam = info.stats["dng_posterior"], info.stats["dng_scale"]
        assert p.shape == (2,) and lam.shape == (2,)
        torch.testing.assert_close(lam, 4.0 * p / (1 - p))
    torch.testing.assert_close(infos[0].stats["dng_posterior"], torch.full((2,), 0.2))  # the prior at the first step
    assert not torch.equal(infos[-1].stats["dng_posterior"], infos[0].stats["dng_posterior"])  # it moved


def test_dng_static_limit_is_negative_prompting(tiny_model, plain):
    """Temperature 0 and no offset hold the posterior at its prior: lambda = dng_scale * p / (1 - p) is then a
    constant, and with lambda = cfg - 1 the rule is plain CFG (computed on three branches, so within a level)."""
    static = pixels(run(tiny_model, guidance="Dynamic negative", dng_scale=6.0, dng_prior=0.5, dng_temperature=0.0,
                        dng_offset=0.0))
    assert np.abs(static - plain).max() <= 1
    off = pixels(run(tiny_model, guidance="Dynamic negative", dng_scale=0.0))
    empty = pixels(run(tiny_model, negative_prompt=""))
    assert np.abs(off - empty).max() <= 1  # scale 0: no negative at all


def test_dng_state_is_reset_per_image(tiny_model):
    fields = dict(guidance="Dynamic negative", dng_prior=0.3, dng_temperature=0.5, batch_size=1, steps=6)
    first, second = pixels(run(tiny_model, seed=31, **fields)), pixels(run(tiny_model, seed=32, **fields))
    both = pixels(run(tiny_model, seed=31, **{**fields, "n_iter": 2}))
    assert np.abs(both[0] - first[0]).max() <= 1 and np.abs(both[1] - second[0]).max() <= 1


def test_infotext_params_of_the_new_fields():
    p = StableDiffusionProcessingTxt2Img(guidance="APG", apg_eta=0.5, nag_scale=3.0)
    params = sd_guidance.infotext_params(p)
    assert params["APG eta"] == "0.5" and params["NAG scale"] == "3" and "NAG tau" in params
    assert "DNG scale" not in params
    assert sd_guidance.infotext_params(StableDiffusionProcessingTxt2Img()) == {}


@pytest.mark.parametrize("rule", sorted(sd_guidance.RULE_FIELDS))
def test_every_rule_field_round_trips_through_the_infotext(tiny_model, rule):
    """Each field of the picked rule is written to the infotext and read back to the same value (what PNG Info's
    "send to" and the API's `infotext` fill the job with)."""
    changed = {"Dynamic negative": dict(dng_scale=8.0, dng_prior=0.05, dng_temperature=0.5, dng_offset=0.001,
                                        dng_p_min=1e-5, dng_p_max=0.9, nag_follows_dng=True),
               "APG": dict(apg_eta=0.5, apg_norm_threshold=10.0, apg_momentum=-0.25),
               "Dynamic thresholding": dict(dynthres_mimic_scale=5.0, dynthres_threshold_percentile=0.95,
                                            dynthres_mimic_mode="Half Cosine Down", dynthres_mimic_scale_min=1.0,
                                            dynthres_cfg_mode="Power Up", dynthres_cfg_scale_min=2.0,
                                            dynthres_sched_val=4.0)}[rule]
    assert set(changed) == set(sd_guidance.RULE_FIELDS[rule])
    text = run(tiny_model, batch_size=1, steps=2, guidance=rule, **changed).infotexts[0]
    parsed = images.infotext_to_fields(images.parse_generation_parameters(text))
    assert parsed["guidance"] == rule and {k: parsed.get(k) for k in changed} == changed, text
