"""Guidance rules: how the prompt and negative-prompt predictions combine into one, beside plain CFG.

Each rule is a small pure function on model outputs (epsilon or v, whatever the model
predicts), registered by name. The denoiser gives every rule the same inputs: `base` (the
prediction the prompt's direction is measured from: the negative prompt's for CFG, the
empty prompt's for Perp-Neg and Dynamic negative), `delta_pos` (prompt minus base, AND parts
already weighted and summed), for rules that see the negative separately `delta_neg`, and a
`StepContext` (the latent, its alphas_cumprod, the step, the job's settings and a per-job state
dict for rules that remember earlier steps: APG's momentum, Dynamic negative's posterior).
Rules that work on the predicted clean latent (APG, dynamic thresholding, as their papers and
AUTOMATIC1111's extension do) convert with `x0_gain`: pred_x0 is affine in the model output.

NAG (normalized attention guidance) is not a rule but a set of fields usable with every rule:
it acts inside the UNet's cross-attention (`modules/sd_attention_guidance.py`), installed for a
job by `attention_guidance(model, p)`.

Schedule transforms at the bottom change *which conditioning* the negative branch sees at
each step (negative weight, delayed negative); they reuse the prompt-editing machinery, so
`negative_start=0.3` acts exactly as writing the negative prompt as `[:negative:0.3]`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Callable

import torch

from modules.conditioning import Schedule, active_index, pad_to_length
from modules.errors import InvalidParameter
from modules.prompt_parser import ScheduledPromptConditioning


@dataclass
class StepContext:
    """What a rule may need beyond the branch predictions, for one denoiser call."""

    x: torch.Tensor  # the VP-scaled latent the UNet saw
    alpha: float  # its alphas_cumprod
    step: int  # 0-based sampling step
    steps: int
    prediction_type: str
    settings: "GuidanceSettings"
    state: dict = field(default_factory=dict)  # per job and batch; the denoiser empties it when a new run starts


def x0_gain(alpha: float, prediction_type: str) -> float:
    """d pred_x0 / d model_output at a point with alphas_cumprod `alpha` (pred_x0 is affine in the output):
    a difference of outputs times this is the same difference of predicted clean latents."""
    if prediction_type == "epsilon":
        return -((1 - alpha) / alpha) ** 0.5
    if prediction_type == "v_prediction":
        return -(1 - alpha) ** 0.5
    if prediction_type == "sample":
        return 1.0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _x0(out: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    from modules.sd_samplers_common import to_x0

    return to_x0(out, ctx.x, ctx.alpha, ctx.prediction_type)


def _eps(out: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    from modules.sd_samplers_common import to_eps

    return to_eps(out, ctx.x, ctx.alpha, ctx.prediction_type)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


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


# -- APG: adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416) --------------------

def apg_update(diff: torch.Tensor, cond: torch.Tensor, eta: float, norm_threshold: float) -> tuple[torch.Tensor, dict]:
    """The paper's Algorithm 1 after the momentum: clip each image's guidance `diff` to L2 norm
    `norm_threshold` (0 = no clipping), split it into the parts parallel and orthogonal to the
    conditional prediction `cond`, and weigh the parallel part (the one that oversaturates) by `eta`."""
    dims = list(range(1, diff.ndim))
    if norm_threshold > 0:
        diff = diff * torch.clamp(norm_threshold / diff.norm(p=2, dim=dims, keepdim=True), max=1.0)
    v0, v1 = diff.double(), torch.nn.functional.normalize(cond.double().flatten(1), dim=1).view_as(cond)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    orthogonal = v0 - parallel
    update = (orthogonal + eta * parallel).to(diff.dtype)
    return update, {"apg_parallel": parallel.flatten(1).norm(dim=1).to(diff.dtype),
                    "apg_orthogonal": orthogonal.flatten(1).norm(dim=1).to(diff.dtype)}


def apg_is_neutral(s: "RuleParams") -> bool:
    return s.apg_eta == 1 and s.apg_norm_threshold == 0 and s.apg_momentum == 0


def apg(base: torch.Tensor, delta_pos: torch.Tensor, scale: float, ctx: StepContext, **_) -> tuple[torch.Tensor, dict]:
    """APG in pred_x0 space, as the paper: `D = D_cond + (scale - 1) (D_perp + eta D_par)` where the
    guidance `D_cond - D_uncond` first passes a reverse momentum (`running = diff + momentum * running`,
    momentum < 0 in the paper; state per image, reset when a run starts) and the norm clip. eta 1,
    no clip and no momentum is plain CFG (computed as CFG, to the bit)."""
    s = ctx.settings.params
    if apg_is_neutral(s):
        return cfg(base, delta_pos, scale)
    gain = x0_gain(ctx.alpha, ctx.prediction_type)
    positive = base + delta_pos
    diff = delta_pos * gain  # D_cond - D_uncond
    if s.apg_momentum != 0:
        running = ctx.state.get("apg_running")
        diff = diff if running is None else diff + s.apg_momentum * running
        ctx.state["apg_running"] = diff
    update, stats = apg_update(diff, _x0(positive, ctx), s.apg_eta, s.apg_norm_threshold)
    return positive + (scale - 1) * update / gain, stats


# -- dynamic thresholding (Saharia et al. 2022), as AUTOMATIC1111's sd-dynamic-thresholding ------

DYNTHRES_MODES = ("Constant", "Linear Down", "Cosine Down", "Half Cosine Down", "Linear Up", "Cosine Up",
                  "Half Cosine Up", "Power Up", "Power Down", "Linear Repeating", "Cosine Repeating", "Sawtooth")


def scheduled_scale(scale: float, mode: str, minimum: float, step: int, steps: int, sched_val: float) -> float:
    """The extension's scale schedules: `mode` moves the scale between `minimum` and `scale` over the steps."""
    frac = step / max(steps - 1, 1)
    s = scale - minimum
    factor = {
        "Constant": lambda: 1.0,
        "Linear Down": lambda: 1.0 - frac,
        "Half Cosine Down": lambda: math.cos(frac),
        "Cosine Down": lambda: math.cos(frac * 1.5707),
        "Linear Up": lambda: frac,
        "Half Cosine Up": lambda: 1.0 - math.cos(frac),
        "Cosine Up": lambda: 1.0 - math.cos(frac * 1.5707),
        "Power Up": lambda: math.pow(frac, sched_val),
        "Power Down": lambda: 1.0 - math.pow(frac, sched_val),
        "Linear Repeating": lambda: (lambda q: (0.5 - q) * 2 if q < 0.5 else (q - 0.5) * 2)((frac * sched_val) % 1.0),
        "Cosine Repeating": lambda: math.cos(frac * 6.28318 * sched_val) * 0.5 + 0.5,
        "Sawtooth": lambda: (frac * sched_val) % 1.0,
    }[mode]()
    return s * factor + minimum


