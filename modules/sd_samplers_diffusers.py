"""AUTOMATIC1111's k-diffusion samplers, as diffusers' schedulers behind the project's Sampler interface.

diffusers already implements Euler, Euler a, LMS, Heun, DPM2, DPM2 a, DPM++ 2M (SDE),
DPM++ SDE, UniPC and PLMS; this module does not re-derive them. It builds each scheduler
from the model's own `scheduler_config` (so the training schedule is the checkpoint's),
overrides what the schedule type decides, and drives it with the loop diffusers'
StableDiffusionPipeline uses, with the project's CFG denoiser in place of the UNet call:

    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)            # VP-scaled: what the denoiser expects
        out  = denoiser(x_in, t, alpha_t, step)          # alpha_t = 1 / (1 + sigma_t^2) of the point
        x    = sched.step(out.model_output, t, x, generator=rng.generators).prev_sample

Stochastic samplers draw from `rng.generators` (one CPU generator per image, the ones the
initial noise came from), so a seed gives the same image at any batch size; DPM++ SDE's
Brownian tree is seeded with the images' seeds, one tree per image, as AUTOMATIC1111 does.

Samplers and schedule types diffusers lacks (DPM++ 2S a and the samplers AUTOMATIC1111 added
later; Euler a on Karras or exponential sigmas; every sampler on the schedule types diffusers
cannot compute) run as k-diffusion-style functions (`modules/sd_samplers_kdiffusion.py`) on
explicit sigmas from `modules/sd_schedulers.py`.

img2img (`sample_img2img`) starts the same loop part-way, as diffusers' img2img pipelines do:
at sampling step k = total - t_enc - 1 (A1111's rule, `img2img_steps`), i.e.
`set_begin_index(k * order)` and `timesteps[k * order:]`, from the init latent noised to that
step's level (k-diffusion's `x0 + sigma * noise`, in the scheduler's own scaling; for PLMS
`sqrt(a_t) x0 + sqrt(1 - a_t) noise` at the starting DDIM timestep, A1111's timesteps path).

Second-order samplers (Heun, DPM2, DPM2 a, DPM++ SDE, DPM++ 2S a) call the denoiser twice
per step, and PLMS twice on its first step: every sampler reports once per sampling step
(as AUTOMATIC1111 does), after the step is complete, with the prediction of the step's last
denoiser call; both calls get the sampling step's index (prompt schedules switch on it).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch

from modules.sd_samplers_common import AfterSampleHook, Sampler, StepInfo, img2img_steps, run_steps
# Moved to modules/sd_samplers_kdiffusion.py; importable from here as before.
from modules.sd_samplers_kdiffusion import (KDiffusionSampler, get_ancestral_step, sample_dpmpp_2s_ancestral,  # noqa: F401
                                            sample_euler_ancestral)

# DPM++ SDE's Brownian tree warns on every run when a query touches its float32-rounded ends (also in diffusers' pipeline).
warnings.filterwarnings("ignore", message=r"Should have t[ab]", category=UserWarning)

# Config overrides for each schedule type (AUTOMATIC1111 name -> diffusers), following the
# A1111 <-> diffusers table in diffusers' scheduler docs. "linspace" spacing gives k-diffusion's
# `get_sigmas(n)` (t from 999 to 0), which is also where A1111's Karras and exponential
# schedules take sigma_max and sigma_min from; SGM Uniform is "trailing".
SCHEDULE_OVERRIDES: dict[str, dict] = {
    "uniform": dict(timestep_spacing="linspace", use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False),
    "karras": dict(timestep_spacing="linspace", use_karras_sigmas=True, use_exponential_sigmas=False,
                   use_beta_sigmas=False),
    "exponential": dict(timestep_spacing="linspace", use_karras_sigmas=False, use_exponential_sigmas=True,
                        use_beta_sigmas=False),
    "sgm_uniform": dict(timestep_spacing="trailing", use_karras_sigmas=False, use_exponential_sigmas=False,
                        use_beta_sigmas=False),
}


@dataclass(frozen=True)
class SchedulerRecipe:
    """How to build one sampler's diffusers scheduler: the class name and fixed config overrides."""

    cls_name: str
    overrides: dict = field(default_factory=dict)


def build_scheduler(model, recipe: SchedulerRecipe, schedule: str, **extra):
    """The diffusers scheduler for `recipe` on `model`'s own training schedule, set to `schedule`."""
    import diffusers

    cls = getattr(diffusers, recipe.cls_name)
    config = dict(model.scheduler_config)
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    return cls.from_config(config, **recipe.overrides, **SCHEDULE_OVERRIDES.get(schedule, {}), **extra)


