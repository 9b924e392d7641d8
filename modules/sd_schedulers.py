"""Schedule types: how a sampler's `steps` become the noise levels (sigmas) it walks down.

AUTOMATIC1111 1.10's list (its `modules/sd_schedulers.py`), with its names, labels,
aliases, `default_rho` (-1: the function takes no rho) and `need_inner_model`. Each
schedule is a short function `(n, sigma_min, sigma_max, inner, ...)` returning the
sigmas from high to low, ending in 0 (KL Optimal, as in A1111, ends at sigma_min), where
`inner` is the model's discrete training schedule (`ModelSigmas`, k-diffusion's
`DiscreteSchedule`: sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])) and
sigma_min, sigma_max its ends, as A1111 passes them (`model_wrap.sigmas[0]`, `[-1]`).

One difference, on purpose: DDIM gives exactly n steps (training timesteps
`1 + i * (T // n)`, the project's DDIM sampler's), where A1111 walks
`range(1, T, T // n)` and so takes one step more when n does not divide T (30 steps: 31).

`Automatic` has no function: it means the sampler's own default (its registry entry's
`options["scheduler"]`, else Uniform), resolved in `modules/sd_samplers.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from modules.errors import InvalidParameter


class ModelSigmas:
    """A discrete training schedule seen in sigma space (k-diffusion's `DiscreteSchedule`).

    `sigmas[t]` for t = 0..T-1, increasing; `sigma_to_t` and `t_to_sigma` interpolate
    linearly in log sigma, as k-diffusion does.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        """The fractional table index of `sigma`."""
        log_sigma = math.log(sigma)
        dists = log_sigma - self.log_sigmas
        low = int((dists >= 0).cumsum(0).argmax().clamp(max=len(self.log_sigmas) - 2))
        lo, hi = float(self.log_sigmas[low]), float(self.log_sigmas[low + 1])
        w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(self, t: float) -> float:
        low, high = math.floor(t), math.ceil(t)
        w = t - low
        return math.exp((1 - w) * float(self.log_sigmas[low]) + w * float(self.log_sigmas[high]))

    def get_sigmas(self, n: int) -> list[float]:
        """k-diffusion's `get_sigmas(n)`: n table positions evenly from the top to 0, then 0."""
        top = len(self.sigmas) - 1
        return [self.t_to_sigma(float(t)) for t in np.linspace(top, 0, n)] + [0.0]

    def model_timestep(self, sigma: float) -> float:
        """The timestep the UNet is told for a point at `sigma`."""
        return self.sigma_to_t(sigma)

    def scale_output(self, sigma: float, denoised: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return denoised


class LCMSigmas(ModelSigmas):
    """A1111's `LCMCompVisDenoiser`: LCM's 50 original timesteps (T-1, T-1-20, ..., 19).

    Sigmas are looked up in that 50-entry table, the UNet is told the nearest of those
    timesteps, and the output gets LCM's consistency boundary scalings (sigma_data 0.5,
    timestep scaled by 10).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, original_steps: int = 50):
        total = len(alphas_cumprod)
        self.skip = total // original_steps
        valid = [float(alphas_cumprod[total - 1 - x * self.skip]) for x in range(original_steps)][::-1]
        super().__init__(torch.tensor(valid, dtype=torch.float64))

    def sigma_to_t(self, sigma: float) -> float:
        index = int((math.log(sigma) - self.log_sigmas).abs().argmin())
        return float(index * self.skip + self.skip - 1)

    def t_to_sigma(self, t: float) -> float:
        index = min(max((t - (self.skip - 1)) / self.skip, 0.0), len(self.sigmas) - 1.0)
        return super().t_to_sigma(index)

    def get_sigmas(self, n: int) -> list[float]:
        start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
        return [self.t_to_sigma(float(t)) for t in np.linspace(start, end, n)] + [0.0]

    def scale_output(self, sigma: float, denoised: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = self.sigma_to_t(sigma) * 10.0
        c_skip = 0.25 / (t ** 2 + 0.25)
        c_out = t / (t ** 2 + 0.25) ** 0.5
        return c_out * denoised + c_skip * x


# -- the schedule functions --------------------------------------------------------------------------

def uniform(n: int, sigma_min: float, sigma_max: float, inner: ModelSigmas, **_) -> list[float]:
    """Uniform in training timesteps (k-diffusion's `get_sigmas`)."""
    return inner.get_sigmas(n)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, **_) -> list[float]:
    """Karras et al. 2022: uniform in sigma^(1/rho)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in np.linspace(0, 1, n)] + [0.0]


def exponential(n: int, sigma_min: float, sigma_max: float, **_) -> list[float]:
    """Uniform in log sigma."""
    return [math.exp(v) for v in np.linspace(math.log(sigma_max), math.log(sigma_min), n)] + [0.0]


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, **_) -> list[float]:
    """log sigma a polynomial (degree rho) of the step: rho 1 is Exponential."""
    span = math.log(sigma_max) - math.log(sigma_min)
    return [math.exp(r ** rho * span + math.log(sigma_min)) for r in np.linspace(1, 0, n)] + [0.0]


def sgm_uniform(n: int, sigma_min: float, sigma_max: float, inner: ModelSigmas, **_) -> list[float]:
    """Uniform in timesteps with the end point dropped (SGM's "trailing" spacing)."""
    start, end = inner.sigma_to_t(sigma_max), inner.sigma_to_t(sigma_min)
    return [inner.t_to_sigma(float(t)) for t in np.linspace(start, end, n + 1)[:-1]] + [0.0]


def kl_optimal(n: int, sigma_min: float, sigma_max: float, **_) -> list[float]:
    """Sabour et al. 2024: uniform in arctan(sigma). Ends at sigma_min, not 0 (as A1111)."""
    a_min, a_max = math.atan(sigma_min), math.atan(sigma_max)
    return [math.tan(i / n * a_min + (1 - i / n) * a_max) for i in range(n + 1)]


AYS_SD1 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def align_your_steps(n: int, sigma_min: float, sigma_max: float, is_sdxl: bool = False, **_) -> list[float]:
    """NVIDIA's Align Your Steps tables (SD 1.x or SDXL), log-linearly interpolated to n steps."""
    table = AYS_SDXL if is_sdxl else AYS_SD1
    if n == len(table):
        return list(table) + [0.0]
    xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
    return [float(v) for v in np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]] + [0.0]


def simple(n: int, sigma_min: float, sigma_max: float, inner: ModelSigmas, **_) -> list[float]:
    """Every (T / n)-th training sigma from the top."""
    stride = len(inner.sigmas) / n
    return [float(inner.sigmas[-(1 + int(x * stride))]) for x in range(n)] + [0.0]


def normal(n: int, sigma_min: float, sigma_max: float, inner: ModelSigmas, **_) -> list[float]:
    """Uniform in timesteps between the ends' timesteps (on a discrete schedule: Uniform)."""
    start, end = inner.sigma_to_t(sigma_max), inner.sigma_to_t(sigma_min)
    return [inner.t_to_sigma(float(t)) for t in np.linspace(start, end, n)] + [0.0]


def ddim(n: int, sigma_min: float, sigma_max: float, inner: ModelSigmas, **_) -> list[float]:
    """The sigmas of DDIM's timesteps 1 + i * (T // n), i < n (see the module docstring)."""
    stride = max(len(inner.sigmas) // n, 1)
    return [float(inner.sigmas[1 + i * stride]) for i in range(n) if 1 + i * stride < len(inner.sigmas)][::-1] + [0.0]


def beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta_: float = 0.6, **_) -> list[float]:
    """Lee et al. 2024 ("Beta Sampling is All You Need"): steps at the Beta(0.6, 0.6) quantiles."""
    from scipy import stats

    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta_)
    return [float(sigma_min + q * (sigma_max - sigma_min)) for q in quantiles] + [0.0]


@dataclass(frozen=True)
class SchedulerData:
    """A schedule type: `name` is A1111's internal name, `label` what the UI, API and infotext show."""

    name: str
    label: str
    function: Callable[..., list[float]] | None = None
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: tuple[str, ...] = ()


all_schedulers: list[SchedulerData] = [
    SchedulerData("automatic", "Automatic"),
    SchedulerData("uniform", "Uniform", uniform, need_inner_model=True),
    SchedulerData("karras", "Karras", karras, default_rho=7.0),
    SchedulerData("exponential", "Exponential", exponential),
    SchedulerData("polyexponential", "Polyexponential", polyexponential, default_rho=1.0),
    SchedulerData("sgm_uniform", "SGM Uniform", sgm_uniform, need_inner_model=True, aliases=("SGMUniform",)),
    SchedulerData("kl_optimal", "KL Optimal", kl_optimal),
    SchedulerData("align_your_steps", "Align Your Steps", align_your_steps),
    SchedulerData("simple", "Simple", simple, need_inner_model=True),
    SchedulerData("normal", "Normal", normal, need_inner_model=True),
    SchedulerData("ddim", "DDIM", ddim, need_inner_model=True),
    SchedulerData("beta", "Beta", beta, need_inner_model=True),
]
schedulers = all_schedulers  # A1111's name for the list
schedulers_map = {**{s.name: s for s in all_schedulers}, **{s.label: s for s in all_schedulers}}


def find_scheduler(name: str | None) -> SchedulerData:
    """A schedule type by label, name or alias, case-insensitively; empty means Automatic."""
    if name is None or not str(name).strip():
        return all_schedulers[0]
    key = str(name).strip().lower()
    for s in all_schedulers:
        if key in (s.name, s.label.lower(), *(a.lower() for a in s.aliases)):
            return s
    raise InvalidParameter(f"Unknown schedule type {name!r}. Available: {', '.join(s.label for s in all_schedulers)}",
                           field="scheduler")


def get_sigmas(schedule: str, n: int, inner: ModelSigmas, is_sdxl: bool = False,
               discard_next_to_last_sigma: bool = False) -> list[float]:
    """The sigmas of schedule type `schedule` (a name, label or alias, not Automatic) for n steps.

    `discard_next_to_last_sigma` (A1111's `always_discard_next_to_last_sigma`): make the
    schedule for n + 1 steps and drop its next-to-last sigma, so n steps still run and the
    last one goes from the second-lowest sigma straight to the end.
    """
    data = find_scheduler(schedule)
    if data.function is None:
        raise ValueError("Automatic is resolved by the sampler registry, not here")
    count = n + 1 if discard_next_to_last_sigma else n
    sigmas = data.function(count, inner.sigma_min, inner.sigma_max, inner=inner, is_sdxl=is_sdxl)
    if discard_next_to_last_sigma:
        sigmas = sigmas[:-2] + sigmas[-1:]
    return [float(s) for s in sigmas]