def dynamic_threshold(uncond: torch.Tensor, relative: torch.Tensor, cfg_scale: float, mimic_scale: float,
                      threshold_percentile: float) -> torch.Tensor:
    """The extension's default variant (per feature channel, MEAN start point, AD variability): the CFG
    result is centred per channel, clamped at the `threshold_percentile` of its absolute values (or at
    the mimic result's maximum, whichever is larger), and rescaled so its range is what CFG at
    `mimic_scale` would have produced."""
    mim = (uncond + relative * mimic_scale).flatten(2)
    res = (uncond + relative * cfg_scale).flatten(2)
    mim_c = mim - mim.mean(dim=2, keepdim=True)
    res_mean = res.mean(dim=2, keepdim=True)
    res_c = res - res_mean
    eps = torch.finfo(res.dtype).eps
    mim_ref = mim_c.abs().amax(dim=2, keepdim=True).clamp_min(eps)
    res_abs = res_c.abs()
    res_ref = (res_abs.amax(dim=2, keepdim=True) if threshold_percentile >= 1
               else torch.quantile(res_abs, threshold_percentile, dim=2, keepdim=True)).clamp_min(eps)
    top = torch.maximum(mim_ref, res_ref)
    out = res_c.clamp(-top, top) / top * mim_ref + res_mean
    return out.unflatten(2, uncond.shape[2:])


