"""DDIM, written as CompVis' `ldm/models/diffusion/ddim.py` writes it: the project's reference sampler.

Song et al. 2020. For S steps the timesteps are t_i = i * (T // S) + 1, walked from high
to low; a_t = alphas_cumprod[t], a_prev is the next lower timestep's, and
alphas_cumprod[0] after the last one. Each step:

    e_t     = e_uncond + scale * (e_cond - e_uncond)        (the denoiser, one UNet call)
    pred_x0 = (x - sqrt(1 - a_t) * e_t) / sqrt(a_t)         (never clipped)
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    x_prev  = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - sigma_t^2) * e_t + sigma_t * noise
"""
from __future__ import annotations

import torch

from modules.sd_samplers_common import AfterSampleHook, Sampler, StepInfo, run_steps


class DDIMSampler(Sampler):
    name = "DDIM"

    def __init__(self, model, eta: float = 0.0):
        self.model = model
        self.eta = eta

    def make_schedule(self, steps: int) -> None:
        """Timesteps and the a_t, a_prev, sigma_t of each, from the model's own alphas_cumprod."""
        alphas_cumprod = self.model.alphas_cumprod.double()
        self.ddim_timesteps = [i * (self.model.num_train_timesteps // steps) + 1 for i in range(steps)]
        self.ddim_alphas = [float(alphas_cumprod[t]) for t in self.ddim_timesteps]
        self.ddim_alphas_prev = [float(alphas_cumprod[0])] + self.ddim_alphas[:-1]
        self.ddim_sigmas = [self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
                            for a, a_prev in zip(self.ddim_alphas, self.ddim_alphas_prev)]

    def p_sample_ddim(self, x: torch.Tensor, index: int, step: int) -> tuple[torch.Tensor, torch.Tensor, object]:
        """One DDIM step at schedule position `index`; returns (x_prev, pred_x0, denoiser output)."""
        a_t, a_prev, sigma_t = self.ddim_alphas[index], self.ddim_alphas_prev[index], self.ddim_sigmas[index]
        out = self.denoiser(x, self.ddim_timesteps[index], a_t, step)
        e_t, pred_x0 = out.eps, out.pred_x0
        dir_xt = (1.0 - a_prev - sigma_t ** 2) ** 0.5 * e_t
        x_prev = a_prev ** 0.5 * pred_x0 + dir_xt
        if sigma_t > 0:
            x_prev = x_prev + sigma_t * self.rng.next()
        return x_prev, pred_x0, out

    def sample(self, denoiser, noise: torch.Tensor, steps: int, rng, hooks: list[AfterSampleHook]) -> torch.Tensor:
        self.make_schedule(steps)
        self.denoiser, self.rng = denoiser, rng
        x = noise

        def step_fn(i: int) -> StepInfo:
            nonlocal x
            index = steps - 1 - i
            x, pred_x0, out = self.p_sample_ddim(x, index, i)
            return StepInfo(i, steps, self.ddim_timesteps[index], x, pred_x0, out.branches, out.stats)

        return run_steps(step_fn, steps, hooks)