def _model_alpha(sched, k: int, t, alphas_cumprod: torch.Tensor) -> float:
    """alphas_cumprod of the point the model is evaluated at on scheduler call `k` (after scale_model_input).

    For the sigma-space (k-diffusion) schedulers the input is scaled by 1 / sqrt(1 + sigma^2) = sqrt(alpha),
    so alpha is read off scale_model_input itself (which knows the midpoint sigmas of DPM2 and DPM++ SDE);
    the VP ones (DPM-Solver, UniPC) keep the step's sigma in `sigmas`; PLMS is at an integer timestep.
    """
    if float(sched.init_noise_sigma) > 1:
        return float(sched.scale_model_input(torch.ones(1, device=sched.sigmas.device), t)) ** 2
    sigmas = getattr(sched, "sigmas", None)
    if sigmas is not None:
        return 1.0 / (1.0 + float(sigmas[k]) ** 2)
    return float(alphas_cumprod[int(t)])


def _step_done(sched, k: int) -> bool:
    """Whether scheduler call `k` (0-based, just taken) completed a sampling step."""
    if hasattr(sched, "state_in_first_order"):  # Heun, DPM2, DPM2 a, DPM++ SDE: done after the correction
        return sched.state_in_first_order
    if type(sched).__name__ == "PNDMScheduler":  # PLMS: the first step takes two calls
        return k != 0
    return True


class DiffusersSampler(Sampler):
    """One sampler of the registry, run by a diffusers scheduler (see the module docstring)."""

    def __init__(self, model, name: str, recipe: SchedulerRecipe, schedule: str):
        self.model, self.name, self.recipe, self.schedule = model, name, recipe, schedule

    def make_scheduler(self, steps: int, rng):
        extra = {}
        if self.recipe.cls_name == "DPMSolverSDEScheduler":
            extra["noise_sampler_seed"] = [int(s) for s in rng.seeds]  # one Brownian tree per image
        sched = build_scheduler(self.model, self.recipe, self.schedule, **extra)
        sched.set_timesteps(steps, device=self.model.device)
        return sched

    def sample(self, denoiser, noise: torch.Tensor, steps: int, rng, hooks: list[AfterSampleHook]) -> torch.Tensor:
        sched = self.make_scheduler(steps, rng)
        # The scheduler works in float32 whatever the UNet's dtype (as diffusers' schedulers upcast anyway).
        x = noise.float() * sched.init_noise_sigma
        return self._loop(denoiser, sched, list(sched.timesteps), 0, x, steps, rng, hooks)

    def sample_img2img(self, denoiser, init_latent, noise, steps, denoising_strength, rng, hooks, fix_steps=False):
        """Start at sampling step `total - t_enc - 1` of the `total`-step schedule (see the module docstring)."""
        total, t_enc = img2img_steps(steps, denoising_strength, fix_steps)
        sched = self.make_scheduler(total, rng)
        start = total - t_enc - 1
        init, noise = init_latent.float().to(noise.device), noise.float()
        if type(sched).__name__ == "PNDMScheduler":
            # PLMS's list repeats its second timestep (the first step takes two calls): rebuild it from `start`.
            ddim = [t for i, t in enumerate(sched.timesteps.tolist()) if i != 1][start:]
            sched.timesteps = torch.tensor(ddim[:2] + ddim[1:] if len(ddim) > 1 else ddim, device=sched.timesteps.device)
            alpha = float(self.model.alphas_cumprod[int(ddim[0])])
            x = alpha ** 0.5 * init + (1 - alpha) ** 0.5 * noise
            return self._loop(denoiser, sched, list(sched.timesteps), 0, x, t_enc + 1, rng, hooks)
        begin = start * sched.order
        sched.set_begin_index(begin)
        sigma = float(sched.sigmas[begin])
        x = init + noise * sigma
        if float(sched.init_noise_sigma) <= 1:  # VP schedulers (DPM-Solver, UniPC) keep x / sqrt(1 + sigma^2)
            x = x / (1 + sigma ** 2) ** 0.5
        return self._loop(denoiser, sched, list(sched.timesteps), begin, x, t_enc + 1, rng, hooks)

    def _loop(self, denoiser, sched, timesteps: list, begin: int, x: torch.Tensor, steps: int, rng,
              hooks: list[AfterSampleHook]) -> torch.Tensor:
        """diffusers' denoising loop from scheduler call `begin`, reporting `steps` sampling steps."""
        # Ancestral and SDE steps draw their noise from the images' own generators (randn_tensor takes a list).
        takes_generator = "generator" in inspect.signature(sched.step).parameters
        step_kwargs = {"generator": rng.generators} if takes_generator else {}
        alphas_cumprod = self.model.alphas_cumprod
        dtype = self.model.dtype
        k = begin

        def step_fn(i: int) -> StepInfo:
            nonlocal x, k
            while True:
                t = timesteps[k]
                x_in = sched.scale_model_input(x, t)
                alpha = _model_alpha(sched, k, t, alphas_cumprod)
                out = denoiser(x_in.to(dtype), float(t), alpha, i)
                x = sched.step(out.model_output.float(), t, x, **step_kwargs).prev_sample
                k += 1
                if _step_done(sched, k - begin - 1) or k == len(timesteps):
                    return StepInfo(i, steps, float(t), x, out.pred_x0, out.branches, out.stats)

        result = run_steps(step_fn, steps, hooks)
        return result.to(dtype)