def dynamic_thresholding(base: torch.Tensor, delta_pos: torch.Tensor, scale: float, ctx: StepContext,
                         **_) -> tuple[torch.Tensor, dict]:
    """Dynamic thresholding in pred_x0 space ("mimic scale": guide at the CFG scale, but keep the range
    of values CFG at the mimic scale would give). When both scales are the same at this step it is plain
    CFG at that scale (computed as CFG, to the bit)."""
    s = ctx.settings.params
    cfg_now = scheduled_scale(scale, s.dynthres_cfg_mode, s.dynthres_cfg_scale_min, ctx.step, ctx.steps,
                              s.dynthres_sched_val)
    mimic = scheduled_scale(s.dynthres_mimic_scale, s.dynthres_mimic_mode, s.dynthres_mimic_scale_min, ctx.step,
                            ctx.steps, s.dynthres_sched_val)
    if mimic == cfg_now:  # the clamp is at the result's own maximum: CFG at this step's scale, whatever the percentile
        return cfg(base, delta_pos, cfg_now)
    gain = x0_gain(ctx.alpha, ctx.prediction_type)
    base_x0 = _x0(base, ctx)
    out_x0 = dynamic_threshold(base_x0, delta_pos * gain, cfg_now, mimic, s.dynthres_threshold_percentile)
    n = (base.shape[0],)
    return base + (out_x0 - base_x0) / gain, {"dynthres_cfg_scale": torch.full(n, float(cfg_now), device=base.device),
                                               "dynthres_mimic_scale": torch.full(n, float(mimic), device=base.device)}


# -- Dynamic negative guidance (Koulischer et al., ICLR 2025) ----------------------------------

def dng_posterior_update(p: torch.Tensor, x_new: torch.Tensor, x_old: torch.Tensor, alpha_old: float,
                         alpha_new: float, eps_ref: torch.Tensor, eps_neg: torch.Tensor, temperature: float,
                         offset: float, p_min: float, p_max: float) -> torch.Tensor:
    """The paper's posterior update (its Algorithm 1, `compute_posterior_DNG` in the authors' code):
    `p <- clamp(p * exp((-T * (|x_new - mu_neg|^2 - |x_new - mu_ref|^2) + offset) / (2 sigma^2)), p_min, p_max)`,
    per image. The paper tracks a 1000-step DDPM chain; here the step is whatever the sampler took, so
    each branch's mean `mu_c` is the deterministic (DDIM) step from `x_old` with that branch's noise
    prediction, and `sigma^2` the DDPM posterior variance between the two noise levels. The reference
    branch is the empty prompt's (the paper's unconditional model)."""
    def mean(eps: torch.Tensor) -> torch.Tensor:
        x0 = (x_old - (1 - alpha_old) ** 0.5 * eps) / alpha_old ** 0.5
        return alpha_new ** 0.5 * x0 + (1 - alpha_new) ** 0.5 * eps

    dtype = torch.float32 if x_new.device.type == "mps" else torch.float64
    x_new, x_old = x_new.to(dtype), x_old.to(dtype)
    mu_neg, mu_ref = mean(eps_neg.to(dtype)), mean(eps_ref.to(dtype))
    # |x - mu_neg|^2 - |x - mu_ref|^2, written so that it does not cancel two large sums
    diff = ((mu_ref - mu_neg) * (2 * x_new - mu_neg - mu_ref)).flatten(1).sum(1)
    sigma2 = (1 - alpha_new) / (1 - alpha_old) * (1 - alpha_old / alpha_new)
    log_p = torch.log(p.to(diff.device, dtype)) + (-temperature * diff + offset) / (2 * max(sigma2, 1e-12))
    return torch.exp(log_p).clamp(p_min, p_max).to(p.dtype)


