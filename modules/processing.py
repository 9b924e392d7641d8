"""A job from parameters to images: StableDiffusionProcessing* -> process_images -> Processed.

Data flows one way: the parameters are validated, the prompt and the negative prompt are
turned into conditioning schedules, the sampler runs (reporting each step to the hooks),
the latents are decoded, and each image gets its infotext and, unless told not to, a PNG
under outputs/. The model and the job state are arguments, never globals.

One loop serves txt2img and img2img: the job's class decides how each batch's starting
latent is made (noise for txt2img; for img2img the init images, resized, encoded and noised
part-way down the schedule) and which sampler entry runs (`Sampler.sample` or
`Sampler.sample_img2img`). Inpainting wraps the denoiser (`masking.MaskedDenoiser`) and, for a
9-channel inpainting checkpoint, the model (`masking.ImageConditionedModel`); the hires fix is
an img2img pass on the first pass's upscaled result. Hooks, previews and guidance rules see
every pass the same way; `StepInfo.pass_label` and the job state's `textinfo` tell which.
"""
from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from modules import images as images_module
from modules import interrupt
from modules import masking, sd_guidance, sd_hijack_tiling, sd_samplers, upscaler
from modules import extra_networks  # <lora:...> tags applied for the job, TI / Lora hashes
from modules.conditioning import TextEncodingCache, get_learned_conditioning, get_multicond_learned_conditioning
from modules.errors import InterruptedException, InvalidParameter, UserError
from modules.job_state import JobState
from modules.rng import ImageRNG
from modules.sd_samplers import create_sampler, find_sampler_config, get_sampler_and_scheduler
from modules.sd_samplers_cfg_denoiser import CFGDenoiser
from modules.sd_samplers_common import AfterSampleHook, StepInfo, img2img_steps

VERSION = "sdneg-0.1.0"

LIMITS = {"steps": (1, 150), "cfg_scale": (1.0, 30.0), "batch_size": (1, 8), "n_iter": (1, 100),
          "width": (8, 2048), "height": (8, 2048), "eta": (0.0, 1.0), "clip_skip": (1, 12),
          "denoising_strength": (0.0, 1.0), "hr_scale": (1.0, 4.0), "hr_resize_x": (0, 2048),
          "hr_resize_y": (0, 2048), "hr_second_pass_steps": (0, 150), "hr_cfg": (1.0, 30.0),
          "resize_mode": (0, 3), "mask_blur": (0, 64), "mask_blur_x": (0, 64), "mask_blur_y": (0, 64),
          "inpainting_fill": (0, 3), "inpaint_full_res_padding": (0, 256), "inpainting_mask_invert": (0, 1),
          "initial_noise_multiplier": (0.0, 2.0)}
MAX_IMAGE_SIDE = 2048  # the engine's limit for a hires target and an init image
INPAINTING_FILL = ["fill", "original", "latent noise", "latent nothing"]
RESIZE_MODES = ["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"]


@dataclass(frozen=True)
class JobOptions:
    """The server options a job runs with, copied in by the job layer (webui/jobs.py) when it is made.

    AUTOMATIC1111 reads these from its global `opts` while a job runs; here they are a value on
    the job, so a settings change never reaches a job already queued, and a test sets them
    directly. The field names are AUTOMATIC1111's option keys; the defaults are its defaults.
    """

    randn_source: str = "CPU"  # CPU (the default: a seed gives the same image on any device) / GPU / NV (modules/rng.py)
    eta_noise_seed_delta: int = 0  # ENSD: later noise draws from seed + delta
    always_discard_next_to_last_sigma: bool = False
    sdxl_crop_top: int = 0  # SDXL's crop-coordinates conditioning
    sdxl_crop_left: int = 0
    add_model_name_to_info: bool = True
    add_model_hash_to_info: bool = True
    add_vae_name_to_info: bool = True
    add_vae_hash_to_info: bool = True
    add_version_to_infotext: bool = True
    grid_format: str = "png"
    saving: images_module.SaveSettings = field(default_factory=images_module.SaveSettings)

    @classmethod
    def option_keys(cls) -> list[str]:
        """The option keys a job reads: these fields' names, and SaveSettings' in place of `saving`."""
        from dataclasses import fields as dataclass_fields

        own = [f.name for f in dataclass_fields(cls) if f.name != "saving"]
        return own + [f.name for f in dataclass_fields(images_module.SaveSettings)]

    @classmethod
    def from_options(cls, options) -> "JobOptions":
        """The job's options from a mapping of option key -> value (the server's, with override_settings)."""
        from dataclasses import fields as dataclass_fields

        values = {f.name: options[f.name] for f in dataclass_fields(cls)
                  if f.name != "saving" and options.get(f.name) is not None}
        return cls(**values, saving=images_module.SaveSettings.from_options(options))


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
    tiling: bool = False  # circular padding in the UNet and VAE convolutions: a picture that tiles seamlessly
    do_not_save_samples: bool = False
    outpath_samples: str = "outputs/txt2img-images"
    # Set by the job layer, never by a request (init=False keeps them out of the request fields):
    # where ESRGAN-family upscaler models are looked for (`<dir>/ESRGAN/`; None: the repo's models/),
    # and whether .pth upscaler pickles may be loaded (with torch.load(weights_only=True)).
    upscaler_models_dir: str | None = field(default=None, init=False, repr=False, compare=False)
    allow_pickle_upscalers: bool = field(default=False, init=False, repr=False, compare=False)
    opts: JobOptions = field(default_factory=JobOptions)  # the server's options for this job (never a request's)
    # infotext keys a script adds (AUTOMATIC1111's p.extra_generation_params, e.g. "SD upscale overlap")
    extra_generation_params: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    job_name = "txt2img"  # the JobState's job and the StepInfo pass label of the main pass

    @property
    def uses_denoising_strength(self) -> bool:
        return False


