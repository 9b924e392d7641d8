"""A job from parameters to images: StableDiffusionProcessing* -> process_images -> Processed.

Data flows one way: the parameters are validated, the prompt and the negative prompt are
turned into conditioning schedules, the sampler runs (reporting each step to the hooks),
the latents are decoded, and each image gets its infotext and, unless told not to, a PNG
under outputs/. The model and the job state are arguments, never globals.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from modules import images as images_module
from modules import sd_guidance
from modules import sd_samplers
from modules.conditioning import TextEncodingCache, get_learned_conditioning, get_multicond_learned_conditioning
from modules.errors import InterruptedException, InvalidParameter
from modules.job_state import JobState
from modules.rng import ImageRNG
from modules.sd_samplers import create_sampler, find_sampler_config, get_sampler_and_scheduler
from modules.sd_samplers_cfg_denoiser import CFGDenoiser
from modules.sd_samplers_common import AfterSampleHook, StepInfo

VERSION = "sdneg-0.1.0"

LIMITS = {"steps": (1, 150), "cfg_scale": (1.0, 30.0), "batch_size": (1, 8), "n_iter": (1, 100),
          "width": (8, 2048), "height": (8, 2048), "eta": (0.0, 1.0), "clip_skip": (1, 12)}


@dataclass
class StableDiffusionProcessing(sd_guidance.GuidanceFields):
    """The fields every job shares, with AUTOMATIC1111's names (also the API's JSON fields).

    The guidance fields (guidance, negative_weight, ...) come from `sd_guidance.GuidanceFields`.
    """

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str = "DDIM"
    scheduler: str = "Automatic"  # schedule type (AUTOMATIC1111 1.9+); legacy "DPM++ 2M Karras" names also work
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    eta: float | None = None
    clip_skip: int = 1
    do_not_save_samples: bool = False
    outpath_samples: str = "outputs/txt2img-images"


@dataclass
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """A txt2img job."""


@dataclass
class Processed:
    """The result of a job: images, their infotexts and the seeds that made them."""

    images: list[Image.Image]
    infotexts: list[str]
    prompt: str
    negative_prompt: str
    seed: int
    subseed: int
    all_prompts: list[str]
    all_negative_prompts: list[str]
    all_seeds: list[int]
    all_subseeds: list[int]
    subseed_strength: float
    width: int
    height: int
    sampler_name: str
    cfg_scale: float
    steps: int
    batch_size: int
    clip_skip: int
    sd_model_name: str
    sd_model_hash: str
    job_timestamp: str
    interrupted: bool = False
    saved_paths: list[str] = field(default_factory=list)

    @property
    def info(self) -> str:
        return self.infotexts[0] if self.infotexts else ""

    def js(self) -> dict:
        """The `info` object of AUTOMATIC1111's API response."""
        d = {k: v for k, v in asdict(self).items() if k not in ("images", "saved_paths", "interrupted")}
        d.update(index_of_first_image=0, styles=[], restore_faces=False, face_restoration_model=None,
                 sd_vae_name=None, sd_vae_hash=None, seed_resize_from_w=-1, seed_resize_from_h=-1,
                 denoising_strength=None, extra_generation_params={}, is_using_inpainting_conditioning=False,
                 version=VERSION)
        return d


def _check_range(p, name: str, integer: bool) -> None:
    value = getattr(p, name)
    lo, hi = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise InvalidParameter(f"{name} must be a {'whole ' if integer else ''}number, got {value!r}", field=name)
    if not lo <= value <= hi:
        raise InvalidParameter(f"{name} must be between {lo} and {hi}, got {value}", field=name)


