"""DDIM, written as CompVis' `ldm/models/diffusion/ddim.py` writes it: the project's reference sampler.

Song et al. 2020. For S steps the timesteps are t_i = i * (T // S) + 1, walked from high
to low; a_t = alphas_cumprod[t], a_prev is the next lower timestep's, and
alphas_cumprod[0] after the last one. Each step:

    e_t     = e_uncond + scale * (e_cond - e_uncond)        (the denoiser, one UNet call)
    pred_x0 = (x - sqrt(1 - a_t) * e_t) / sqrt(a_t)         (never clipped)
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    x_prev  = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - sigma_t^2) * e_t + sigma_t * noise

img2img follows AUTOMATIC1111's timesteps path (`sd_samplers_timesteps.sample_img2img`): for
t_enc (`img2img_steps`) the init latent is noised to the timestep t = timesteps[t_enc] as
`sqrt(a_t) x0 + sqrt(1 - a_t) noise` and the steps at timesteps[t_enc], ..., timesteps[0]
run: t_enc + 1 of them. (A1111 hands its loop `timesteps[:t_enc]`, which runs t_enc - 1
steps starting one timestep below the one it noised to; the project runs the t_enc + 1
steps its own `launch_sampling(t_enc + 1)` and its k-diffusion path count, from the level
the latent is at.)

DDIM CFG++ (Chung et al. 2024, A1111 1.10's `ddim_cfgpp`): the guidance scale is
cfg_scale / 12.5 and the renoising direction is the unconditional branch's noise, not the
guided one (see `DDIMCFGPPSampler`).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from modules.errors import InvalidParameter
from modules.sd_samplers_common import AfterSampleHook, Sampler, StepInfo, img2img_steps, run_steps


class DDIMSampler(Sampler):
    name = "DDIM"

    def __init__(self, model, eta: float = 0.0, discard_next_to_last_sigma: bool = False):
        self.model = model
        self.eta = eta
        self.discard = discard_next_to_last_sigma

    def make_schedule(self, steps: int) -> None:
        """Timesteps and the a_t, a_prev, sigma_t of each, from the model's own alphas_cumprod.

        With `discard_next_to_last_sigma` the grid is made for steps + 1 and its lowest
        timestep dropped (the timestep form of dropping the next-to-last sigma): still
        `steps` steps, the last one from the second-lowest timestep straight to the end.
        """
        total = self.model.num_train_timesteps
        count = steps + 1 if self.discard else steps
        if count > total:
            raise InvalidParameter(f"DDIM cannot take more than {total} steps, got {count}", field="steps")
        alphas_cumprod = self.model.alphas_cumprod.double()
        self.ddim_timesteps = [i * (total // count) + 1 for i in range(count)][1 if self.discard else 0:]
        self.ddim_alphas = [float(alphas_cumprod[t]) for t in self.ddim_timesteps]
        self.ddim_alphas_prev = [float(alphas_cumprod[0])] + self.ddim_alphas[:-1]
        self.ddim_sigmas = [self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
                            for a, a_prev in zip(self.ddim_alphas, self.ddim_alphas_prev)]

    def p_sample_ddim(self, x: torch.Tensor, index: int, step: int) -> tuple[torch.Tensor, torch.Tensor, object]:
        """One DDIM step at schedule position `index`; returns (x_prev, pred_x0, denoiser output)."""
        a_t, a_prev, sigma_t = self.ddim_alphas[index], self.ddim_alphas_prev[index], self.ddim_sigmas[index]
        out = self.denoiser(x, self.ddim_timesteps[index], a_t, step)
        e_t, pred_x0 = out.eps, out.pred_x0
        dir_xt = (1.0 - a_prev - sigma_t ** 2) ** 0.5 * self.renoise_direction(x, out, a_t, e_t)
        x_prev = a_prev ** 0.5 * pred_x0 + dir_xt
        if sigma_t > 0:
            x_prev = x_prev + sigma_t * self.rng.next()
        return x_prev, pred_x0, out

    def renoise_direction(self, x: torch.Tensor, out, a_t: float, e_t: torch.Tensor) -> torch.Tensor:
        """The noise x_prev points back along: DDIM's is the guided e_t."""
        return e_t

    def sample(self, denoiser, noise: torch.Tensor, steps: int, rng, hooks: list[AfterSampleHook]) -> torch.Tensor:
        self.make_schedule(steps)
        return self._run(denoiser, noise, steps - 1, rng, hooks)

    def sample_img2img(self, denoiser, init_latent, noise, steps, denoising_strength, rng, hooks, fix_steps=False):
        """A1111's timesteps path (module docstring): noise to timesteps[t_enc], then t_enc + 1 steps."""
        total, t_enc = img2img_steps(steps, denoising_strength, fix_steps)
        self.make_schedule(total)
        a_t = self.ddim_alphas[t_enc]
        x = a_t ** 0.5 * init_latent.to(noise) + (1 - a_t) ** 0.5 * noise
        return self._run(denoiser, x, t_enc, rng, hooks)

    def _run(self, denoiser, x: torch.Tensor, first_index: int, rng, hooks: list[AfterSampleHook]) -> torch.Tensor:
        """The steps at schedule positions first_index, ..., 0, reported as steps 0..first_index."""
        self.denoiser, self.rng = denoiser, rng
        steps = first_index + 1

        def step_fn(i: int) -> StepInfo:
            nonlocal x
            index = first_index - i
            x, pred_x0, out = self.p_sample_ddim(x, index, i)
            return StepInfo(i, steps, self.ddim_timesteps[index], x, pred_x0, out.branches, out.stats)

        return run_steps(step_fn, steps, hooks)


