"""Every sampler of the registry can start part-way down its schedule (img2img), by AUTOMATIC1111's rule.

A1111's `setup_img2img_steps`: t_enc = int(min(strength, 0.999) * steps) and the last t_enc + 1 steps of the
`steps`-step schedule run (k-diffusion path: `sigma_sched = sigmas[steps - t_enc - 1:]`, from
`init + noise * sigma_sched[0]`); with fix_steps the schedule is int(steps / strength) long and exactly `steps`
run. Its timesteps path (DDIM) noises to `sqrt(a_t) init + sqrt(1 - a_t) noise` at timesteps[t_enc].

Most checks drive the samplers with a linear stand-in for the CFG denoiser that records every call (the rule is
about where and how often the model is called, not about the model).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from modules import sd_samplers
from modules.errors import InterruptedException, InvalidParameter
from modules.rng import ImageRNG
from modules.sd_samplers_cfg_denoiser import DenoiserOutput

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

STEPS = 20
STRENGTHS = [round(0.1 * k, 1) for k in range(1, 11)]
ALL_NAMES = [s.name for s in sd_samplers.all_samplers]
# Their steps are not the schedule's: A1111 passes them sigma_sched[0] (and [-2], and the count) only, and
# Restart re-makes its schedule from 20 steps on; the start is the schedule's sigma at the first step that runs.
OWN_STEPS = {"DPM fast", "DPM adaptive", "Restart"}
SHAPE = (4, 8, 8)


class RecordingDenoiser:
    """A linear stand-in for the CFG denoiser (eps = sqrt(1 - alpha) * x_in); records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, timestep, alpha, step):
        self.calls.append(SimpleNamespace(t=float(timestep), alpha=float(alpha), step=step, x=x.detach().clone()))
        eps = (1 - alpha) ** 0.5 * x
        x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
        return DenoiserOutput(eps, eps, x0, {"prompt": x0, "negative": x0}, {"guidance": torch.zeros(x.shape[0])})


def sigma_of(alpha: float) -> float:
    return ((1 - alpha) / alpha) ** 0.5


def init_latent(n: int = 1) -> torch.Tensor:
    """Image i's init latent: the same ramp for every batch size, shifted by 0.1 i."""
    ramp = torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)
    return torch.stack([ramp + 0.1 * i for i in range(n)])


def txt2img_step_starts(model, name, steps):
    """(timestep, alpha) of the first denoiser call of every sampling step of a plain run."""
    den, infos = RecordingDenoiser(), []
    rng = ImageRNG(SHAPE, [5])
    sd_samplers.create_sampler(name, model).sample(den, rng.first(), steps, rng, [infos.append])
    firsts = {}
    for call in den.calls:
        firsts.setdefault(call.step, (call.t, call.alpha))
    return [firsts[i] for i in range(steps)]


def img2img(model, name, strength, steps=STEPS, fix_steps=False, seeds=(5,), hooks=()):
    den, infos = RecordingDenoiser(), []
    rng = ImageRNG(SHAPE, list(seeds))
    noise = rng.first()
    sampler = sd_samplers.create_sampler(name, model)
    out = sampler.sample_img2img(den, init_latent(len(seeds)), noise, steps, strength, rng, [infos.append, *hooks],
                                 fix_steps=fix_steps)
    return SimpleNamespace(sampler=sampler, calls=den.calls, infos=infos, noise=noise, out=out)


def expected_t_enc(strength, steps=STEPS):
    return int(min(strength, 0.999) * steps)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_sampler_runs_the_last_t_enc_plus_one_steps_from_the_right_level(tiny_model, name):
    plain = None if name in OWN_STEPS else txt2img_step_starts(tiny_model, name, STEPS)
    for strength in STRENGTHS:
        t_enc = expected_t_enc(strength)
        run = img2img(tiny_model, name, strength)
        first = run.calls[0]
        k = STEPS - t_enc - 1  # the first step of the full schedule that runs
        if name in OWN_STEPS:
            expected_sigma = run.sampler.sigmas(STEPS)[k]  # A1111's sigma_sched[0]
            assert sigma_of(first.alpha) == pytest.approx(expected_sigma, rel=1e-6), strength
        else:
            t, alpha = plain[k]
            assert (first.t, first.alpha) == pytest.approx((t, alpha), rel=1e-6), strength
        # noised as A1111 does: init + noise * sigma, seen VP-scaled by the model (= sqrt(a) init + sqrt(1 - a) noise)
        sigma = sigma_of(first.alpha)
        torch.testing.assert_close(first.x, (init_latent() + run.noise * sigma) / (1 + sigma ** 2) ** 0.5,
                                   rtol=1e-4, atol=1e-5)
        reported = [info.step for info in run.infos]
        if name == "DPM adaptive":  # it reports the steps it accepts
            assert reported == list(range(len(reported))) and reported
        else:
            assert reported == list(range(t_enc + 1)), strength
            assert all(info.steps == t_enc + 1 for info in run.infos)
            # the denoiser gets the index of the step within the run (prompt schedules follow it)
            assert sorted({c.step for c in run.calls}) == list(range(t_enc + 1))
        assert torch.isfinite(run.out).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_fix_steps_runs_exactly_the_requested_steps(tiny_model, name):
    for strength in (0.3, 0.5, 1.0):
        run = img2img(tiny_model, name, strength, steps=10, fix_steps=True)
        total = int(10 / min(strength, 0.999))
        if name != "DPM adaptive":
            assert [info.step for info in run.infos] == list(range(10)), strength
        if name in OWN_STEPS:
            assert sigma_of(run.calls[0].alpha) == pytest.approx(run.sampler.sigmas(total)[total - 10], rel=1e-6)