@dataclass
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """A txt2img job, with AUTOMATIC1111's hires fix (`enable_hr`): the first pass at width x height,
    its result upscaled (`hr_upscaler`: a latent mode or a pixel upscaler) by `hr_scale` or to
    `hr_resize_x` x `hr_resize_y`, then an img2img pass of `hr_second_pass_steps` (0: `steps`) at
    `denoising_strength`, with its own prompt, negative prompt, sampler, schedule type and CFG
    (`hr_*`; empty or None: the first pass's; `hr_cfg` is Forge's)."""

    enable_hr: bool = False
    denoising_strength: float = 0.75
    hr_scale: float = 2.0
    hr_upscaler: str | None = None  # None: "Latent" (AUTOMATIC1111's latent_upscale_default_mode)
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None

    @property
    def uses_denoising_strength(self) -> bool:
        return bool(self.enable_hr)


@dataclass
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """An img2img or inpainting job, with AUTOMATIC1111's fields and defaults.

    `init_images` and `mask` are PIL images (decoding base64 is the job layer's business). With a
    mask, white is repainted (`inpainting_mask_invert`: black); `inpaint_full_res` ("only masked")
    works on the mask's box plus `inpaint_full_res_padding` at the full width x height and pastes
    it back; `inpainting_fill` says what the masked area starts from (0 fill, 1 original,
    2 latent noise, 3 latent nothing). `image_cfg_scale` is accepted and unused (no
    instruct-pix2pix models); `include_init_images` is for the API response.
    """

    init_images: list = field(default_factory=list)
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: Any = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float = 1.0
    latent_mask: Any = None
    include_init_images: bool = False
    img2img_fix_steps: bool = False  # AUTOMATIC1111's option: run exactly `steps` steps (on a longer schedule)
    outpath_samples: str = "outputs/img2img-images"

    job_name = "img2img"

    def __post_init__(self):
        if self.mask_blur is not None and not isinstance(self.mask_blur, bool) and isinstance(self.mask_blur, int):
            self.mask_blur_x = self.mask_blur_y = self.mask_blur

    @property
    def uses_denoising_strength(self) -> bool:
        return True

    @property
    def mask_blur_xy(self) -> tuple[int, int]:
        if self.mask_blur is not None:
            return self.mask_blur, self.mask_blur
        return self.mask_blur_x, self.mask_blur_y


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
    denoising_strength: float | None = None  # img2img's, and txt2img's with the hires fix; else None
    is_using_inpainting_conditioning: bool = False  # the model is an inpainting checkpoint (9-channel UNet)
    extra_generation_params: dict = field(default_factory=dict)  # the infotext's img2img / hires keys
    comments: str = ""  # the job's warnings, one a line (AUTOMATIC1111's): LoRAs left out, unknown tags
    negative_report: list = field(default_factory=list)  # per image, the model's verdict (negative_verdict.py)
    styles: list = field(default_factory=list)  # the style names the job layer applied (AUTOMATIC1111's info)

    @property
    def info(self) -> str:
        return self.infotexts[0] if self.infotexts else ""

    def js(self) -> dict:
        """The `info` object of AUTOMATIC1111's API response."""
        d = {k: v for k, v in asdict(self).items() if k not in ("images", "saved_paths", "interrupted")}
        d.update(index_of_first_image=0, restore_faces=False, face_restoration_model=None,
                 sd_vae_name=None, sd_vae_hash=None, seed_resize_from_w=-1, seed_resize_from_h=-1,
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
    layers = getattr(model, "max_clip_skip", LIMITS["clip_skip"][1])
    if p.clip_skip > layers:  # CLIP skip n takes the n-th hidden state from the end: the encoder has `layers`
        raise InvalidParameter(f"clip_skip must be at most {layers} for this model (its text encoder has {layers} "
                               f"layers), got {p.clip_skip}", field="clip_skip")
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
    if not isinstance(p.tiling, bool):
        raise InvalidParameter("tiling must be true or false", field="tiling")
    sd_guidance.validate_guidance(p)
    get_sampler_and_scheduler(p.sampler_name, p.scheduler)  # SamplerNotFound / InvalidParameter(scheduler)
    if p.uses_denoising_strength:
        _check_range(p, "denoising_strength", integer=False)
    if isinstance(p, StableDiffusionProcessingImg2Img):
        validate_img2img(p, model)
    elif getattr(p, "enable_hr", False):
        validate_hires(p, model)


def validate_hires(p: StableDiffusionProcessingTxt2Img, model) -> None:
    """The hires fix's fields: scale 1..4, a target of at most 2048 px a side, an upscaler that exists."""
    if not isinstance(p.enable_hr, bool):
        raise InvalidParameter("enable_hr must be true or false", field="enable_hr")
    _check_range(p, "hr_scale", integer=False)
    for name in ("hr_resize_x", "hr_resize_y", "hr_second_pass_steps"):
        _check_range(p, name, integer=True)
    if p.hr_cfg is not None:
        _check_range(p, "hr_cfg", integer=False)
    for name in ("hr_prompt", "hr_negative_prompt"):
        if not isinstance(getattr(p, name), str):
            raise InvalidParameter(f"{name} must be text", field=name)
    hires_sampler(p)  # SamplerNotFound (field hr_sampler_name) / InvalidParameter (field hr_scheduler)
    w, h, _, _ = hires_target(p, model.vae_scale_factor)
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE:
        raise InvalidParameter(f"the hires fix would make a {w}x{h} picture; at most {MAX_IMAGE_SIDE} px a side",
                               field="hr_resize_x" if p.hr_resize_x or p.hr_resize_y else "hr_scale")
    if w < p.width or h < p.height or w < model.vae_scale_factor or h < model.vae_scale_factor:
        raise InvalidParameter(f"the hires fix's target {w}x{h} is smaller than the first pass's "
                               f"{p.width}x{p.height}", field="hr_resize_x" if p.hr_resize_x else "hr_scale")
    if not isinstance(p.hr_upscaler, (str, type(None))):
        raise InvalidParameter("hr_upscaler must be an upscaler's name", field="hr_upscaler")
    if not upscaler.is_latent_upscaler(p.hr_upscaler):
        upscaler.find_upscaler(p.hr_upscaler, p.upscaler_models_dir, field="hr_upscaler")


SAME = (None, "", "Use same sampler", "Use same scheduler")  # AUTOMATIC1111's "same as the first pass" values


def hires_sampler(p: StableDiffusionProcessingTxt2Img) -> tuple[str, str | None]:
    """(sampler name, schedule type) of the hires pass: the hr_* ones, else the first pass's. A schedule
    type carried over from the first pass that the hires sampler cannot take (DDIM, PLMS) becomes Automatic."""
    name = p.sampler_name if p.hr_sampler_name in SAME else p.hr_sampler_name
    if p.hr_scheduler not in SAME:
        try:
            get_sampler_and_scheduler(name, p.hr_scheduler)
        except InvalidParameter as e:
            raise InvalidParameter(str(e), field="hr_scheduler") from e
        except UserError as e:
            e.field = "hr_sampler_name"
            raise
        return name, p.hr_scheduler
    try:
        get_sampler_and_scheduler(name, p.scheduler)
        return name, p.scheduler
    except InvalidParameter:
        pass
    except UserError as e:
        e.field = "hr_sampler_name"
        raise
    try:
        get_sampler_and_scheduler(name, None)
    except UserError as e:
        e.field = "hr_sampler_name"
        raise
    return name, None


def validate_img2img(p: StableDiffusionProcessingImg2Img, model) -> None:
    """img2img's fields: init images (PIL, at most 2048 px a side, 1 or up to batch_size of them), the mask."""
    images = p.init_images
    if not isinstance(images, (list, tuple)) or not images:
        raise InvalidParameter("img2img needs an init image (init_images is empty)", field="init_images")
    for image in images:
        if not isinstance(image, Image.Image):
            raise InvalidParameter("init_images must be pictures", field="init_images")
        if max(image.size) > MAX_IMAGE_SIDE or min(image.size) < 1:
            raise InvalidParameter(f"an init image is {image.width}x{image.height}; at most {MAX_IMAGE_SIDE} px a side",
                                   field="init_images")
    if len(images) > p.batch_size:
        raise InvalidParameter(f"{len(images)} init images for a batch size of {p.batch_size}: give one, or at most "
                               "batch_size", field="init_images")
    if p.mask_blur is not None:
        _check_range(p, "mask_blur", integer=True)
    for name in ("resize_mode", "inpainting_fill", "inpaint_full_res_padding", "inpainting_mask_invert",
                 "mask_blur_x", "mask_blur_y"):
        _check_range(p, name, integer=True)
    _check_range(p, "initial_noise_multiplier", integer=False)
    for name in ("inpaint_full_res", "img2img_fix_steps", "include_init_images"):
        if not isinstance(getattr(p, name), (bool, int)):
            raise InvalidParameter(f"{name} must be true or false", field=name)
    for name in ("mask", "latent_mask"):
        value = getattr(p, name)
        if value is not None:
            if not isinstance(value, Image.Image):
                raise InvalidParameter(f"{name} must be a picture", field=name)
            if max(value.size) > MAX_IMAGE_SIDE:
                raise InvalidParameter(f"the {name} is {value.width}x{value.height}; at most {MAX_IMAGE_SIDE} px a side",
                                       field=name)
    if p.img2img_fix_steps and p.denoising_strength <= 0:
        raise InvalidParameter("denoising_strength 0 with img2img_fix_steps would need an endless schedule",
                               field="denoising_strength")


def fix_seed(seed: int) -> int:
    """-1 (or None) means a random seed, which is then reported like any other."""
    return int(random.randrange(4294967294)) if seed is None or seed == -1 else int(seed)


def create_infotext(p: StableDiffusionProcessing, model, prompt: str, negative_prompt: str,
                    seed: int, subseed: int, extra: dict | None = None) -> str:
    """AUTOMATIC1111's infotext: prompt, `Negative prompt:` line (if any), then `Key: value` pairs.

    `extra` are the job's generation parameters that depend on how it ran (mask, hires fix):
    `Processed.extra_generation_params`, as AUTOMATIC1111's `p.extra_generation_params`.
    """
    params = {
        "Steps": p.steps,
        "Sampler": get_sampler_and_scheduler(p.sampler_name, p.scheduler)[0].name,
        "Schedule type": schedule_type_label(p),
        "CFG scale": f"{p.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": model.shorthash if p.opts.add_model_hash_to_info else None,
        "Model": model.name if p.opts.add_model_name_to_info else None,
        # a VAE chosen by the sd_vae option (modules/sd_vae.py)
        "VAE hash": getattr(model, "vae_hash", None) if p.opts.add_vae_hash_to_info else None,
        "VAE": getattr(model, "vae_name", None) if p.opts.add_vae_name_to_info else None,
        "Variation seed": subseed if p.subseed_strength else None,
        "Variation seed strength": p.subseed_strength or None,
        "Denoising strength": f"{p.denoising_strength:g}" if p.uses_denoising_strength else None,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
        "Tiling": "True" if p.tiling else None,
        **sd_samplers.eta_infotext(p.sampler_name, p.eta),
        "ENSD": p.opts.eta_noise_seed_delta if sd_samplers.uses_ensd(p.sampler_name, p.eta) and p.opts.eta_noise_seed_delta
        else None,
        "RNG": p.opts.randn_source if p.opts.randn_source != "GPU" else None,
        "Discard penultimate sigma": "True" if p.opts.always_discard_next_to_last_sigma
        and sd_samplers.honours_discard_option(p.sampler_name) else None,
        **guidance_infotext(p),
        **(extra if extra is not None else generation_params(p)),
        "Version": VERSION if p.opts.add_version_to_infotext else None,
    }
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{images_module.format_parameters(params)}".strip()


def generation_params(p: StableDiffusionProcessing, full_res_used: bool | None = None) -> dict:
    """The img2img / inpainting / hires keys of the infotext (AUTOMATIC1111's extra_generation_params)."""
    out: dict = {}
    if isinstance(p, StableDiffusionProcessingImg2Img):
        if p.mask is not None:
            bx, by = p.mask_blur_xy
            if bx > 0 or by > 0:
                out["Mask blur"] = bx if bx == by else None
            out["Mask mode"] = "Inpaint not masked" if p.inpainting_mask_invert else None
            out["Masked content"] = INPAINTING_FILL[p.inpainting_fill]
            if p.inpaint_full_res if full_res_used is None else full_res_used:
                out["Inpaint area"] = "Only masked"
                out["Masked area padding"] = p.inpaint_full_res_padding
        if p.initial_noise_multiplier != 1.0:
            out["Noise multiplier"] = f"{p.initial_noise_multiplier:g}"
    elif getattr(p, "enable_hr", False):
        if p.hr_resize_x == 0 and p.hr_resize_y == 0:
            out["Hires upscale"] = f"{p.hr_scale:g}"
        else:
            out["Hires resize"] = f"{p.hr_resize_x}x{p.hr_resize_y}"
        out["Hires steps"] = p.hr_second_pass_steps or None
        out["Hires upscaler"] = p.hr_upscaler
        hr_name, hr_scheduler = hires_sampler(p)
        hr_data, hr_sched = get_sampler_and_scheduler(hr_name, hr_scheduler)
        first_data, first_sched = get_sampler_and_scheduler(p.sampler_name, p.scheduler)
        if hr_data is not first_data:
            out["Hires sampler"] = hr_data.name
        if hr_sched is not first_sched:
            out["Hires schedule type"] = hr_sched.label
        if p.hr_prompt and p.hr_prompt != p.prompt:
            out["Hires prompt"] = p.hr_prompt
        if p.hr_negative_prompt and p.hr_negative_prompt != p.negative_prompt:
            out["Hires negative prompt"] = p.hr_negative_prompt
        if p.hr_cfg is not None and p.hr_cfg != p.cfg_scale:
            out["Hires CFG Scale"] = f"{p.hr_cfg:g}"
    return out


def infotext_fields(text: str) -> dict:
    """Infotext -> processing fields (images.parse_generation_parameters + the key table), with
    AUTOMATIC1111's paste rule for the hires fix: its keys in the text turn `enable_hr` on."""
    params = images_module.parse_generation_parameters(text)
    fields = images_module.infotext_to_fields(params)
    if any(k in params for k in ("Hires upscale", "Hires resize-1", "Hires upscaler", "Hires steps")):
        fields["enable_hr"] = True
    return fields


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
        **sd_guidance.infotext_params(p),  # NAG, Dynamic negative, APG, dynamic thresholding: what is in use
    }


