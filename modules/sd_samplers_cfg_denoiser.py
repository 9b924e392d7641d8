"""The denoiser every sampler calls: one batched UNet call for the negative prompt and all
prompt parts at a step, then classifier-free guidance.

The batch is [uncond for each image] + [cond for each AND part of each image], with the
conditionings active at this step padded to one token length. Guidance is done on the raw
model output (as diffusers does), and converted to epsilon and pred_x0 for the sampler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.conditioning import Schedule, active_index, stack_padded
from modules.prompt_parser import MulticondLearnedConditioning
from modules.sd_samplers_common import to_eps, to_x0


@dataclass
class DenoiserOutput:
    model_output: torch.Tensor  # guided, in the model's prediction type
    eps: torch.Tensor  # guided noise prediction
    pred_x0: torch.Tensor  # guided estimate of the clean latent
    branches: dict[str, torch.Tensor]  # pred_x0 of each conditioning branch


class CFGDenoiser:
    """`e = e_uncond + scale * sum_i w_i (e_cond_i - e_uncond)`, from one UNet call per step.

    With scale 1 and plain prompts (one part of weight 1) the uncond pass is skipped.
    """

    def __init__(self, model, cond: MulticondLearnedConditioning, uncond: list[Schedule], cfg_scale: float):
        self.model = model
        self.uncond = uncond
        self.cfg_scale = cfg_scale
        parts = [(i, part) for i, image_parts in enumerate(cond.batch) for part in image_parts]
        self.part_schedules = [part.schedules for _, part in parts]
        self.part_image = torch.tensor([i for i, _ in parts], device=model.device)
        self.part_weight = torch.tensor([part.weight for _, part in parts], dtype=model.dtype,
                                        device=model.device).view(-1, 1, 1, 1)
        self.skip_uncond = cfg_scale == 1 and all(len(p) == 1 and p[0].weight == 1 for p in cond.batch)
        self._batches: dict[tuple[int, ...], torch.Tensor] = {}

    def conditioning_at(self, step: int) -> torch.Tensor:
        """The UNet's encoder_hidden_states at `step`, built once per distinct set of active entries."""
        schedules = ([] if self.skip_uncond else self.uncond) + self.part_schedules
        key = tuple(active_index(s, step) for s in schedules)
        if key not in self._batches:
            conds = [schedule[k].cond for schedule, k in zip(schedules, key)]
            self._batches[key] = stack_padded(conds, self.model.empty_cond).to(self.model.device, self.model.dtype)
        return self._batches[key]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: float, alpha: float, step: int) -> DenoiserOutput:
        """Denoise the VP-scaled latent `x` at `timestep`, whose alphas_cumprod is `alpha`."""
        model, n = self.model, x.shape[0]
        x_parts = x[self.part_image]
        x_in = x_parts if self.skip_uncond else torch.cat([x, x_parts])
        out = model.apply_model(x_in, timestep, self.conditioning_at(step))
        prediction_type = model.prediction_type
        if self.skip_uncond:
            guided = out
            branches = {"prompt": to_x0(out, x, alpha, prediction_type)}
        else:
            out_uncond, out_cond = out[:n], out[n:]
            delta = torch.zeros_like(out_uncond).index_add_(
                0, self.part_image, (out_cond - out_uncond[self.part_image]) * self.part_weight)
            guided = out_uncond + self.cfg_scale * delta
            branches = {"prompt": to_x0(out_uncond + delta, x, alpha, prediction_type),
                        "negative": to_x0(out_uncond, x, alpha, prediction_type)}
        return DenoiserOutput(guided, to_eps(guided, x, alpha, prediction_type),
                              to_x0(guided, x, alpha, prediction_type), branches)