def dng_negative_scale(p: torch.Tensor, scale: float) -> torch.Tensor:
    """The negative's scale at a step: `scale * p / (1 - p)`, with p the posterior that the negative concept
    is in the image (the odds, as the gradient of log(1 - p(c-|x)) gives it)."""
    return scale * p / (1 - p)


def dng_posterior_at(state: dict, x: torch.Tensor, alpha: float, step: int, s: "RuleParams") -> torch.Tensor:
    """The posterior for this step, per image: the last step's (the prior at the first step), updated with the
    transition to `x` the sampler just made. It needs nothing of this step's UNet call, so the denoiser can read
    it before the call (NAG following the posterior, `nag_follows_dng`) and the rule after it, with the same result."""
    p = state.get("dng_p")
    if p is None:
        p = torch.full((x.shape[0],), float(s.dng_prior), dtype=torch.float32, device=x.device)
    record = state.get("dng_record")
    if record is not None and step > record["step"] and alpha > record["alpha"]:
        p = dng_posterior_update(p, x, record["x"], record["alpha"], alpha, record["eps_ref"], record["eps_neg"],
                                 s.dng_temperature, s.dng_offset, s.dng_p_min, s.dng_p_max)
    return p


def dng_nag_scale(p: torch.Tensor, prior: float, nag_scale: float) -> torch.Tensor:
    """NAG's scale per image when it follows the Dynamic negative posterior: `1 + (nag_scale - 1) * g` with
    `g = min(1, odds(p) / odds(prior))`, the factor by which DNG's own negative scale has moved from its start,
    capped at 1. A negative the image does not drift towards (its posterior falls) loses its attention-space
    push too; NAG never acts harder than `nag_scale`."""
    gate = ((p / (1 - p)) / (prior / (1 - prior))).clamp(max=1.0)
    return 1 + (nag_scale - 1) * gate


def dynamic_negative(base: torch.Tensor, delta_pos: torch.Tensor, scale: float, delta_neg: torch.Tensor,
                     ctx: StepContext, negative_weight: float = 1.0, **_) -> tuple[torch.Tensor, dict]:
    """Dynamic Negative Guidance: `e = e_empty + scale * d_pos - lambda_t * d_neg`, `lambda_t = w * dng_scale *
    p_t / (1 - p_t)`, where p_t, the model's own estimate that the negative concept is present, starts at
    `dng_prior` and is updated at each new step from the transition the sampler just made. A negative
    the image does not drift towards fades out; one it does is pushed away harder and harder."""
    s, state = ctx.settings.params, ctx.state
    p = dng_posterior_at(state, ctx.x, ctx.alpha, ctx.step, s)
    eps_ref, eps_neg = _eps(base, ctx), _eps(base + delta_neg, ctx)
    record = state.get("dng_record")
    if record is None or ctx.step != record["step"]:  # the first call of a step (a sampler may call twice per step)
        state["dng_record"] = {"step": ctx.step, "alpha": ctx.alpha, "x": ctx.x, "eps_ref": eps_ref, "eps_neg": eps_neg}
    state["dng_p"] = p
    lam = dng_negative_scale(p, negative_weight * s.dng_scale)
    guided = base + scale * delta_pos - _per_image(lam, base) * delta_neg
    return guided, {"dng_scale": lam, "dng_posterior": p}


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
    GuidanceRule("Dynamic negative", dynamic_negative, True,
                 "the negative's scale follows the model's posterior that the negative concept is in the image"),
    GuidanceRule("APG", apg, False, "adaptive projected guidance: CFG's update without most of its parallel part"),
    GuidanceRule("Dynamic thresholding", dynamic_thresholding, False,
                 "CFG at the CFG scale with the value range of CFG at the mimic scale"),
]


def find_guidance_rule(name: str) -> GuidanceRule:
    for rule in guidance_rules:
        if rule.name.lower() == str(name).strip().lower():
            return rule
    raise InvalidParameter(f"Unknown guidance rule {name!r}. Available: {', '.join(r.name for r in guidance_rules)}",
                           field="guidance")