def negative_conditioning(model, encode, p: StableDiffusionProcessing, negative_prompts: list[str],
                          steps: int | None = None):
    """The negative prompts' schedules (for `steps`, default the job's), with the job's negative
    weight and window applied.

    A weight of 0 means "no negative prompt": the texts are replaced by the empty prompt, so
    the result equals an empty negative prompt exactly.
    """
    steps = p.steps if steps is None else steps
    if p.negative_weight == 0:
        negative_prompts = [""] * len(negative_prompts)
    empty = encode("")
    schedules = get_learned_conditioning(encode, negative_prompts, steps)
    if not sd_guidance.find_guidance_rule(p.guidance).separate_negative:  # Perp-Neg weighs the negative itself
        schedules = [sd_guidance.weighted_negative(s, empty, p.negative_weight) for s in schedules]
    return [sd_guidance.windowed_negative(s, empty, p.negative_start, p.negative_end, steps) for s in schedules]


def schedule_type_label(p: StableDiffusionProcessing) -> str | None:
    """The infotext's `Schedule type`: the label chosen (or split off a legacy name); left out when Automatic."""
    label = get_sampler_and_scheduler(p.sampler_name, p.scheduler)[1].label
    return None if label == "Automatic" else label


def progress_hook(state: JobState) -> AfterSampleHook:
    """Report each step to the job state, and stop sampling when the job is interrupted or skipped."""

    def hook(info: StepInfo) -> None:
        state.sampling_step = info.step + 1
        state.sampling_steps = info.steps
        state.current_step_info = info
        if state.interrupted or state.skipped:
            raise InterruptedException()

    return hook