class DDIMCFGPPSampler(DDIMSampler):
    """DDIM CFG++ (Chung et al. 2024), as AUTOMATIC1111 1.10's `ddim_cfgpp`.

    pred_x0 is the guided one at guidance scale lambda = cfg_scale / 12.5 (A1111 maps CFG
    0..12.5 onto CFG++'s 0..1 so), and x_prev points back along the *unconditional* noise:

        x_prev = sqrt(a_prev) * pred_x0_guided + sqrt(1 - a_prev - sigma_t^2) * e_uncond + sigma_t * noise

    e_uncond is recovered from the denoiser's branch predictions, e = (x - sqrt(a_t) x0) /
    sqrt(1 - a_t). "Unconditional" is the branch guidance extrapolates from: under CFG the
    negative prompt's (`branches["negative"]`, as A1111's uncond); under Perp-Neg, whose
    base is the empty prompt and whose negative prompt is a guidance term, the empty
    prompt's (`branches["empty"]`). On steps where the denoiser skipped the uncond pass
    (NGMS, outside the guidance interval) the prompt branch stands in, as A1111's CFG
    denoiser puts the cond output where the uncond one would be.
    """

    name = "DDIM CFG++"
    SCALE_DIVISOR = 12.5

    def sample(self, denoiser, noise, steps, rng, hooks):
        with self._cfgpp_scale(denoiser):
            return super().sample(denoiser, noise, steps, rng, hooks)

    def sample_img2img(self, denoiser, init_latent, noise, steps, denoising_strength, rng, hooks, fix_steps=False):
        with self._cfgpp_scale(denoiser):
            return super().sample_img2img(denoiser, init_latent, noise, steps, denoising_strength, rng, hooks,
                                          fix_steps)

    def renoise_direction(self, x, out, a_t, e_t):
        branches = out.branches
        x0_uncond = branches.get("empty", branches.get("negative", branches.get("prompt")))
        if x0_uncond is None:
            return e_t
        return (x - a_t ** 0.5 * x0_uncond.to(x)) / (1 - a_t) ** 0.5

    class _cfgpp_scale:
        """Run the denoiser at cfg_scale / 12.5 for the duration of the sampling (A1111's `cond_scale_miltiplier`)."""

        def __init__(self, denoiser):
            self.denoiser = denoiser
            self.saved = getattr(denoiser, "guidance", None)

        def __enter__(self):
            if self.saved is not None:
                scale = self.saved.scale / DDIMCFGPPSampler.SCALE_DIVISOR
                if scale == 1.0:  # cfg 12.5: the denoiser would skip the uncond pass at exactly 1, CFG++ needs it
                    scale = math.nextafter(1.0, 0.0)
                self.denoiser.guidance = dataclasses.replace(self.saved, scale=scale)
            return self

        def __exit__(self, *exc):
            if self.saved is not None:
                self.denoiser.guidance = self.saved
            return False
