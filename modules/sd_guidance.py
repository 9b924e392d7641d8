"""Guidance rules: how the prompt and negative-prompt predictions combine into one, beside plain CFG.

Each rule is a small pure function on model outputs (epsilon or v, whatever the model
predicts), registered by name. The denoiser gives every rule the same inputs: `base` (the
prediction the prompt's direction is measured from: the negative prompt's for CFG, the
empty prompt's for Perp-Neg), `delta_pos` (prompt minus base, AND parts already weighted
and summed) and, for rules that see the negative separately, `delta_neg`.

Schedule transforms at the bottom change *which conditioning* the negative branch sees at
each step (negative weight, delayed negative); they reuse the prompt-editing machinery, so
`negative_start=0.3` acts exactly as writing the negative prompt as `[:negative:0.3]`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from modules.conditioning import Schedule, active_index, pad_to_length
from modules.errors import InvalidParameter
from modules.prompt_parser import ScheduledPromptConditioning


def cfg(base: torch.Tensor, delta_pos: torch.Tensor, scale: float, **_) -> tuple[torch.Tensor, dict]:
    """Classifier-free guidance: `e = e_neg + scale * (e_prompt - e_neg)`."""
    return base + scale * delta_pos, {}


PROJECTION_DIMS = {"image": (1, 2, 3), "channel": (2, 3), "pixel": (1,)}


def perp_neg(base: torch.Tensor, delta_pos: torch.Tensor, scale: float, delta_neg: torch.Tensor,
             negative_weight: float = 1.0, projection: str = "image", **_) -> tuple[torch.Tensor, dict]:
    """Perp-Neg (Armandpour et al. 2023): remove from the negative direction the part that
    lies along the prompt's, so a negative sharing a concept with the prompt does not push
    the shared concept away: `e = e_empty + scale * (d_pos - w * perp(d_neg, d_pos))`.

    `projection` says over what the projection is taken: the whole latent of each image (the
    paper), each latent channel, or each spatial position (so a concept shared in one region
    is kept there while the negative still acts elsewhere).
    """
    dims = PROJECTION_DIMS[projection]
    coef = (delta_neg * delta_pos).sum(dims, keepdim=True) / (delta_pos * delta_pos).sum(dims, keepdim=True).clamp_min(1e-12)
    parallel = coef * delta_pos
    perpendicular = delta_neg - parallel
    guided = base + scale * (delta_pos - negative_weight * perpendicular)
    return guided, {"parallel_removed": parallel.flatten(1).norm(dim=1),
                    "negative_applied": negative_weight * perpendicular.flatten(1).norm(dim=1)}


def rescale_cfg(guided: torch.Tensor, positive: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2024): bring each image's std back towards the prompt branch's,
    against the over-saturation of strong guidance; `phi` blends rescaled and plain."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


@dataclass(frozen=True)
class GuidanceRule:
    name: str
    combine: Callable[..., tuple[torch.Tensor, dict]]
    separate_negative: bool  # True: the UNet batch is [empty, prompt parts, negative]; False: [negative, prompt parts]
    description: str


guidance_rules: list[GuidanceRule] = [
    GuidanceRule("CFG", cfg, False, "classifier-free guidance; the negative prompt is the unconditional branch"),
    GuidanceRule("Perp-Neg", perp_neg, True, "only the part of the negative perpendicular to the prompt acts"),
    GuidanceRule("Perp-Neg channel", partial(perp_neg, projection="channel"), True,
                 "Perp-Neg with the projection taken per latent channel"),
    GuidanceRule("Perp-Neg pixel", partial(perp_neg, projection="pixel"), True,
                 "Perp-Neg with the projection taken per spatial position"),
]


def find_guidance_rule(name: str) -> GuidanceRule:
    for rule in guidance_rules:
        if rule.name.lower() == str(name).strip().lower():
            return rule
    raise InvalidParameter(f"Unknown guidance rule {name!r}. Available: {', '.join(r.name for r in guidance_rules)}",
                           field="guidance")


@dataclass
class GuidanceFields:
    """The guidance fields of a job (StableDiffusionProcessing inherits them, so they are also API,
    page and infotext fields); the defaults give plain CFG, bit for bit."""

    guidance: str = "CFG"
    negative_weight: float = 1.0
    negative_start: float = 0.0
    negative_end: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    cfg_rescale: float = 0.0
    s_min_uncond: float = 0.0
    negative_report: bool = False  # after the job: how strongly each image still shows the negative prompt


@dataclass(frozen=True)
class GuidanceSettings:
    """The per-job guidance fields, as the denoiser needs them."""

    rule: GuidanceRule
    scale: float
    negative_weight: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    cfg_rescale: float = 0.0
    s_min_uncond: float = 0.0

    def scale_at(self, step: int, steps: int) -> float:
        """The guidance scale at 0-based `step`: 1 outside the guidance interval (Kynkäänniemi et al. 2024)."""
        lo, hi = self.guidance_interval
        return self.scale if lo <= step / steps and (step / steps < hi or hi >= 1) else 1.0

    def ngms_skips(self, step: int, alpha: float) -> bool:
        """AUTOMATIC1111's "Negative Guidance minimum sigma": on odd steps with sigma below s_min_uncond
        the uncond pass is skipped (the prompt branch stands in for it)."""
        sigma = ((1 - alpha) / alpha) ** 0.5
        return self.s_min_uncond > 0 and step % 2 == 1 and sigma < self.s_min_uncond


def settings_for(p: GuidanceFields) -> GuidanceSettings:
    """The denoiser's guidance settings for a job."""
    return GuidanceSettings(find_guidance_rule(p.guidance), p.cfg_scale, p.negative_weight,
                            tuple(float(v) for v in p.guidance_interval), p.cfg_rescale, p.s_min_uncond)