def pass_label_hook(label: str) -> AfterSampleHook:
    """Tag each step's report with the pass it belongs to ("txt2img", "img2img", "hires")."""

    def hook(info: StepInfo) -> None:
        info.pass_label = label

    return hook


# ---- one sampling pass -----------------------------------------------------------------------------------

@dataclass
class SamplingPass:
    """What one run of a sampler needs: txt2img's (no init latent) or an img2img start part-way down."""

    label: str
    sampler_name: str
    scheduler: str | None
    cfg_scale: float
    steps: int
    prompts: list[str]
    negative_prompts: list[str]
    init_latent: torch.Tensor | None = None
    denoising_strength: float = 1.0
    fix_steps: bool = False
    mask: torch.Tensor | None = None  # 1 where the init latent is kept (inpainting)
    nmask: torch.Tensor | None = None  # 1 where it is repainted
    image_conditioning: torch.Tensor | None = None  # inpainting checkpoints: [mask, masked image latents]

    def steps_that_run(self) -> int:
        if self.init_latent is None:
            return self.steps
        return img2img_steps(self.steps, self.denoising_strength, self.fix_steps)[1] + 1


def run_pass(model, p: StableDiffusionProcessing, sp: SamplingPass, encode: TextEncodingCache, rng: ImageRNG,
             noise: torch.Tensor, hooks: list[AfterSampleHook], state: JobState) -> torch.Tensor:
    """Conditioning for the pass, the CFG denoiser (wrapped for masks and image conditioning), the sampler."""
    discard = p.opts.always_discard_next_to_last_sigma and sd_samplers.honours_discard_option(sp.sampler_name)
    sampler = create_sampler(sp.sampler_name, model, scheduler=sp.scheduler, eta=p.eta,
                             **({"discard_next_to_last_sigma": True} if discard else {}),
                             **({"philox_noise": True} if p.opts.randn_source == "NV" else {}))
    cond = get_multicond_learned_conditioning(encode, sp.prompts, sp.steps)
    uncond = negative_conditioning(model, encode, p, sp.negative_prompts, sp.steps)
    q = p
    if sp.cfg_scale != p.cfg_scale or sp.steps != p.steps:  # the guidance settings of this pass (hires CFG)
        q = copy.copy(p)
        q.cfg_scale, q.steps = sp.cfg_scale, sp.steps
    guidance = sd_guidance.settings_for(q)
    unet_model = model
    crop = (p.opts.sdxl_crop_top, p.opts.sdxl_crop_left)
    if getattr(model, "is_sdxl", False) and crop != (0, 0):
        unet_model = CropConditionedModel(model, crop)
    if sp.image_conditioning is not None:
        part_image = torch.tensor([i for i, parts in enumerate(cond.batch) for _ in parts])
        unet_model = masking.ImageConditionedModel(unet_model, sp.image_conditioning, part_image)
    denoiser = CFGDenoiser(unet_model, cond, uncond, sp.cfg_scale, sp.steps, encode(""), guidance)
    if sp.mask is not None:
        denoiser = masking.MaskedDenoiser(denoiser, model, sp.init_latent, sp.mask, sp.nmask)
    state.sampling_step, state.sampling_steps = 0, sp.steps_that_run()
    hooks = [pass_label_hook(sp.label), *hooks]
    state.current_step_info = None  # this pass's last step, once it has one
    try:
        # Interrupt and skip are checked before every UNet sub-block too, so a step of minutes stops in seconds
        with sd_guidance.attention_guidance(model, q), \
                interrupt.interruptible(model.unet, lambda: state.interrupted or state.skipped,
                                        enabled=getattr(model, "compiled_unet", None) is None):
            if sp.init_latent is None:
                samples = sampler.sample(denoiser, noise, sp.steps, rng, hooks)
            else:
                samples = sampler.sample_img2img(denoiser, sp.init_latent, noise, sp.steps, sp.denoising_strength,
                                                 rng, hooks, fix_steps=sp.fix_steps)
    except InterruptedException:  # stopped inside a step: what the last finished step predicted, as AUTOMATIC1111
        last = state.current_step_info
        samples = last.pred_x0 if last is not None else (sp.init_latent if sp.init_latent is not None else noise)
    if sp.mask is not None:  # AUTOMATIC1111: the kept area is the init latent exactly
        samples = samples * sp.nmask.to(samples.dtype) + sp.init_latent.to(samples.dtype) * sp.mask.to(samples.dtype)
    return samples


