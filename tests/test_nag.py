"""NAG (normalized attention guidance): the processors, their installation and restoration, and what a job sees."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules import processing, sd_attention_guidance as nag, sd_guidance, sd_models
from modules.processing import StableDiffusionProcessingTxt2Img
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


def run(model, hooks=(), **kw):
    defaults = dict(prompt="a red circle", negative_prompt="blue square", steps=6, cfg_scale=7.0, seed=11,
                    width=64, height=64, batch_size=2, do_not_save_samples=True)
    return processing.process_images(model, StableDiffusionProcessingTxt2Img(**{**defaults, **kw}), hooks=list(hooks))


def pixels(result):
    return np.stack([np.asarray(im).astype(np.float64) for im in result.images])


def processors(unet):
    return dict(unet.attn_processors)


# -- the combination itself ---------------------------------------------------------------------

def test_nag_combine_extrapolates_clips_and_blends():
    z_pos, z_neg = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(nag.nag_combine(z_pos, z_neg, 1.0, 2.5, 0.5), z_pos)  # s = 1: no guidance
    torch.testing.assert_close(nag.nag_combine(z_pos, z_pos, 4.0, 2.5, 0.5), z_pos)  # Z- = Z+: nothing to push
    s, tau = 3.0, 1e9  # no clipping, alpha 1: the plain extrapolation Z+ + (s - 1)(Z+ - Z-)
    torch.testing.assert_close(nag.nag_combine(z_pos, z_neg, s, tau, 1.0), z_pos + (s - 1) * (z_pos - z_neg))
    clipped = nag.nag_combine(z_pos, z_neg, 10.0, 1.5, 1.0)
    ratio = clipped.norm(p=1, dim=-1) / z_pos.norm(p=1, dim=-1)
    assert torch.all(ratio <= 1.5 + 1e-5)
    extrapolated = z_pos * 10 - z_neg * 9
    over = extrapolated.norm(p=1, dim=-1) / z_pos.norm(p=1, dim=-1) > 1.5
    assert over.any()
    torch.testing.assert_close(ratio[over], torch.full_like(ratio[over], 1.5))  # clipped to exactly tau
    half = nag.nag_combine(z_pos, z_neg, 10.0, 1.5, 0.25)
    torch.testing.assert_close(half, 0.25 * clipped + 0.75 * z_pos)


@pytest.fixture
def attention():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    attn.set_processor(AttnProcessor2_0())
    return attn


def test_processor_is_the_original_when_nag_has_nothing_to_do(attention):
    hidden, context = torch.randn(3, 10, 16), torch.randn(3, 7, 12)
    expected = attention(hidden, context)
    state = nag.NAGState()
    attention.set_processor(nag.NAGAttnProcessor(attention.processor, state))
    assert torch.equal(attention(hidden, context), expected)  # no call set
    with state.inputs(nag.NAGCall(torch.tensor([], dtype=torch.long), torch.randn(0, 7, 12), 3.0, 2.5, 0.5)):
        assert torch.equal(attention(hidden, context), expected)  # no rows


def test_processor_guides_only_its_rows(attention):
    hidden, context, negative = torch.randn(3, 10, 16), torch.randn(3, 7, 12), torch.randn(1, 5, 12)
    expected = attention(hidden, context)
    state = nag.NAGState()
    attention.set_processor(nag.NAGAttnProcessor(attention.processor, state))
    with state.inputs(nag.NAGCall(torch.tensor([1]), negative, 4.0, 2.5, 0.5)):
        out = attention(hidden, context)
    assert torch.equal(out[[0, 2]], expected[[0, 2]])  # the other rows: bit for bit the original
    assert not torch.allclose(out[1], expected[1])
    # by hand: the same queries against the prompt's and the negative's keys and values, combined before to_out
    q = attention.to_q(hidden[1:2])

    def attend(ctx):
        k, v = attention.to_k(ctx), attention.to_v(ctx)
        split = lambda t: t.view(1, -1, 2, 8).transpose(1, 2)  # noqa: E731
        z = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return z.transpose(1, 2).reshape(1, -1, 16)

    z = nag.nag_combine(attend(context[1:2]), attend(negative), 4.0, 2.5, 0.5)
    torch.testing.assert_close(out[1:2], attention.to_out[1](attention.to_out[0](z)), rtol=1e-5, atol=1e-5)
    with state.inputs(nag.NAGCall(torch.tensor([1]), context[1:2], 4.0, 2.5, 0.5)):  # negative = the prompt
        torch.testing.assert_close(attention(hidden, context), expected, rtol=1e-5, atol=1e-6)


# -- installation and restoration ----------------------------------------------------------------

def test_processors_are_installed_on_attn2_only_and_restored(tiny_model):
    before = processors(tiny_model.unet)
    seen = []

    def hook(info):
        seen.append(processors(tiny_model.unet))

    run(tiny_model, nag_scale=3.0, hooks=[hook])
    during = seen[0]
    assert set(during) == set(before)
    for name, proc in during.items():
        if name.endswith("attn2.processor"):
            assert isinstance(proc, nag.NAGAttnProcessor) and proc.original is before[name]
        else:
            assert proc is before[name]
    after = processors(tiny_model.unet)
    assert all(after[name] is before[name] for name in before) and set(after) == set(before)
    assert nag.active_state(tiny_model.unet) is None


def test_processors_are_restored_after_an_exception(tiny_model):
    before = processors(tiny_model.unet)

    def boom(info):
        if info.step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(tiny_model, nag_scale=3.0, hooks=[boom])
    after = processors(tiny_model.unet)
    assert all(after[name] is before[name] for name in before) and set(after) == set(before)
    assert all(type(p) is type(before[n]) for n, p in after.items())
    assert nag.active_state(tiny_model.unet) is None


def test_nag_off_installs_nothing(tiny_model):
    assert sd_guidance.attention_guidance(tiny_model, StableDiffusionProcessingTxt2Img()).__class__.__name__ \
        == "nullcontext"


def test_denoiser_refuses_nag_without_its_processors(tiny_model):
    from modules.conditioning import get_learned_conditioning, get_multicond_learned_conditioning

    p = StableDiffusionProcessingTxt2Img(prompt="a", negative_prompt="b", nag_scale=3.0, steps=2)
    encode = lambda t: tiny_model.get_learned_conditioning(t)  # noqa: E731
    den = CFGDenoiser(tiny_model, get_multicond_learned_conditioning(encode, ["a"], 2),
                      get_learned_conditioning(encode, ["b"], 2), 7.0, 2, encode(""), sd_guidance.settings_for(p))
    with pytest.raises(RuntimeError, match="attention processors"):
        den(torch.randn(1, 4, 8, 8), 500, 0.3, 0)


# -- what a job sees ---------------------------------------------------------------------------

def test_nag_rows_are_the_prompt_rows_with_a_negative(tiny_model):
    from modules.conditioning import get_learned_conditioning, get_multicond_learned_conditioning

    encode = lambda t: tiny_model.get_learned_conditioning(t)  # noqa: E731
    p = StableDiffusionProcessingTxt2Img(nag_scale=3.0, nag_start=0.5, steps=4)
    cond = get_multicond_learned_conditioning(encode, ["a", "b", "c"], 4)
    uncond = get_learned_conditioning(encode, ["x", "", "y"], 4)
    den = CFGDenoiser(tiny_model, cond, uncond, 7.0, 4, encode(""), sd_guidance.settings_for(p))
    rows, negative = den.nag_inputs_at(2, prompt_only=False)
    assert rows.tolist() == [3, 5]  # batch [uncond x3, prompt x3]; the image with an empty negative gets none
    torch.testing.assert_close(negative, torch.cat([encode("x"), encode("y")]))
    rows, _ = den.nag_inputs_at(2, prompt_only=True)
    assert rows.tolist() == [0, 2]
    assert den.nag_inputs_at(1, prompt_only=False) is None  # before nag_start


def test_nag_with_an_empty_negative_equals_no_nag(tiny_model):
    for cfg in (7.0, 1.0):
        a = pixels(run(tiny_model, negative_prompt="", cfg_scale=cfg, nag_scale=4.0))
        b = pixels(run(tiny_model, negative_prompt="", cfg_scale=cfg))
        assert np.abs(a - b).max() <= 1, cfg


def test_nag_changes_the_image_at_cfg_1(tiny_model):
    plain = pixels(run(tiny_model, cfg_scale=1.0))
    without_negative = pixels(run(tiny_model, cfg_scale=1.0, negative_prompt=""))
    assert np.array_equal(plain, without_negative)  # CFG 1 alone ignores the negative prompt
    guided = pixels(run(tiny_model, cfg_scale=1.0, nag_scale=4.0))
    assert np.abs(guided - plain).mean() > 0.1
    stronger = pixels(run(tiny_model, cfg_scale=1.0, nag_scale=4.0, nag_alpha=1.0))
    assert np.abs(stronger - plain).mean() > np.abs(guided - plain).mean()
    late = pixels(run(tiny_model, cfg_scale=1.0, nag_scale=4.0, nag_start=0.5))
    assert not np.array_equal(late, guided) and not np.array_equal(late, plain)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "Heun"])
def test_nag_works_with_other_samplers(tiny_model, sampler):
    plain = pixels(run(tiny_model, cfg_scale=1.0, sampler_name=sampler, steps=4))
    guided = pixels(run(tiny_model, cfg_scale=1.0, sampler_name=sampler, steps=4, nag_scale=4.0))
    assert np.abs(guided - plain).mean() > 0.1


def test_nag_on_sdxl(tmp_path):
    from tests import tiny_checkpoints as tc

    folder = tc.save_folder(tmp_path / "sdxl", *tc.build_models("sdxl"))
    model = sd_models.load_model(folder, device="cpu")
    before = processors(model.unet)
    kw = dict(prompt="a red circle", negative_prompt="blue", steps=3, cfg_scale=1.0, seed=3, width=64, height=64,
              do_not_save_samples=True)
    plain = pixels(processing.process_images(model, StableDiffusionProcessingTxt2Img(**kw)))
    guided = pixels(processing.process_images(model, StableDiffusionProcessingTxt2Img(**kw, nag_scale=4.0)))
    assert np.abs(guided - plain).mean() > 0.1
    after = processors(model.unet)
    assert all(after[n] is before[n] for n in before)


# -- NAG following the Dynamic negative posterior (nag_follows_dng) ----------------------------------

DNG_NAG = dict(guidance="Dynamic negative", dng_scale=4.0, dng_prior=0.3, dng_temperature=0.5, nag_scale=3.0,
               nag_tau=4.0, nag_alpha=0.75)


def test_dng_nag_scale_is_the_posterior_odds_gate():
    p = torch.tensor([0.3, 0.6, 0.1, 0.0])
    odds = (p / (1 - p)) / (0.3 / 0.7)
    expected = 1 + 2 * torch.minimum(odds, torch.ones(4))
    torch.testing.assert_close(sd_guidance.dng_nag_scale(p, 0.3, 3.0), expected)
    assert sd_guidance.dng_nag_scale(p, 0.3, 3.0)[[0, 1]].tolist() == [3.0, 3.0]  # at or above the prior: all of it
    assert sd_guidance.dng_nag_scale(p, 0.3, 3.0)[3].item() == 1.0  # a posterior at 0: no NAG


def test_nag_following_dng_reports_its_scale_from_the_posterior(tiny_model):
    infos = []
    gated = pixels(run(tiny_model, hooks=[infos.append], nag_follows_dng=True, **DNG_NAG))
    assert len(infos) == 6
    for info in infos:  # the scale NAG used at each step is the gate of the posterior the rule used there
        torch.testing.assert_close(info.stats["nag_scale"],
                                   sd_guidance.dng_nag_scale(info.stats["dng_posterior"], 0.3, 3.0))
    assert infos[0].stats["nag_scale"].tolist() == [3.0, 3.0]  # the prior at the first step
    assert not torch.equal(infos[-1].stats["nag_scale"], infos[0].stats["nag_scale"])
    ungated = pixels(run(tiny_model, **DNG_NAG))
    plain_dng = pixels(run(tiny_model, **{**DNG_NAG, "nag_scale": 1.0}))
    assert np.abs(gated - ungated).mean() > 0.01 and np.abs(gated - plain_dng).mean() > 0.01


def test_nag_following_a_pinned_posterior_is_plain_dng_with_nag(tiny_model):
    """A posterior held at its prior (temperature 0, no offset) keeps the gate open at every step: NAG at
    nag_scale, the same images as without the gate, to the bit; with NAG off the field changes nothing."""
    pinned = dict(DNG_NAG, dng_temperature=0.0, dng_offset=0.0)
    assert np.array_equal(pixels(run(tiny_model, nag_follows_dng=True, **pinned)), pixels(run(tiny_model, **pinned)))
    off = dict(DNG_NAG, nag_scale=1.0)
    assert np.array_equal(pixels(run(tiny_model, nag_follows_dng=True, **off)), pixels(run(tiny_model, **off)))