def validate(p: StableDiffusionProcessing, model) -> None:
    """Reject parameters the engine cannot honour, before anything runs or is written."""
    for name in ("steps", "batch_size", "n_iter", "width", "height", "clip_skip"):
        _check_range(p, name, integer=True)
    _check_range(p, "cfg_scale", integer=False)
    if p.eta is not None:
        _check_range(p, "eta", integer=False)
    multiple = max(8, model.vae_scale_factor)
    for name in ("width", "height"):
        if getattr(p, name) % multiple:
            raise InvalidParameter(f"{name} must be a multiple of {multiple}, got {getattr(p, name)}", field=name)
    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(p, name), str):
            raise InvalidParameter(f"{name} must be text", field=name)
    for name in ("seed", "subseed"):
        if isinstance(getattr(p, name), bool) or not isinstance(getattr(p, name), int):
            raise InvalidParameter(f"{name} must be a whole number", field=name)
    if not 0 <= p.subseed_strength <= 1:
        raise InvalidParameter("subseed_strength must be between 0 and 1", field="subseed_strength")
    sd_guidance.validate_guidance(p)
    get_sampler_and_scheduler(p.sampler_name, p.scheduler)  # SamplerNotFound / InvalidParameter(scheduler)


def fix_seed(seed: int) -> int:
    """-1 (or None) means a random seed, which is then reported like any other."""
    return int(random.randrange(4294967294)) if seed is None or seed == -1 else int(seed)


def create_infotext(p: StableDiffusionProcessing, model, prompt: str, negative_prompt: str,
                    seed: int, subseed: int) -> str:
    """AUTOMATIC1111's infotext: prompt, `Negative prompt:` line (if any), then `Key: value` pairs."""
    params = {
        "Steps": p.steps,
        "Sampler": get_sampler_and_scheduler(p.sampler_name, p.scheduler)[0].name,
        "Schedule type": schedule_type_label(p),
        "CFG scale": f"{p.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": model.shorthash,
        "Model": model.name,
        "Variation seed": subseed if p.subseed_strength else None,
        "Variation seed strength": p.subseed_strength or None,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
        **sd_samplers.eta_infotext(p.sampler_name, p.eta),
        **guidance_infotext(p),
        "Version": VERSION,
    }
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{images_module.format_parameters(params)}".strip()


def guidance_infotext(p: StableDiffusionProcessing) -> dict:
    """The negative-guidance fields that differ from plain CFG, for the infotext."""
    lo, hi = p.guidance_interval
    return {
        "Guidance": p.guidance if p.guidance != "CFG" else None,
        "Negative weight": f"{p.negative_weight:g}" if p.negative_weight != 1 else None,
        "Negative start": f"{p.negative_start:g}" if p.negative_start else None,
        "Negative end": f"{p.negative_end:g}" if p.negative_end != 1 else None,
        "Guidance interval": f"{lo:g}-{hi:g}" if (lo, hi) != (0, 1) else None,
        "CFG rescale": f"{p.cfg_rescale:g}" if p.cfg_rescale else None,
        "NGMS": f"{p.s_min_uncond:g}" if p.s_min_uncond else None,
    }


def negative_conditioning(model, encode, p: StableDiffusionProcessing, negative_prompts: list[str]):
    """The negative prompts' schedules, with the job's negative weight and window applied.

    A weight of 0 means "no negative prompt": the texts are replaced by the empty prompt, so
    the result equals an empty negative prompt exactly.
    """
    if p.negative_weight == 0:
        negative_prompts = [""] * len(negative_prompts)
    empty = encode("")
    schedules = get_learned_conditioning(encode, negative_prompts, p.steps)
    if not sd_guidance.find_guidance_rule(p.guidance).separate_negative:  # Perp-Neg weighs the negative itself
        schedules = [sd_guidance.weighted_negative(s, empty, p.negative_weight) for s in schedules]
    return [sd_guidance.windowed_negative(s, empty, p.negative_start, p.negative_end, p.steps) for s in schedules]


def schedule_type_label(p: StableDiffusionProcessing) -> str | None:
    """The infotext's `Schedule type`: the label chosen (or split off a legacy name); left out when Automatic."""
    label = get_sampler_and_scheduler(p.sampler_name, p.scheduler)[1].label
    return None if label == "Automatic" else label