def rng_options(p: StableDiffusionProcessing) -> dict:
    """ImageRNG's options from the job's: the noise source and ENSD (modules/rng.py)."""
    return {"source": p.opts.randn_source, "eta_noise_seed_delta": p.opts.eta_noise_seed_delta}


class CropConditionedModel:
    """The model as the CFG denoiser sees it, for SDXL with the `sdxl_crop_top` / `sdxl_crop_left`
    options: every UNet call gets those crop coordinates in its size conditioning."""

    def __init__(self, model, crop: tuple[int, int]):
        self.model, self.crop = model, tuple(crop)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def apply_model(self, x: torch.Tensor, t, cond, image_conditioning: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.apply_model(x, t, cond, image_conditioning=image_conditioning, crop_coords=self.crop)


def txt2img_image_conditioning(model, batch: int, latent_shape: tuple[int, ...]) -> torch.Tensor | None:
    """For an inpainting checkpoint without a picture to keep (txt2img, the hires pass): "repaint all",
    a mask of ones and the latents of an all-zero (grey) picture (AUTOMATIC1111's txt2img_image_conditioning)."""
    if not model.is_inpainting:
        return None
    f = model.vae_scale_factor
    zeros = torch.zeros(1, 3, latent_shape[-2] * f, latent_shape[-1] * f)
    return masking.inpainting_image_conditioning(model, zeros, latent_shape).expand(batch, -1, -1, -1)


# ---- img2img: init images, masks ----------------------------------------------------------------------

@dataclass
class Img2ImgInit:
    """What AUTOMATIC1111's `StableDiffusionProcessingImg2Img.init` prepares once per job."""

    init_latent: torch.Tensor  # (batch, C, h, w)
    source: torch.Tensor  # the init pictures as the VAE saw them, (batch, 3, H, W) in [-1, 1]
    batch_size: int
    mask: torch.Tensor | None = None
    nmask: torch.Tensor | None = None
    image_conditioning: torch.Tensor | None = None
    overlays: list[Image.Image] | None = None
    paste_to: tuple[int, int, int, int] | None = None
    full_res_used: bool = False


def _resize_kwargs(p: StableDiffusionProcessing, model) -> dict:
    return dict(models_dir=p.upscaler_models_dir, allow_pickle=p.allow_pickle_upscalers, device=model.device)


def prepare_img2img(model, p: StableDiffusionProcessingImg2Img) -> Img2ImgInit:
    """Init images -> flattened, resized (or cropped to the mask's box), filled, encoded; the masks
    at latent resolution, the overlays for the paste-back, and an inpainting model's conditioning."""
    width, height = p.width, p.height
    mask_resize_mode = 0 if p.resize_mode == 3 else p.resize_mode
    first = p.init_images[0]
    crop_region, paste_to, mask_for_overlay, image_mask = None, None, None, None
    if p.mask is not None:
        image_mask = masking.create_binary_mask(p.mask)
        if p.inpainting_mask_invert:
            image_mask = ImageOps.invert(image_mask)
        bx, by = p.mask_blur_xy
        image_mask = masking.blur_mask(image_mask, bx, by)
        if p.inpaint_full_res:
            if image_mask.size != first.size:  # a mask of another size: stretched onto the picture
                image_mask = image_mask.resize(first.size, images_module.LANCZOS)
            crop_region = masking.get_crop_region(np.asarray(image_mask), p.inpaint_full_res_padding)
            if crop_region is not None:
                mask_for_overlay = image_mask
                crop_region = masking.expand_crop_region(crop_region, width, height, image_mask.width,
                                                         image_mask.height)
                x1, y1, x2, y2 = crop_region
                image_mask = images_module.resize_image(2, image_mask.crop(crop_region), width, height)
                paste_to = (x1, y1, x2 - x1, y2 - y1)
        if crop_region is None:  # whole picture (also "only masked" with an empty mask, as AUTOMATIC1111)
            image_mask = images_module.resize_image(mask_resize_mode, image_mask, width, height)
            np_mask = np.clip(np.asarray(image_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
            mask_for_overlay = Image.fromarray(np_mask)
    latent_mask = p.latent_mask if p.latent_mask is not None else image_mask
    if p.latent_mask is not None:
        latent_mask = images_module.resize_image(mask_resize_mode, p.latent_mask.convert("L"), width, height)

    imgs, overlays = [], [] if image_mask is not None else None
    for img in p.init_images:
        image = images_module.flatten(img)
        if crop_region is not None and image.size != first.size:
            image = image.resize(first.size, images_module.LANCZOS)
        if crop_region is None:
            if p.resize_mode != 3:
                image = images_module.resize_image(p.resize_mode, image, width, height, **_resize_kwargs(p, model))
            else:  # encoded at its own size (rounded to the latent grid), the latent then stretched
                f = model.vae_scale_factor
                size = (max(f, image.width // f * f), max(f, image.height // f * f))
                image = image if image.size == size else image.resize(size, images_module.LANCZOS)
        if image_mask is not None:
            base = image if p.resize_mode != 3 or crop_region is not None else image.resize((width, height),
                                                                                           images_module.LANCZOS)
            overlays.append(masking.overlay_image(base, mask_for_overlay))
        if crop_region is not None:
            image = images_module.resize_image(2, image.crop(crop_region), width, height)
        if image_mask is not None and p.inpainting_fill != 1:
            image = masking.fill(image, latent_mask)
        imgs.append(image)

    batch_size = p.batch_size if len(imgs) == 1 else len(imgs)
    source = images_module.pil_to_tensor(imgs)
    init_latent = model.encode_first_stage(source)
    if len(imgs) == 1:
        source = source.expand(batch_size, -1, -1, -1)
        init_latent = init_latent.expand(batch_size, -1, -1, -1).contiguous()
        overlays = overlays * batch_size if overlays is not None else None
    if p.resize_mode == 3:
        f = model.vae_scale_factor
        init_latent = torch.nn.functional.interpolate(init_latent, size=(height // f, width // f), mode="bilinear")
    init = Img2ImgInit(init_latent, source, batch_size, overlays=overlays, paste_to=paste_to,
                       full_res_used=crop_region is not None)
    if image_mask is not None:
        init.mask, init.nmask = masking.latent_masks(latent_mask, tuple(init_latent.shape[1:]), model.device,
                                                     model.dtype)
    if model.is_inpainting:
        if p.resize_mode == 3:  # the conditioning is made at the latent's size
            source = torch.nn.functional.interpolate(source, size=(height, width), mode="bilinear")
        init.image_conditioning = masking.inpainting_image_conditioning(model, source, tuple(init_latent.shape),
                                                                        image_mask)
    return init


# ---- the hires fix ------------------------------------------------------------------------------------------

def hires_target(p: StableDiffusionProcessingTxt2Img, vae_scale_factor: int = 8) -> tuple[int, int, int, int]:
    """(width, height, truncate_x, truncate_y) of the hires pass: AUTOMATIC1111's calculate_target_resolution.

    By scale: `int(side * hr_scale)`. To one of hr_resize_x / y: the other side keeps the aspect
    ratio. To both: the picture is upscaled to cover the box and the latent cropped to it
    (truncate_x/y latent columns/rows, half on each side). Sides are rounded down to the latent grid.
    """
    f = vae_scale_factor
    if p.hr_resize_x == 0 and p.hr_resize_y == 0:
        w, h = int(p.width * p.hr_scale), int(p.height * p.hr_scale)
        return w // f * f, h // f * f, 0, 0
    if p.hr_resize_y == 0:
        w, h = p.hr_resize_x, p.hr_resize_x * p.height // p.width
        return w // f * f, h // f * f, 0, 0
    if p.hr_resize_x == 0:
        w, h = p.hr_resize_y * p.width // p.height, p.hr_resize_y
        return w // f * f, h // f * f, 0, 0
    target_w, target_h = p.hr_resize_x, p.hr_resize_y
    if p.width / p.height < target_w / target_h:
        w, h = target_w, target_w * p.height // p.width
    else:
        w, h = target_h * p.width // p.height, target_h
    w, h = w // f * f, h // f * f
    return w, h, (w - target_w) // f, (h - target_h) // f


def hires_pass(model, p: StableDiffusionProcessingTxt2Img, samples: torch.Tensor, prompts: list[str],
               negative_prompts: list[str], seeds: list[int], subseeds: list[int], encode: TextEncodingCache,
               hooks: list[AfterSampleHook], state: JobState) -> torch.Tensor:
    """Upscale the first pass's latents (a latent mode, or decode + pixel upscaler + encode), crop to the
    target, and run img2img on them with the hires settings; new noise from the same seeds."""
    f = model.vae_scale_factor
    target_w, target_h, truncate_x, truncate_y = hires_target(p, f)
    if upscaler.is_latent_upscaler(p.hr_upscaler):
        samples = upscaler.upscale_latent(samples, p.hr_upscaler, (target_h // f, target_w // f))
        image_conditioning = txt2img_image_conditioning(model, samples.shape[0], tuple(samples.shape[1:]))
    else:
        lowres = images_module.latents_to_pil(model.decode_first_stage(samples))
        upscaled = [images_module.resize_image(0, im, target_w, target_h, upscaler_name=p.hr_upscaler,
                                               **_resize_kwargs(p, model)) for im in lowres]
        decoded = images_module.pil_to_tensor(upscaled)
        samples = model.encode_first_stage(decoded)
        image_conditioning = masking.inpainting_image_conditioning(model, decoded, tuple(samples.shape)) \
            if model.is_inpainting else None
    h, w = samples.shape[-2:]
    rows = slice(truncate_y // 2, h - (truncate_y + 1) // 2)
    cols = slice(truncate_x // 2, w - (truncate_x + 1) // 2)
    samples = samples[:, :, rows, cols].contiguous()
    if image_conditioning is not None:
        image_conditioning = image_conditioning[:, :, rows, cols].contiguous()
    if p.denoising_strength <= 0:  # nothing to denoise: the upscaled latents are the result
        return samples
    rng = ImageRNG(tuple(samples.shape[1:]), seeds, subseeds, p.subseed_strength, device=model.device,
                   dtype=model.dtype, **rng_options(p))
    hr_name, hr_scheduler = hires_sampler(p)
    sp = SamplingPass("hires", hr_name, hr_scheduler, p.hr_cfg if p.hr_cfg is not None else p.cfg_scale, p.hr_second_pass_steps or p.steps,
                      [p.hr_prompt or x for x in prompts], [p.hr_negative_prompt or x for x in negative_prompts],
                      init_latent=samples, denoising_strength=p.denoising_strength, fix_steps=True,
                      image_conditioning=image_conditioning)
    previous = state.textinfo
    state.textinfo = "Hires fix" if not previous else f"{previous} · Hires fix"
    try:
        return run_pass(model, p, sp, encode, rng, rng.first(), hooks, state)
    finally:
        state.textinfo = previous


# ---- the job ------------------------------------------------------------------------------------------------

def process_images(model, p: StableDiffusionProcessing, hooks: list[AfterSampleHook] = (),
                   state: JobState | None = None) -> Processed:
    """Run a txt2img or img2img job on `model`. `hooks` are called after every sampling step with a StepInfo."""
    validate(p, model)
    state = state or JobState()
    seed, subseed = fix_seed(p.seed), fix_seed(p.subseed)
    img2img = isinstance(p, StableDiffusionProcessingImg2Img)
    hires = bool(getattr(p, "enable_hr", False)) and not img2img
    encode = TextEncodingCache(lambda text: model.get_learned_conditioning(text, p.clip_skip))
    hooks = [progress_hook(state), *hooks]
    output_images, infotexts, saved = [], [], []
    state.begin(p.job_name, p.n_iter * (2 if hires else 1))
    init, job_networks = None, None
    try:
        with torch.no_grad(), sd_hijack_tiling.circular_padding(model, p.tiling):
            if img2img:
                init = prepare_img2img(model, p)
            batch_size = init.batch_size if init is not None else p.batch_size
            count = batch_size * p.n_iter
            all_prompts, all_negative_prompts = [p.prompt] * count, [p.negative_prompt] * count
            job_networks = extra_networks.activate(model, all_prompts)  # tags out of the prompts, LoRAs on
            all_seeds = [seed + (i if p.subseed_strength == 0 else 0) for i in range(count)]
            all_subseeds = [subseed + i for i in range(count)]
            extra = {**generation_params(p, init.full_res_used if init is not None else None),
                     **p.extra_generation_params}
            if init is not None:
                latent_shape = tuple(init.init_latent.shape[1:])
            else:
                f = model.vae_scale_factor
                latent_shape = (model.latent_channels, p.height // f, p.width // f)
            for n in range(p.n_iter):
                if state.interrupted:
                    break
                batch = slice(n * batch_size, (n + 1) * batch_size)
                prompts, negative_prompts = job_networks.prompts[batch], all_negative_prompts[batch]
                seeds, subseeds = all_seeds[batch], all_subseeds[batch]
                rng = ImageRNG(latent_shape, seeds, subseeds, p.subseed_strength, device=model.device,
                               dtype=model.dtype, **rng_options(p))
                noise = rng.first()
                if init is not None:
                    samples = _img2img_batch(model, p, init, prompts, negative_prompts, seeds, encode, rng, noise,
                                             hooks, state)
                else:
                    sp = SamplingPass(p.job_name, p.sampler_name, p.scheduler, p.cfg_scale, p.steps, prompts,
                                      negative_prompts,
                                      image_conditioning=txt2img_image_conditioning(model, batch_size, latent_shape))
                    samples = run_pass(model, p, sp, encode, rng, noise, hooks, state)
                    if hires and not (state.interrupted or state.skipped):
                        state.next_batch()
                        samples = hires_pass(model, p, samples, prompts, negative_prompts, seeds, subseeds, encode,
                                             hooks, state)
                    elif hires:
                        state.next_batch()
                extra.update(job_networks.infotext(model, encode.encoded_texts))  # TI hashes, Lora hashes
                decoded = images_module.latents_to_pil(model.decode_first_stage(samples))
                for i, image in enumerate(decoded):
                    index = n * batch_size + i
                    if init is not None and init.overlays is not None:
                        image = masking.apply_overlay(image, init.paste_to, init.overlays[i],
                                                      resize=lambda im, w, h: images_module.resize_image(1, im, w, h))
                    text = create_infotext(p, model, all_prompts[index], all_negative_prompts[index],
                                           all_seeds[index], all_subseeds[index], extra)
                    output_images.append(image)
                    infotexts.append(text)
                    if not p.do_not_save_samples:
                        saved.append(str(images_module.save_image(image, p.outpath_samples, all_seeds[index], text,
                                                                  p.opts.saving)))
                state.next_batch()
    finally:
        interrupted = state.interrupted
        extra_networks.deactivate(model, job_networks)  # LoRAs off, also after an error
        state.end()
    return Processed(
        images=output_images, infotexts=infotexts, prompt=p.prompt, negative_prompt=p.negative_prompt,
        seed=all_seeds[0], subseed=all_subseeds[0], all_prompts=all_prompts, all_negative_prompts=all_negative_prompts,
        all_seeds=all_seeds, all_subseeds=all_subseeds, subseed_strength=p.subseed_strength, width=p.width,
        height=p.height, sampler_name=find_sampler_config(p.sampler_name).name, cfg_scale=p.cfg_scale, steps=p.steps,
        batch_size=batch_size, clip_skip=p.clip_skip, sd_model_name=model.name, sd_model_hash=model.shorthash,
        job_timestamp=state.job_timestamp, interrupted=interrupted, saved_paths=saved,
        denoising_strength=p.denoising_strength if p.uses_denoising_strength else None,
        is_using_inpainting_conditioning=bool(model.is_inpainting), extra_generation_params=extra,
        comments="\n".join(filter(None, [job_networks.comments if job_networks is not None else "",
                                          compile_report(model)])))


def compile_report(model) -> str:
    """With --compile: the time the UNet took to compile for this job's shapes (once; "" when reused)."""
    compiled = getattr(model, "compiled_unet", None)
    return compiled.take_report() if compiled is not None else ""


def _img2img_batch(model, p: StableDiffusionProcessingImg2Img, init: Img2ImgInit, prompts, negative_prompts,
                   seeds, encode, rng, noise, hooks, state) -> torch.Tensor:
    """One batch of img2img: the masked area's start (latent noise / nothing), the noise multiplier, the pass."""
    init_latent = init.init_latent
    if init.mask is not None and p.inpainting_fill == 2:  # latent noise, from the batch's own seeds
        fill_noise = ImageRNG(tuple(init_latent.shape[1:]), seeds, device=model.device, dtype=model.dtype,
                              source=p.opts.randn_source).first()
        init_latent = init_latent * init.mask + fill_noise * init.nmask
    elif init.mask is not None and p.inpainting_fill == 3:  # latent nothing
        init_latent = init_latent * init.mask
    if p.initial_noise_multiplier != 1.0:
        noise = noise * p.initial_noise_multiplier
    sp = SamplingPass(p.job_name, p.sampler_name, p.scheduler, p.cfg_scale, p.steps, prompts, negative_prompts,
                      init_latent=init_latent, denoising_strength=p.denoising_strength, fix_steps=p.img2img_fix_steps,
                      mask=init.mask, nmask=init.nmask, image_conditioning=init.image_conditioning)
    return run_pass(model, p, sp, encode, rng, noise, hooks, state)
