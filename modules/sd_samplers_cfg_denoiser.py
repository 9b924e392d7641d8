"""The denoiser every sampler calls: one batched UNet call per step, then a guidance rule.

The batch is [base for each image] + [each AND part of each image] (+ [negative for each
image] for rules that see the negative separately, such as Perp-Neg), with the
conditionings active at this step padded to one token length. "base" is the negative
prompt for CFG and the empty prompt for Perp-Neg. Guidance is done on the raw model output
(as diffusers does) and converted to epsilon and pred_x0 for the sampler.

On steps where guidance cannot change the result (scale 1, outside the guidance interval,
NGMS) and every image has a plain prompt, only the prompt rows are run.

With NAG on (`nag_scale`), the prompt rows of each UNet call also get NAG in the cross-attention
layers: the denoiser hands the processors installed by `sd_guidance.attention_guidance` the
negative conditioning active at this step for each prompt row (`NAGState`); the negative / empty
rows stay plain, and an image whose negative is empty at this step gets no NAG. With `nag_follows_dng`
(guidance "Dynamic negative"), NAG's scale is per image and step, from the rule's posterior for this step,
which is known before the UNet call (`sd_guidance.dng_posterior_at`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modules import sd_attention_guidance
from modules.conditioning import Schedule, active_index, stack_padded
from modules.prompt_parser import MulticondLearnedConditioning, ScheduledPromptConditioning
from modules.sd_guidance import (GuidanceSettings, StepContext, dng_nag_scale, dng_posterior_at, find_guidance_rule,
                                 rescale_cfg)
from modules.sd_samplers_common import to_eps, to_x0


@dataclass
class DenoiserOutput:
    model_output: torch.Tensor  # guided, in the model's prediction type
    eps: torch.Tensor  # guided noise prediction
    pred_x0: torch.Tensor  # guided estimate of the clean latent
    branches: dict[str, torch.Tensor]  # pred_x0 of each conditioning branch
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # per-image measures of what guidance did


class CFGDenoiser:
    """Runs the UNet on all branches of a step at once and combines them with the job's guidance rule."""

    def __init__(self, model, cond: MulticondLearnedConditioning, uncond: list[Schedule], cfg_scale: float,
                 steps: int, empty: torch.Tensor, guidance: GuidanceSettings | None = None):
        """`empty` is the empty prompt's encoding (with the job's CLIP skip): padding, and Perp-Neg's base."""
        self.model = model
        self.steps = steps
        self.empty = empty
        self.guidance = guidance or GuidanceSettings(find_guidance_rule("CFG"), cfg_scale)
        parts = [(i, part) for i, image_parts in enumerate(cond.batch) for part in image_parts]
        self.part_schedules = [part.schedules for _, part in parts]
        self.part_image = torch.tensor([i for i, _ in parts], device=model.device)
        self.part_weight = torch.tensor([part.weight for _, part in parts], dtype=model.dtype,
                                        device=model.device).view(-1, 1, 1, 1)
        self.plain_prompts = all(len(p) == 1 and p[0].weight == 1 for p in cond.batch)
        if self.guidance.rule.separate_negative:
            empty_schedule = [ScheduledPromptConditioning(steps, empty)]
            self.base_schedules, self.negative_schedules = [empty_schedule] * len(uncond), uncond
        else:
            self.base_schedules, self.negative_schedules = uncond, []
        self._batches: dict[tuple, torch.Tensor] = {}
        self.nag_schedules = uncond if self.guidance.nag is not None else []
        self._nag_inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.rule_state: dict = {}  # what a rule remembers between steps (APG momentum, DNG posterior), per run
        self._last_step = -1

    def conditioning_at(self, step: int, prompt_only: bool = False) -> torch.Tensor:
        """The UNet's encoder_hidden_states at `step`, built once per distinct set of active entries."""
        if prompt_only:
            schedules = self.part_schedules
        else:
            schedules = self.base_schedules + self.part_schedules + self.negative_schedules
        key = (prompt_only, *(active_index(s, step) for s in schedules))
        if key not in self._batches:
            conds = [schedule[k].cond for schedule, k in zip(schedules, key[1:])]
            self._batches[key] = stack_padded(conds, self.empty).to(self.model.device, self.model.dtype)
        return self._batches[key]

    def nag_inputs_at(self, step: int, prompt_only: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, negative token states) for NAG at `step`: the prompt rows of the UNet batch whose image's
        negative conditioning at this step is not the empty prompt's; None when no row gets NAG."""
        if not self.nag_schedules or not self.guidance.nag.active_at(step, self.steps):
            return None
        key = (prompt_only, *(active_index(s, step) for s in self.nag_schedules))
        if key not in self._nag_inputs:
            first = 0 if prompt_only else len(self.base_schedules)
            conds = [s[k].cond for s, k in zip(self.nag_schedules, key[1:])]
            rows = [first + j for j, i in enumerate(self.part_image.tolist()) if not self._is_empty(conds[i])]
            if rows:
                negative = stack_padded([conds[i] for i in self.part_image[torch.tensor(rows) - first].tolist()],
                                        self.empty)
                if isinstance(negative, dict):  # SDXL: only the token states enter cross-attention
                    negative = negative["crossattn"]
                self._nag_inputs[key] = (torch.tensor(rows, device=self.model.device),
                                         negative.to(self.model.device, self.model.dtype))
            else:
                self._nag_inputs[key] = None
        return self._nag_inputs[key]

    def _is_empty(self, cond) -> bool:
        a, b = (cond["crossattn"], self.empty["crossattn"]) if isinstance(cond, dict) else (cond, self.empty)
        return cond is self.empty or (a.shape == b.shape and torch.equal(a, b))

    def nag_scale_at(self, x: torch.Tensor, alpha: float, step: int) -> float | torch.Tensor:
        """NAG's scale at this step: the job's, or per image (n,) when it follows the Dynamic negative posterior."""
        g = self.guidance
        if not (g.params.nag_follows_dng and g.rule.name == "Dynamic negative"):
            return g.nag.scale
        p = dng_posterior_at(self.rule_state, x, alpha, step, g.params)
        return dng_nag_scale(p, g.params.dng_prior, g.nag.scale)

    def apply_model(self, x_in: torch.Tensor, timestep: float, cond, step: int, prompt_only: bool,
                    nag_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """One UNet call, with NAG on the prompt rows when the job asks for it (`nag_scale`: per image or one)."""
        nag = self.nag_inputs_at(step, prompt_only)
        if nag is None:
            return self.model.apply_model(x_in, timestep, cond)
        state = sd_attention_guidance.active_state(self.model.unet)
        if state is None:
            raise RuntimeError("NAG is on but its attention processors are not installed: sample inside "
                               "`sd_guidance.attention_guidance(model, p)`")
        rows = nag[0]
        if isinstance(nag_scale, torch.Tensor):  # per image -> per guided row
            first = 0 if prompt_only else len(self.base_schedules)
            nag_scale = nag_scale.to(self.model.device, self.model.dtype)[self.part_image[rows - first]].view(-1, 1, 1)
        settings = self.guidance.nag
        with state.inputs(sd_attention_guidance.NAGCall(rows, nag[1], nag_scale, settings.tau, settings.alpha)):
            return self.model.apply_model(x_in, timestep, cond)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: float, alpha: float, step: int) -> DenoiserOutput:
        """Denoise the VP-scaled latent `x` at `timestep`, whose alphas_cumprod is `alpha`."""
        model, g, n = self.model, self.guidance, x.shape[0]
        prediction_type = model.prediction_type
        scale = g.scale_at(step, self.steps)
        prompt_only = self.plain_prompts and (scale == 1 or g.ngms_skips(step, alpha))
        x_parts = x if self.plain_prompts else x[self.part_image]
        if step < self._last_step:  # a new run through the same denoiser: rules start afresh
            self.rule_state.clear()
        self._last_step = step
        nag_scale = self.nag_scale_at(x, alpha, step) if g.nag is not None else 1.0
        stats_nag = {"nag_scale": nag_scale} if isinstance(nag_scale, torch.Tensor) else {}
        if prompt_only:
            out = self.apply_model(x_parts, timestep, self.conditioning_at(step, prompt_only=True), step, True,
                                   nag_scale)
            guided = positive = out
            branches, stats = {"prompt": to_x0(out, x, alpha, prediction_type)}, {}
        else:
            x_in = torch.cat([x, x_parts, x] if self.negative_schedules else [x, x_parts])
            out = self.apply_model(x_in, timestep, self.conditioning_at(step), step, False, nag_scale)
            k = len(self.part_schedules)
            base, out_parts, out_negative = out[:n], out[n:n + k], out[n + k:]
            if self.plain_prompts:
                delta_pos = out_parts - base
            else:  # sum_i w_i (e_part_i - e_base) over each image's AND parts
                delta_pos = torch.zeros_like(base).index_add_(
                    0, self.part_image, (out_parts - base[self.part_image]) * self.part_weight)
            positive = base + delta_pos
            ctx = StepContext(x, alpha, step, self.steps, prediction_type, g, self.rule_state)
            if self.negative_schedules:
                guided, stats = g.rule.combine(base, delta_pos, scale, delta_neg=out_negative - base,
                                               negative_weight=g.negative_weight, ctx=ctx)
                branches = {"prompt": to_x0(positive, x, alpha, prediction_type),
                            "negative": to_x0(out_negative, x, alpha, prediction_type),
                            "empty": to_x0(base, x, alpha, prediction_type)}
            else:
                guided, stats = g.rule.combine(base, delta_pos, scale, ctx=ctx)
                branches = {"prompt": to_x0(positive, x, alpha, prediction_type),
                            "negative": to_x0(base, x, alpha, prediction_type)}
            if g.cfg_rescale > 0:
                guided = rescale_cfg(guided, positive, g.cfg_rescale)
        stats = {**stats, **stats_nag, "guidance": (guided - positive).flatten(1).norm(dim=1)}
        return DenoiserOutput(guided, to_eps(guided, x, alpha, prediction_type),
                              to_x0(guided, x, alpha, prediction_type), branches, stats)
