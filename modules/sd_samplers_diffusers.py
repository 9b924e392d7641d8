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

Samplers diffusers lacks (DPM++ 2S a, and Euler a on Karras or exponential sigmas, which
diffusers' EulerAncestralDiscreteScheduler cannot take) are short k-diffusion-style
functions (`sample_euler_ancestral`, `sample_dpmpp_2s_ancestral`) on the sigmas diffusers'
EulerDiscreteScheduler computes for the same schedule type.

Second-order samplers (Heun, DPM2, DPM2 a, DPM++ SDE, DPM++ 2S a) call the denoiser twice
per step, and PLMS twice on its first step: every sampler reports once per sampling step
(as AUTOMATIC1111 does), after the step is complete, with the prediction of the step's last
denoiser call; both calls get the sampling step's index (prompt schedules switch on it).
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from modules.errors import InterruptedException
from modules.sd_samplers_common import AfterSampleHook, Sampler, StepInfo, call_hooks, run_steps

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
        timesteps = list(sched.timesteps)
        # Ancestral and SDE steps draw their noise from the images' own generators (randn_tensor takes a list).
        takes_generator = "generator" in inspect.signature(sched.step).parameters
        step_kwargs = {"generator": rng.generators} if takes_generator else {}
        alphas_cumprod = self.model.alphas_cumprod
        dtype = self.model.dtype
        # The scheduler works in float32 whatever the UNet's dtype (as diffusers' schedulers upcast anyway).
        x = noise.float() * sched.init_noise_sigma
        k = 0

        def step_fn(i: int) -> StepInfo:
            nonlocal x, k
            while True:
                t = timesteps[k]
                x_in = sched.scale_model_input(x, t)
                alpha = _model_alpha(sched, k, t, alphas_cumprod)
                out = denoiser(x_in.to(dtype), float(t), alpha, i)
                x = sched.step(out.model_output.float(), t, x, **step_kwargs).prev_sample
                k += 1
                if _step_done(sched, k - 1) or k == len(timesteps):
                    return StepInfo(i, steps, float(t), x, out.pred_x0, out.branches, out.stats)

        result = run_steps(step_fn, steps, hooks)
        return result.to(dtype)


# --- k-diffusion-style samplers, for what diffusers does not ship ------------------------------------------


def sigma_to_t(sigma: float, log_sigmas: torch.Tensor) -> float:
    """The (fractional) training timestep of `sigma`: log-linear interpolation, as k-diffusion's DiscreteSchedule."""
    log_sigma = math.log(sigma)
    dists = log_sigma - log_sigmas
    low = int((dists >= 0).cumsum(0).argmax().clamp(max=len(log_sigmas) - 2))
    lo, hi = float(log_sigmas[low]), float(log_sigmas[low + 1])
    w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion: split a step into a deterministic part to sigma_down and fresh noise of size sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def sample_euler_ancestral(model: Callable, x: torch.Tensor, sigmas: list[float], noise: Callable, eta: float,
                           step: Callable[[int, torch.Tensor], None]) -> None:
    """Euler a (k-diffusion `sample_euler_ancestral`); `model(x, sigma, i)` returns denoised."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise() * sigma_up
        step(i, x)


def sample_dpmpp_2s_ancestral(model: Callable, x: torch.Tensor, sigmas: list[float], noise: Callable, eta: float,
                              step: Callable[[int, torch.Tensor], None]) -> None:
    """DPM++ 2S a (k-diffusion `sample_dpmpp_2s_ancestral`): a midpoint step in log-sigma, then noise."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-h / 2) * denoised
            denoised_2 = model(x_2, math.exp(-s), i)
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise() * sigma_up
        step(i, x)


class KDiffusionSampler(Sampler):
    """A k-diffusion-style sampler on the sigmas of diffusers' EulerDiscreteScheduler for the schedule type.

    The model is called on the VP-scaled input x / sqrt(1 + sigma^2) at the fractional
    timestep of sigma, as k-diffusion's CompVisDenoiser does; noise comes from the images'
    own generators (`rng.next()`).
    """

    def __init__(self, model, name: str, function: Callable, schedule: str, eta: float = 1.0):
        self.model, self.name, self.function, self.schedule, self.eta = model, name, function, schedule, eta

    def sample(self, denoiser, noise: torch.Tensor, steps: int, rng, hooks: list[AfterSampleHook]) -> torch.Tensor:
        sched = build_scheduler(self.model, SchedulerRecipe("EulerDiscreteScheduler"), self.schedule)
        sched.set_timesteps(steps)
        sigmas = [float(s) for s in sched.sigmas]
        log_sigmas = ((1 - self.model.alphas_cumprod.double()) / self.model.alphas_cumprod.double()).sqrt().log()
        dtype, device = self.model.dtype, self.model.device
        last: dict = {}

        def model_fn(x: torch.Tensor, sigma: float, i: int) -> torch.Tensor:
            alpha = 1.0 / (1.0 + sigma ** 2)
            t = sigma_to_t(sigma, log_sigmas)
            out = denoiser((x * alpha ** 0.5).to(dtype), t, alpha, i)
            last.update(out=out, t=t)
            return out.pred_x0.float()

        reports: list[StepInfo] = []

        def report(i: int, x: torch.Tensor) -> None:
            out = last["out"]
            info = StepInfo(i, steps, last["t"], x, out.pred_x0, out.branches, out.stats)
            reports.append(info)
            call_hooks(hooks, info)

        try:
            self.function(model_fn, noise.float().to(device) * sigmas[0], sigmas,
                          lambda: rng.next().float(), self.eta, report)
        except InterruptedException:
            info = reports[-1]
            return (info.pred_x0 if info.step < steps - 1 else info.x).to(dtype)
        return reports[-1].x.to(dtype)