@dataclass
class RuleParams:
    """The parameters of the rules that have their own (declared once: they are job, API, page and
    infotext fields through GuidanceFields, and the denoiser reads them from GuidanceSettings.params)."""

    # guidance "Dynamic negative": lambda_t = dng_scale * p / (1 - p), p from dng_prior, updated per step
    dng_scale: float = 5.0
    dng_prior: float = 0.01
    dng_temperature: float = 0.2
    dng_offset: float = 2e-4
    dng_p_min: float = 1e-6
    dng_p_max: float = 0.8
    nag_follows_dng: bool = False  # with NAG on: NAG's scale per image follows the posterior (dng_nag_scale)
    # guidance "APG"
    apg_eta: float = 0.0
    apg_norm_threshold: float = 15.0
    apg_momentum: float = -0.5
    # guidance "Dynamic thresholding" (AUTOMATIC1111's sd-dynamic-thresholding names)
    dynthres_mimic_scale: float = 7.0
    dynthres_threshold_percentile: float = 1.0
    dynthres_mimic_mode: str = "Constant"
    dynthres_mimic_scale_min: float = 0.0
    dynthres_cfg_mode: str = "Constant"
    dynthres_cfg_scale_min: float = 0.0
    dynthres_sched_val: float = 1.0


@dataclass
class GuidanceFields(RuleParams):
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
    # NAG, with any rule: the paper's scale s (Z = Z+ + (s - 1)(Z+ - Z-)); 1 = off (0 also means off)
    nag_scale: float = 1.0
    nag_tau: float = 2.5
    nag_alpha: float = 0.5
    nag_start: float = 0.0
    nag_end: float = 1.0


NAG_FIELDS = ("nag_scale", "nag_tau", "nag_alpha", "nag_start", "nag_end")
RULE_FIELDS = {
    "Dynamic negative": ("dng_scale", "dng_prior", "dng_temperature", "dng_offset", "dng_p_min", "dng_p_max",
                         "nag_follows_dng"),
    "APG": ("apg_eta", "apg_norm_threshold", "apg_momentum"),
    "Dynamic thresholding": ("dynthres_mimic_scale", "dynthres_threshold_percentile", "dynthres_mimic_mode",
                             "dynthres_mimic_scale_min", "dynthres_cfg_mode", "dynthres_cfg_scale_min",
                             "dynthres_sched_val"),
}


@dataclass(frozen=True)
class NAGSettings:
    scale: float
    tau: float = 2.5
    alpha: float = 0.5
    start: float = 0.0
    end: float = 1.0

    def active_at(self, step: int, steps: int) -> bool:
        """NAG acts from `start` to `end` (fractions of the steps), like the guidance interval."""
        return self.start <= step / steps and (step / steps < self.end or self.end >= 1)


def nag_enabled(p) -> bool:
    return getattr(p, "nag_scale", 1.0) not in (0, 1)


@dataclass(frozen=True)
class GuidanceSettings:
    """The per-job guidance fields, as the denoiser needs them."""

    rule: GuidanceRule
    scale: float
    negative_weight: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    cfg_rescale: float = 0.0
    s_min_uncond: float = 0.0
    nag: NAGSettings | None = None
    params: RuleParams = field(default_factory=RuleParams)

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
    nag = NAGSettings(float(p.nag_scale), float(p.nag_tau), float(p.nag_alpha), float(p.nag_start),
                      float(p.nag_end)) if nag_enabled(p) else None
    params = RuleParams(**{f.name: getattr(p, f.name) for f in fields(RuleParams)})
    return GuidanceSettings(find_guidance_rule(p.guidance), p.cfg_scale, p.negative_weight,
                            tuple(float(v) for v in p.guidance_interval), p.cfg_rescale, p.s_min_uncond,
                            nag=nag, params=params)


