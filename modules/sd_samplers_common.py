"""What every sampler shares: the per-step report, the hooks, and noise-prediction conversions."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from modules.errors import InterruptedException


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


class Sampler(ABC):
    """A sampler turns initial noise into a latent, calling the denoiser once per step.

    `sample` returns the final latent, or, when a hook interrupts, the last guided
    pred_x0 (what the model believed the image would be), as AUTOMATIC1111 does.
    """

    name: str = ""

    @abstractmethod
    def sample(self, denoiser, noise: torch.Tensor, steps: int, rng, hooks: list[AfterSampleHook]) -> torch.Tensor:
        ...


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