def progress_hook(state: JobState) -> AfterSampleHook:
    """Report each step to the job state, and stop sampling when the job is interrupted or skipped."""

    def hook(info: StepInfo) -> None:
        state.sampling_step = info.step + 1
        state.current_step_info = info
        if state.interrupted or state.skipped:
            raise InterruptedException()

    return hook


def process_images(model, p: StableDiffusionProcessing, hooks: list[AfterSampleHook] = (),
                   state: JobState | None = None) -> Processed:
    """Run a txt2img job on `model`. `hooks` are called after every sampling step with a StepInfo."""
    validate(p, model)
    state = state or JobState()
    seed, subseed = fix_seed(p.seed), fix_seed(p.subseed)
    count = p.batch_size * p.n_iter
    all_prompts, all_negative_prompts = [p.prompt] * count, [p.negative_prompt] * count
    all_seeds = [seed + (i if p.subseed_strength == 0 else 0) for i in range(count)]
    all_subseeds = [subseed + i for i in range(count)]
    sampler = create_sampler(p.sampler_name, model, scheduler=p.scheduler, eta=p.eta)
    encode = TextEncodingCache(lambda text: model.get_learned_conditioning(text, p.clip_skip))
    guidance = sd_guidance.settings_for(p)
    latent_shape = (model.latent_channels, p.height // model.vae_scale_factor, p.width // model.vae_scale_factor)
    hooks = [progress_hook(state), *hooks]
    output_images, infotexts, saved = [], [], []
    state.begin("txt2img", p.n_iter)
    try:
        with torch.no_grad():
            for n in range(p.n_iter):
                if state.interrupted:
                    break
                batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
                prompts, negative_prompts = all_prompts[batch], all_negative_prompts[batch]
                cond = get_multicond_learned_conditioning(encode, prompts, p.steps)
                uncond = negative_conditioning(model, encode, p, negative_prompts)
                rng = ImageRNG(latent_shape, all_seeds[batch], all_subseeds[batch], p.subseed_strength,
                               device=model.device, dtype=model.dtype)
                state.sampling_steps = p.steps
                denoiser = CFGDenoiser(model, cond, uncond, p.cfg_scale, p.steps, encode(""), guidance)
                with sd_guidance.attention_guidance(model, p):
                    samples = sampler.sample(denoiser, rng.first(), p.steps, rng, hooks)
                for i, image in enumerate(images_module.latents_to_pil(model.decode_first_stage(samples))):
                    index = n * p.batch_size + i
                    text = create_infotext(p, model, all_prompts[index], all_negative_prompts[index],
                                           all_seeds[index], all_subseeds[index])
                    output_images.append(image)
                    infotexts.append(text)
                    if not p.do_not_save_samples:
                        folder = Path(p.outpath_samples) / time.strftime("%Y-%m-%d")
                        saved.append(str(images_module.save_image(image, folder, all_seeds[index], text)))
                state.next_batch()
    finally:
        interrupted = state.interrupted
        state.end()
    return Processed(
        images=output_images, infotexts=infotexts, prompt=p.prompt, negative_prompt=p.negative_prompt,
        seed=all_seeds[0], subseed=all_subseeds[0], all_prompts=all_prompts, all_negative_prompts=all_negative_prompts,
        all_seeds=all_seeds, all_subseeds=all_subseeds, subseed_strength=p.subseed_strength, width=p.width,
        height=p.height, sampler_name=find_sampler_config(p.sampler_name).name, cfg_scale=p.cfg_scale, steps=p.steps,
        batch_size=p.batch_size, clip_skip=p.clip_skip, sd_model_name=model.name, sd_model_hash=model.shorthash,
        job_timestamp=state.job_timestamp, interrupted=interrupted, saved_paths=saved)
