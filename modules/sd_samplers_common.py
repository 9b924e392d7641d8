"""What every sampler shares: the per-step report, the hooks, noise-prediction conversions, and the
img2img rule for how many steps run from where."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from modules.errors import InterruptedException, InvalidParameter


@dataclass
class StepInfo:
    """What a sampler reports after each step (the `after_sample` hook's argument).

    `pred_x0` is the guided prediction of the final latent at this step; `branches` holds
    the same prediction for each conditioning the UNet saw ("prompt", "negative", and
    "empty" where a guidance rule computed it), so a preview can show any of them.
    """

    step: int  # 0-based index of the step just taken
    steps: int
    timestep: float
    x: torch.Tensor  # the latent after this step
    pred_x0: torch.Tensor
    branches: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # per-image guidance measures
    pass_label: str | None = None  # set by processing: "txt2img", "img2img" or "hires" (the hires fix's second pass)


AfterSampleHook = Callable[[StepInfo], None]


def call_hooks(hooks: Iterable[AfterSampleHook], info: StepInfo) -> None:
    """Run the after_sample hooks; one may raise InterruptedException to stop sampling."""
    for hook in hooks:
        hook(info)


def to_x0(model_output: torch.Tensor, x: torch.Tensor, alpha: float, prediction_type: str) -> torch.Tensor:
    """The model's estimate of the clean latent, from its output at a point with alphas_cumprod `alpha`."""
    if prediction_type == "epsilon":
        return (x - (1 - alpha) ** 0.5 * model_output) / alpha ** 0.5
    if prediction_type == "v_prediction":
        return alpha ** 0.5 * x - (1 - alpha) ** 0.5 * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def to_eps(model_output: torch.Tensor, x: torch.Tensor, alpha: float, prediction_type: str) -> torch.Tensor:
    """The noise the model sees in x, whatever it was trained to predict."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return (1 - alpha) ** 0.5 * x + alpha ** 0.5 * model_output
    if prediction_type == "sample":
        return (x - alpha ** 0.5 * model_output) / (1 - alpha) ** 0.5
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def img2img_steps(steps: int, denoising_strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """AUTOMATIC1111's `setup_img2img_steps`: (length of the schedule, t_enc); t_enc + 1 steps run.

    The run is the last t_enc + 1 steps of a `total`-step schedule. fix_steps False:
    `total = steps`, `t_enc = int(min(strength, 0.999) * steps)` (strength 1 runs every step,
    0.5 at 20 steps runs 11). fix_steps True: `total = int(steps / min(strength, 0.999))`,
    `t_enc = steps - 1`, so exactly `steps` steps run on a longer schedule.
    """
    if isinstance(denoising_strength, bool) or not isinstance(denoising_strength, (int, float)) \
            or not 0 <= denoising_strength <= 1:
        raise InvalidParameter(f"denoising_strength must be between 0 and 1, got {denoising_strength!r}",
                               field="denoising_strength")
    if int(steps) < 1:
        raise InvalidParameter(f"steps must be at least 1, got {steps!r}", field="steps")
    strength = min(float(denoising_strength), 0.999)
    if fix_steps:
        if strength <= 0:
            raise InvalidParameter("denoising_strength 0 with fixed img2img steps would need an endless schedule",
                                   field="denoising_strength")
        return int(steps / strength), int(steps) - 1
    return int(steps), int(strength * steps)


class Sampler(ABC):
    """A sampler turns initial noise into a latent, calling the denoiser once per step.

    `sample` returns the final latent, or, when a hook interrupts, the last guided
    pred_x0 (what the model believed the image would be), as AUTOMATIC1111 does.
    `sample_img2img` starts part-way down the same schedule from a noised init latent.
    """

    name: str = ""

    @abstractmethod
    def sample(self, denoiser, noise: torch.Tensor, steps: int, rng, hooks: list[AfterSampleHook]) -> torch.Tensor:
        ...

    def sample_img2img(self, denoiser, init_latent: torch.Tensor, noise: torch.Tensor, steps: int,
                       denoising_strength: float, rng, hooks: list[AfterSampleHook],
                       fix_steps: bool = False) -> torch.Tensor:
        """Denoise `init_latent` noised to the level where its last `t_enc + 1` steps begin (`img2img_steps`).

        `noise` is each image's first draw (`rng.first()`); later draws come from `rng`. The
        hooks see the steps that run, numbered 0..t_enc with `steps = t_enc + 1`, and the
        denoiser gets the same index (prompt schedules, built for the requested steps, are
        indexed by the step within the run, as AUTOMATIC1111 does).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot start part-way")


def run_steps(step_fn: Callable[[int], StepInfo], steps: int, hooks: list[AfterSampleHook]) -> torch.Tensor:
    """Drive `step_fn(i)` for i in 0..steps-1, reporting each step; stop early on interrupt."""
    info = None
    for i in range(steps):
        info = step_fn(i)
        try:
            call_hooks(hooks, info)
        except InterruptedException:
            return info.pred_x0 if i < steps - 1 else info.x
    return info.x