def test_literal_cases(tiny_model):
    # Euler (Uniform), 20 steps, strength 0.5: t_enc 10, 11 steps from sigmas[9] of the 20-step schedule
    run = img2img(tiny_model, "Euler", 0.5)
    assert len(run.infos) == 11
    assert sigma_of(run.calls[0].alpha) == pytest.approx(1.764822561011974, rel=1e-3)  # k-diffusion get_sigmas(20)[9]
    # DPM++ 2S a (k-diffusion, Karras), 20 steps, strength 0.5: from karras(20)[9]
    run = img2img(tiny_model, "DPM++ 2S a", 0.5)
    assert len(run.infos) == 11 and sigma_of(run.calls[0].alpha) == pytest.approx(1.4832111271276451, rel=1e-4)
    # strength 1: all 20 steps, from sigma_max
    run = img2img(tiny_model, "Euler a", 1.0)
    assert len(run.infos) == 20 and sigma_of(run.calls[0].alpha) == pytest.approx(14.6146, rel=1e-4)
    # fix_steps, strength 0.5: a 40-step schedule, its last 20 steps, from sigmas[20] of it
    run = img2img(tiny_model, "Euler", 0.5, fix_steps=True)
    assert len(run.infos) == 20
    assert sigma_of(run.calls[0].alpha) == pytest.approx(1.5481600390693766, rel=1e-3)  # get_sigmas(40)[20]


@pytest.mark.parametrize("strength,steps_run,timestep", [(0.1, 3, 101), (0.5, 11, 501), (0.75, 16, 751),
                                                          (1.0, 20, 951)])
def test_ddim_starts_at_timesteps_t_enc_noised_as_the_timesteps_path(tiny_model, strength, steps_run, timestep):
    for name in ("DDIM", "DDIM CFG++", "PLMS"):
        run = img2img(tiny_model, name, strength)
        a = float(tiny_model.alphas_cumprod[timestep])
        assert run.calls[0].t == timestep and run.calls[0].alpha == pytest.approx(a, rel=1e-6)
        torch.testing.assert_close(run.calls[0].x, a ** 0.5 * init_latent() + (1 - a) ** 0.5 * run.noise)
        assert len(run.infos) == steps_run
    # DDIM walks timesteps[t_enc], ..., timesteps[0] = 1 and ends at alphas_cumprod[0]
    run = img2img(tiny_model, "DDIM", strength)
    assert [info.timestep for info in run.infos] == [i * 50 + 1 for i in range(steps_run)][::-1]


def test_ddim_fix_steps(tiny_model):
    run = img2img(tiny_model, "DDIM", 0.5, fix_steps=True)  # 40-step grid (stride 25), its last 20: from 19 * 25 + 1
    assert run.calls[0].t == 476 and len(run.infos) == 20


@pytest.mark.parametrize("name", ALL_NAMES)
def test_each_image_uses_its_own_seed(tiny_model, name):
    one = img2img(tiny_model, name, 0.6, seeds=(7,))
    three = img2img(tiny_model, name, 0.6, seeds=(7, 8, 9))
    torch.testing.assert_close(three.noise[0:1], one.noise)
    torch.testing.assert_close(three.out[0:1], one.out, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(three.out[0], three.out[1])


@pytest.mark.parametrize("name", ["Euler", "DPM++ 2M SDE", "DDIM", "Restart", "LCM", "PLMS", "DPM++ SDE"])
def test_interrupt_stops_part_way_runs(tiny_model, name):
    def stop(info):
        if info.step == 1:
            raise InterruptedException()

    run = img2img(tiny_model, name, 0.5, hooks=[stop])
    assert [info.step for info in run.infos] == [0, 1] and torch.isfinite(run.out).all()


def test_bad_strengths_are_refused(tiny_model):
    for strength, fix in ((1.5, False), (-0.1, False), (0.0, True)):
        with pytest.raises(InvalidParameter) as err:
            img2img(tiny_model, "Euler", strength, fix_steps=fix)
        assert err.value.field == "denoising_strength"
    assert len(img2img(tiny_model, "Euler", 0.0).infos) == 1  # A1111: t_enc 0, the last step only


def test_with_the_real_denoiser_prompt_schedules_follow_the_steps_that_run(tiny_model):
    """A1111 builds prompt schedules for the requested steps and indexes them by the step within the run."""
    from modules.conditioning import TextEncodingCache, get_learned_conditioning, get_multicond_learned_conditioning
    from modules.sd_samplers_cfg_denoiser import CFGDenoiser
    from tests.test_engine import UNetRecorder

    encode = TextEncodingCache(lambda text: tiny_model.get_learned_conditioning(text))
    cond = get_multicond_learned_conditioning(encode, ["[a:b:0.25]"], STEPS)  # "a" for steps 0..5, then "b"
    uncond = get_learned_conditioning(encode, [""], STEPS)
    denoiser = CFGDenoiser(tiny_model, cond, uncond, 7.0, STEPS, encode(""))
    rng = ImageRNG(SHAPE, [3])
    sampler = sd_samplers.create_sampler("Euler", tiny_model)
    infos = []
    with torch.no_grad(), UNetRecorder(tiny_model.unet) as rec:
        sampler.sample_img2img(denoiser, init_latent(), rng.first(), STEPS, 0.5, rng, [infos.append])
    assert len(rec.calls) == 11 and [i.step for i in infos] == list(range(11))
    a, b = tiny_model.get_learned_conditioning("a"), tiny_model.get_learned_conditioning("b")
    for step, (_, hidden) in enumerate(rec.calls):
        torch.testing.assert_close(hidden[1:2], a if step <= 5 else b, rtol=0, atol=0)
    assert all({"prompt", "negative"} <= set(info.branches) for info in infos)
    assert np.isfinite(infos[-1].x.numpy()).all()