def attention_guidance(model, p: GuidanceFields) -> contextlib.AbstractContextManager:
    """What a rule changes inside the UNet for the duration of one job (nothing for the rules so far)."""
    return contextlib.nullcontext()


# -- the negative branch's conditioning, per step ---------------------------------------------

def weighted_negative(schedule: Schedule, empty: torch.Tensor, weight: float) -> Schedule:
    """Interpolate each negative conditioning between the empty prompt's encoding (0) and its own (1);
    above 1 it extrapolates. No extra UNet work: only the conditioning changes."""
    if weight == 1:
        return schedule
    out = []
    for entry in schedule:
        base = pad_to_length(empty, entry.cond.shape[1], empty)
        out.append(ScheduledPromptConditioning(entry.end_at_step, base + weight * (entry.cond - base)))
    return out


def windowed_negative(schedule: Schedule, empty: torch.Tensor, start: float, end: float, steps: int) -> Schedule:
    """The negative acts only from `start` to `end` (fractions of the steps); elsewhere the empty prompt.

    Boundaries follow prompt editing: `start=0.3` at 10 steps is `[:negative:0.3]`, i.e. the
    empty prompt through step 3; `end=0.8` is `[negative::0.8]`, the negative through step 8.
    """
    if start <= 0 and end >= 1:
        return schedule
    first = int(start * steps) if start > 0 else -1
    last = int(end * steps) if end < 1 else steps
    breaks = sorted({e.end_at_step for e in schedule} | {b for b in (first, last) if 0 <= b < steps} | {steps})
    out: Schedule = []
    for end_at in breaks:
        cond = empty if end_at <= first or end_at > last else schedule[active_index(schedule, end_at)].cond
        if out and out[-1].cond is cond:
            out[-1] = ScheduledPromptConditioning(end_at, cond)
        else:
            out.append(ScheduledPromptConditioning(end_at, cond))
    return out


def validate_guidance(p) -> None:
    """Reject guidance fields outside their ranges, like the other fields of the job."""
    find_guidance_rule(p.guidance)
    if not 0 <= p.negative_weight <= 5:
        raise InvalidParameter(f"negative_weight must be between 0 and 5, got {p.negative_weight}", field="negative_weight")
    for name in ("negative_start", "negative_end", "cfg_rescale"):
        if not 0 <= getattr(p, name) <= 1:
            raise InvalidParameter(f"{name} must be between 0 and 1, got {getattr(p, name)}", field=name)
    if p.negative_start > p.negative_end:
        raise InvalidParameter("negative_start must not be after negative_end", field="negative_start")
    try:
        lo, hi = (float(v) for v in p.guidance_interval)
    except (TypeError, ValueError):
        raise InvalidParameter("guidance_interval must be two numbers (low, high)", field="guidance_interval")
    if not 0 <= lo <= hi <= 1:
        raise InvalidParameter(f"guidance_interval must satisfy 0 <= low <= high <= 1, got {list(p.guidance_interval)}",
                               field="guidance_interval")
    if not 0 <= p.s_min_uncond <= 100:
        raise InvalidParameter(f"s_min_uncond must be between 0 and 100, got {p.s_min_uncond}", field="s_min_uncond")