def attention_guidance(model, p: GuidanceFields) -> contextlib.AbstractContextManager:
    """What guidance changes inside the UNet for the duration of one job: with NAG on, NAG processors on
    every cross-attention layer (restored when the job ends, also on an error); otherwise nothing."""
    if not nag_enabled(p):
        return contextlib.nullcontext()
    from modules import sd_attention_guidance

    return sd_attention_guidance.nag_processors(model.unet)


def infotext_params(p: GuidanceFields) -> dict:
    """The infotext entries of the fields added after the first guidance rules (NAG, Dynamic negative,
    APG, dynamic thresholding): every field of what is in use (NAG when on, the
    rule's own), so the image can be made again."""
    labels = {"nag_scale": "NAG scale", "nag_tau": "NAG tau", "nag_alpha": "NAG alpha", "nag_start": "NAG start",
              "nag_end": "NAG end", "dng_scale": "DNG scale", "dng_prior": "DNG prior",
              "dng_temperature": "DNG temperature", "dng_offset": "DNG offset", "dng_p_min": "DNG p min",
              "dng_p_max": "DNG p max", "nag_follows_dng": "NAG follows DNG", "apg_eta": "APG eta",
              "apg_norm_threshold": "APG norm threshold",
              "apg_momentum": "APG momentum"}
    names = list(NAG_FIELDS if nag_enabled(p) else ()) + list(RULE_FIELDS.get(find_guidance_rule(p.guidance).name, ()))
    return {labels.get(name, name): f"{getattr(p, name):g}" if isinstance(getattr(p, name), (int, float))
            else getattr(p, name) for name in names}


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
    validate_new_fields(p)


RANGES = {  # field: (low, high), both included
    "nag_scale": (0.0, 20.0), "nag_tau": (1.0, 10.0), "nag_alpha": (0.0, 1.0), "nag_start": (0.0, 1.0),
    "nag_end": (0.0, 1.0), "dng_scale": (0.0, 50.0), "dng_prior": (1e-6, 0.99), "dng_temperature": (0.0, 100.0),
    "dng_offset": (-1e3, 1e3), "dng_p_min": (1e-9, 0.99), "dng_p_max": (1e-6, 0.999), "apg_eta": (-10.0, 10.0),
    "apg_norm_threshold": (0.0, 1000.0), "apg_momentum": (-5.0, 1.0), "dynthres_mimic_scale": (1.0, 30.0),
    "dynthres_threshold_percentile": (0.0, 1.0), "dynthres_mimic_scale_min": (0.0, 30.0),
    "dynthres_cfg_scale_min": (0.0, 30.0), "dynthres_sched_val": (0.0, 40.0),
}


def validate_new_fields(p) -> None:
    """Ranges of the NAG, Dynamic negative, APG and dynamic-thresholding fields."""
    for name, (lo, hi) in RANGES.items():
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise InvalidParameter(f"{name} must be a number between {lo:g} and {hi:g}, got {value!r}", field=name)
    if not isinstance(p.nag_follows_dng, bool):
        raise InvalidParameter(f"nag_follows_dng must be true or false, got {p.nag_follows_dng!r}",
                               field="nag_follows_dng")
    if 0 < p.nag_scale < 1:
        raise InvalidParameter(f"nag_scale must be 1 (off), 0 (off) or more than 1, got {p.nag_scale}",
                               field="nag_scale")
    if p.nag_start > p.nag_end:
        raise InvalidParameter("nag_start must not be after nag_end", field="nag_start")
    if not p.dng_p_min <= p.dng_prior <= p.dng_p_max:
        raise InvalidParameter(f"dng_prior must lie between dng_p_min and dng_p_max, got {p.dng_prior}",
                               field="dng_prior")
    if p.dynthres_threshold_percentile <= 0:
        raise InvalidParameter("dynthres_threshold_percentile must be more than 0", field="dynthres_threshold_percentile")
    for name in ("dynthres_mimic_mode", "dynthres_cfg_mode"):
        if getattr(p, name) not in DYNTHRES_MODES:
            raise InvalidParameter(f"{name} must be one of {', '.join(DYNTHRES_MODES)}, got {getattr(p, name)!r}",
                                   field=name)
