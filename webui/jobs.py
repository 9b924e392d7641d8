"""The one job layer: request fields (from the page or the API's JSON) + the options -> a Job, run on the queue.

The page and the API describe a job the same way, as a dict keyed by AUTOMATIC1111's JSON
field names (the page maps its controls onto those names in `page_request`). `make_job` is
the only code that turns such a dict into a job: it refuses features that are turned on but
not implemented, fills what the request left out from an infotext and from the options
(`override_settings` first, then the server's), resolves the sampler, checks every value's
type and range, and builds the processing object and its script. Everything a client can
get wrong is refused here, before the job enters the queue. `run_job` hands the job to the
queue back-end (`WebUIContext.run`), which runs one job at a time on the model.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from modules import images as images_module
from modules import processing, sd_samplers
from modules.errors import InvalidParameter
from modules.job_state import JobState
from modules.processing import (Processed, StableDiffusionProcessing, StableDiffusionProcessingImg2Img,
                                StableDiffusionProcessingTxt2Img)
from modules.scripts import XYZ_PLOT, xyz_grid
from modules.sd_samplers_common import AfterSampleHook

PROCESSING_CLASSES: dict[str, type[StableDiffusionProcessing]] = {"txt2img": StableDiffusionProcessingTxt2Img,
                                                                  "img2img": StableDiffusionProcessingImg2Img}
MAX_IMAGE_SIDE = 2048  # init images and masks: no side larger (decompression bombs are refused before decoding)
PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")

# Processing fields a request may not set: where files are written is the server's business.
NOT_FROM_REQUEST = {"outpath_samples", "do_not_save_samples", "opts"}  # opts: the server's options (JobOptions)

# AUTOMATIC1111's request fields for features this engine does not have. Each is accepted
# while its value means "off"; anything else is a 422 naming the feature. A field that the
# processing class has (the feature exists) is never looked up here.
UNIMPLEMENTED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "enable_hr": ("hires fix (enable_hr)", bool),
    "restore_faces": ("face restoration (restore_faces)", bool),
    "tiling": ("tiling", bool),
    "alwayson_scripts": ("always-on scripts (alwayson_scripts)", bool),
    "seed_resize_from_w": ("resize seed from width (seed_resize_from_w)", lambda v: v is not None and v > 0),
    "seed_resize_from_h": ("resize seed from height (seed_resize_from_h)", lambda v: v is not None and v > 0),
    "refiner_checkpoint": ("refiner (refiner_checkpoint)", lambda v: v not in (None, "", "None")),
}

# Options that fill a processing field the request left out (AUTOMATIC1111 reads them from `opts`).
FIELDS_FROM_OPTIONS = {"clip_skip": "CLIP_stop_at_last_layers", "s_min_uncond": "s_min_uncond",
                       "img2img_fix_steps": "img2img_fix_steps"}
# A sampler's `eta` when the request leaves it out: the option for its kind of sampler.
ETA_OPTIONS = {"Eta DDIM": ("eta_ddim", 0.0), "Eta": ("eta_ancestral", 1.0)}


@dataclass
class ScriptRun:
    """A script that runs the job as many runs (the X/Y/Z plot), holding the queue for all of them."""

    name: str
    run: Callable[..., Processed]  # (model, p, hooks=, state=) -> Processed
    runs: int = 1  # how many runs of p it makes (previews are captioned over all of them)


@dataclass(frozen=True)
class LivePreview:
    """AUTOMATIC1111's live preview options (field names are its keys): what the progress API's
    `current_image` shows. Every `show_progress_every_n_steps` steps (-1: the last step of each
    pass; 0 or `live_previews_enable` off: never) the hook keeps the pred_x0 of the
    `live_preview_content` branch (Prompt, Negative prompt, or Combined: the guided one)."""

    live_previews_enable: bool = True
    show_progress_every_n_steps: int = 10
    live_preview_content: str = "Prompt"
    show_progress_type: str = "Approx NN"

    @classmethod
    def from_options(cls, options: dict) -> "LivePreview":
        return cls(**{f.name: options[f.name] for f in dataclasses.fields(cls) if options.get(f.name) is not None})

    @property
    def method(self) -> str:
        """modules/sd_vae_approx's method for `show_progress_type` (Approx NN: the cheap one, as there is no NN)."""
        return {"Full": "full", "TAESD": "taesd"}.get(self.show_progress_type, "cheap")

    def hook(self, state: JobState) -> AfterSampleHook | None:
        every = self.show_progress_every_n_steps
        if not self.live_previews_enable or every == 0:
            return None
        state.preview_method = self.method
        branch = {"Prompt": "prompt", "Negative prompt": "negative"}.get(self.live_preview_content)

        def hook(info) -> None:
            if (every > 0 and (info.step + 1) % every == 0) or (every < 0 and info.step + 1 >= info.steps):
                latents = info.branches.get(branch) if branch else None
                state.preview_latents = latents if latents is not None else info.pred_x0

        return hook


@dataclass
class Job:
    """Everything the queue needs to run one request, and what the response needs besides the images."""

    kind: str
    p: StableDiffusionProcessing
    script: ScriptRun | None = None
    checkpoint: Any = None  # sd_models.CheckpointInfo to run on, or None: the loaded model
    keep_checkpoint: bool = False  # the checkpoint stays loaded afterwards (override_settings_restore_afterwards)
    send_images: bool = True
    warnings: list[str] = field(default_factory=list)
    # (prompt, negative prompt) as sent, before `styles` were applied; None when no style was (Compare's
    # "Without styles" reruns the job with these)
    unstyled: tuple[str, str] | None = None
    styles: list[str] = field(default_factory=list)  # the style names asked for (the API's info.styles)
    live_preview: LivePreview = field(default_factory=LivePreview)

    @property
    def runs(self) -> int:
        return self.p.n_iter * (self.script.runs if self.script else 1)


def request_fields(kind: str) -> dict[str, dataclasses.Field]:
    """The processing fields of a job kind that a request may set (they are also the API's JSON fields)."""
    cls = PROCESSING_CLASSES[kind]
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in NOT_FROM_REQUEST}


def field_types(kind: str) -> dict[str, Any]:
    return typing.get_type_hints(PROCESSING_CLASSES[kind])


# -- values -------------------------------------------------------------------------------------

def _number(name: str, value: Any, whole: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(f"{name} must be a {'whole ' if whole else ''}number, got {value!r}", field=name)
    if not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value!r}", field=name)
    if whole:
        if not float(value).is_integer():
            raise InvalidParameter(f"{name} must be a whole number, got {value!r}", field=name)
        return int(value)
    return float(value)


def coerce(name: str, value: Any, tp: Any) -> Any:
    """A request value checked against its field's type: `true` is not a number, `20.0` is 20."""
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X]: None is a value
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp)
    if tp is int:
        return _number(name, value, whole=True)
    if tp is float:
        return _number(name, value, whole=False)
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidParameter(f"{name} must be true or false, got {value!r}", field=name)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise InvalidParameter(f"{name} must be text, got {type(value).__name__}", field=name)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(tp)):
            raise InvalidParameter(f"{name} must be a list of {len(typing.get_args(tp))} numbers", field=name)
        return tuple(coerce(name, v, t) for v, t in zip(value, typing.get_args(tp)))
    if origin is list and typing.get_args(tp) == (str,):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidParameter(f"{name} must be a list of texts", field=name)
        return list(value)
    return value


def refuse_unimplemented(request: dict, fields: dict) -> None:
    for name, (feature, is_on) in UNIMPLEMENTED.items():
        if name in fields or name not in request:
            continue
        try:
            on = is_on(request[name])
        except TypeError:
            on = True
        if on:
            raise InvalidParameter(f"{feature} is not supported by this server", field=name)


def values_from_infotext(text: Any, fields: dict, sent: set[str]) -> dict:
    """AUTOMATIC1111's `infotext` request field: its values fill the fields the request did not set."""
    if not isinstance(text, str):
        raise InvalidParameter("infotext must be text", field="infotext")
    parsed = images_module.infotext_to_fields(images_module.parse_generation_parameters(text))
    if "sampler_index" in sent:
        parsed.pop("sampler_name", None)
    return {k: v for k, v in parsed.items() if k in fields and k not in sent}


def resolve_sampler(name: Any, scheduler: Any) -> tuple[str, str | None]:
    """A sampler name (or legacy `DPM++ 2M Karras`) and schedule type -> the registry's (name, schedule label)."""
    if not isinstance(name, str):
        raise InvalidParameter("sampler_name must be text", field="sampler_name")
    if scheduler is not None and not isinstance(scheduler, str):
        raise InvalidParameter("scheduler must be text", field="scheduler")
    data, sched = sd_samplers.get_sampler_and_scheduler(name, scheduler)
    return data.name, sched.label


def default_sampler(kind_default: str | None = None) -> str:
    """AUTOMATIC1111's API default, "Euler"."""
    return kind_default or "Euler"


def eta_from_options(sampler: str, options: dict) -> float | None:
    """The option-given eta of a sampler that takes one, or None where it is the option's default."""
    key = sd_samplers.ETA.get(sampler, (None,))[0]
    option, default = ETA_OPTIONS.get(key, (None, None))
    value = options.get(option) if option else None
    return None if value is None or value == default else value


# -- the job -----------------------------------------------------------------------------------

def make_job(kind: str, request: dict, ctx, default_sampler_name: str = "Euler", check_cost: bool = True) -> Job:
    """The job a request describes, checked before it queues (raises UserError: 4xx, nothing changed).

    `request` holds only what the client set (JSON field names); `ctx` gives the options,
    the loaded model (default size, validation) and the checkpoint list.
    """
    if kind not in PROCESSING_CLASSES:
        raise InvalidParameter(f"unknown job kind {kind!r}", field="kind")
    fields, types = request_fields(kind), field_types(kind)
    refuse_unimplemented(request, fields)
    sent = {k for k, v in request.items() if v is not None}
    values = {k: request[k] for k in fields if k in sent}
    if request.get("infotext"):
        values.update(values_from_infotext(request["infotext"], fields, sent))

    overrides = request.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise InvalidParameter("override_settings must be an object of option: value", field="override_settings")
    options = {**ctx.options, **overrides}
    for name, option in FIELDS_FROM_OPTIONS.items():
        if name in fields and name not in values and options.get(option) is not None:
            values[name] = options[option]

    checkpoint = None
    if overrides.get("sd_model_checkpoint") is not None:
        name = overrides["sd_model_checkpoint"]
        if not isinstance(name, str):
            raise InvalidParameter("override_settings.sd_model_checkpoint must be a checkpoint title",
                                   field="sd_model_checkpoint")
        checkpoint = ctx.find_checkpoint(name)

    sampler = values.get("sampler_name") or request.get("sampler_index") or default_sampler_name
    values["sampler_name"], values["scheduler"] = resolve_sampler(sampler, values.get("scheduler"))
    if "eta" in fields and "eta" not in values:
        values["eta"] = eta_from_options(values["sampler_name"], options)
    size = ctx.model.default_size if ctx.model is not None else 512
    values.setdefault("width", size)
    values.setdefault("height", size)
    values = {k: coerce(k, v, types.get(k, Any)) for k, v in values.items()}
    if "init_images" in fields:
        values["init_images"] = [request_image(im, "init_images") for im in values.get("init_images") or []]
        if not values["init_images"]:
            raise InvalidParameter("img2img needs an init image (init_images)", field="init_images")
        if values.get("mask") is not None:
            values["mask"] = request_image(values["mask"], "mask")
    for name in PROMPT_FIELDS:
        if isinstance(values.get(name), str):
            check_prompt(values[name], name)
    for key in ("seed", "subseed"):
        if key in values and not -(2 ** 63) <= values[key] < 2 ** 63 - 10_000:
            raise InvalidParameter(f"{key} is out of range", field=key)

    save = request.get("save_images", False)
    if not isinstance(save, bool):
        raise InvalidParameter("save_images must be true or false", field="save_images")
    send = request.get("send_images", True)
    p = PROCESSING_CLASSES[kind](**values, do_not_save_samples=not save,
                                 outpath_samples=str(ctx.outdir(kind)),
                                 opts=job_options(options))
    p.upscaler_models_dir = getattr(ctx, "models_dir", None)
    p.allow_pickle_upscalers = bool(getattr(getattr(ctx, "args", None), "allow_pickle_checkpoints", False))
    unstyled = (p.prompt, p.negative_prompt) if p.styles else None
    style_names = list(p.styles)
    warnings = apply_styles(ctx, p)
    warnings += skipped_embedding_warnings(ctx.model, [p.prompt, p.negative_prompt])
    script = make_script(request, p, ctx.options)  # the server's: where files go is not a request's business
    if ctx.model is not None:
        processing.validate(p, ctx.model)
    if check_cost and hasattr(ctx, "check_cost"):  # --max-job-seconds
        ctx.check_cost(p, runs=script.runs if script is not None else 1)
    keep = request.get("override_settings_restore_afterwards", True) is False
    return Job(kind, p, script, checkpoint, keep, send_images=send is not False, warnings=warnings,
               unstyled=unstyled, styles=style_names, live_preview=LivePreview.from_options(options))


def job_options(options: dict) -> processing.JobOptions:
    """The options the engine reads while the job runs (noise source, ENSD, saving, infotext keys), checked
    as the options API checks them (an override_settings value of the wrong kind is a 422 naming it)."""
    from modules import options as options_module

    checked = {key: options_module.check_value(key, options[key]) for key in processing.JobOptions.option_keys()
               if key in options and key in options_module.OPTIONS}
    return processing.JobOptions.from_options(checked)


def request_image(value: Any, field: str):
    """An image of a request: a PIL image (the page) or base64 / a data URI (the API), checked before decoding."""
    from PIL import Image

    if isinstance(value, Image.Image):
        if max(value.size) > MAX_IMAGE_SIDE:
            raise InvalidParameter(f"{field}: images may be at most {MAX_IMAGE_SIDE} px a side, got "
                                   f"{value.size[0]}x{value.size[1]}", field=field)
        return value
    if not isinstance(value, str):
        raise InvalidParameter(f"{field} must be base64 images", field=field)
    return images_module.decode_base64_image(value, field=field, max_side=MAX_IMAGE_SIDE)


def check_prompt(text: str, field: str) -> None:
    """The prompt parser's bounds and AUTOMATIC1111's syntax checks, before the job queues (a 422 naming the field)."""
    from modules import prompt_parser

    check = getattr(prompt_parser, "check_prompt", None)
    if check is not None:
        check(text, field)


def apply_styles(ctx, p: StableDiffusionProcessing) -> list[str]:
    """The job's `styles` expanded into its prompts (styles.csv); unknown names are warnings, as AUTOMATIC1111."""
    db = getattr(ctx, "styles", None)
    if not p.styles or db is None:
        return []
    # the styles files' own problems (a line that could not be read) matter to a job that uses styles
    return [*(f"Styles file: {w}" for w in db.warnings), *(db.apply_to_job(p) or [])]


def skipped_embedding_warnings(model, texts: list[str]) -> list[str]:
    """A warning for each skipped embedding (wrong shape, damaged, refused) whose name the job's prompts use:
    its name is then encoded as ordinary words, which the user should know (AUTOMATIC1111 says nothing)."""
    from modules import textual_inversion

    return textual_inversion.skipped_in_texts(model, texts) if model is not None else []


def is_xyz(name: Any) -> bool:
    """script_name of the X/Y/Z plot, in any case (AUTOMATIC1111's clients send "x/y/z plot")."""
    return isinstance(name, str) and name.strip().lower() == XYZ_PLOT.lower()


def make_script(request: dict, p: StableDiffusionProcessing, server_options: dict | None = None) -> ScriptRun | None:
    """`script_name` + `script_args` -> the script run (its arguments checked now), or None for a plain job."""
    name = request.get("script_name")
    if name in (None, "", "None"):
        return None
    if isinstance(name, str) and name.strip().lower() == "sd upscale" and isinstance(p, StableDiffusionProcessingImg2Img):
        from modules.scripts import sd_upscale

        args = request.get("script_args") or []

        def run_upscale(model, job, hooks=(), state=None):
            return sd_upscale.run_sd_upscale(model, job, args, hooks=hooks, state=state)

        return ScriptRun(sd_upscale.SD_UPSCALE, run_upscale)
    if not is_xyz(name):
        available = XYZ_PLOT.lower() + (", sd upscale" if isinstance(p, StableDiffusionProcessingImg2Img) else "")
        raise InvalidParameter(f"script {name!r} is not supported by this server (available: {available})",
                               field="script_name")
    raw = request.get("script_args")
    if raw in (None, []):
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidParameter("script_args of the X/Y/Z plot must be an object of named arguments "
                               "(x_type, x_values, y_type, y_values, ...)", field="script_args")
    args = xyz_grid.XYZArgs.from_dict(raw)
    xs, ys, zs = xyz_grid.resolve_axes(args)
    save_grid = not p.do_not_save_samples and not request.get("do_not_save_grid")

    grids = outdir_grids(server_options, p)

    def run(model, job, hooks=(), state=None):
        return xyz_grid.run_xyz(model, job, args, hooks, state, save_grid=save_grid, outpath_grids=grids)

    return ScriptRun(XYZ_PLOT, run, len(xs.values) * len(ys.values) * len(zs.values))


def compare_jobs(job: Job, compare_with: Any) -> tuple[Job, Job]:
    """The job with its random seeds fixed, and the same job changed by `compare_with` (webui/compare.py)."""
    from webui import compare

    if job.script is not None:
        raise InvalidParameter("scripts (script_name) are not supported by Compare", field="script_name")
    mode = compare.resolve_mode(compare_with)
    first = dataclasses.replace(job, p=compare.fix_seeds(job.p))
    other_p = compare.variant(first.p, mode, unstyled=job.unstyled)
    other_p.do_not_save_samples = True
    return first, dataclasses.replace(job, p=other_p)


def run_job(ctx, job: Job, state: JobState | None = None, hooks: list[AfterSampleHook] = ()) -> Processed:
    """Run the job on the queue back-end (waits for its turn; `state` may be interrupted meanwhile).

    With `negative_report`, each image then gets the model's own verdict on how strongly it still
    shows its negative prompt (modules/negative_verdict.py), in `Processed.negative_report`."""
    state = state or JobState()
    preview = job.live_preview.hook(state)
    processed = ctx.run(job, state, [*hooks, *([preview] if preview else [])])
    if job.warnings:
        processed.comments = "\n".join(filter(None, [processed.comments, *job.warnings]))
    processed.styles = list(job.styles)
    if getattr(job.p, "negative_report", False) and processed.images and ctx.model is not None \
            and job.script is None:
        processed.negative_report = negative_report(ctx, job, processed.images, processed.all_negative_prompts)
    return processed


def negative_report(ctx, job: Job, images: list, negative_prompts: list[str]) -> list[dict]:
    """The verdict for each image, scored on the loaded model between jobs (it holds the queue meanwhile)."""
    from modules import negative_verdict

    with ctx.queue_lock:
        return negative_verdict.score_images(ctx.model, images, list(negative_prompts[:len(images)]),
                                             clip_skip=job.p.clip_skip)


# -- the page's inputs -------------------------------------------------------------------------

XYZ_ARGUMENTS = ("x_type", "x_values", "y_type", "y_values", "z_type", "z_values", "draw_legend",
                 "include_lone_images", "include_sub_grids", "no_fixed_seeds", "margin_size")


def page_request(values: dict[str, Any], options: dict) -> dict:
    """The page's inputs (keyed by field name, `name[i]` for one element of a tuple field, `xyz_<arg>`
    for the X/Y/Z controls) -> the same request dict the API's JSON gives.

    Gradio's number controls give floats (20.0) and None for an emptied box; `make_job`
    takes whole floats as ints and says what is wrong otherwise. The page saves its images
    as the `samples_save` option says (the API: as each request's `save_images` says).
    """
    request: dict[str, Any] = {}
    parts: dict[str, dict[int, Any]] = {}
    xyz: dict[str, Any] = {}
    for name, value in values.items():
        if name.startswith("xyz_"):
            xyz[name[4:]] = value
        elif "[" in name and name.endswith("]"):
            base, index = name[:-1].split("[")
            parts.setdefault(base, {})[int(index)] = value
        else:
            request[name] = value
    for name, items in parts.items():
        request[name] = [items[i] for i in sorted(items)]
    for name in PAGE_NUMBER_BOXES:  # an emptied box is a mistake to name, not "leave it at the default"
        if name in request and request[name] is None:
            raise InvalidParameter(f"{name} is empty", field=name)
    for name, same in PAGE_SAME.items():  # "Use same sampler", a hires CFG of 0: the first pass's (None)
        if name in request and request[name] == same:
            request[name] = None
    for name, labels in PAGE_CHOICES.items():  # a radio's label -> the field's index (or, for two, its bool)
        if isinstance(request.get(name), str):
            if request[name] not in labels:
                raise InvalidParameter(f"{name} must be one of {', '.join(labels)}, got {request[name]!r}",
                                       field=name)
            index = labels.index(request[name])
            request[name] = index == 1 if name in PAGE_BOOLS else index
    if IMG2IMG_MODE in request:
        request.update(page_images(request))
    if is_xyz(request.get("script_name")):
        request["script_args"] = {k: v for k, v in xyz.items() if k in XYZ_ARGUMENTS}
        if request["script_args"].get("margin_size") is not None:
            request["script_args"]["margin_size"] = int(request["script_args"]["margin_size"])
    request["save_images"] = bool(options.get("samples_save", True))
    return request


# The page's controls that are not request fields as they stand: the img2img tab's image inputs
# (which one counts depends on its selected sub-tab) and the hires fix's "same as the first pass".
IMG2IMG_MODE = "img2img_mode"
IMG2IMG_MODES = ("img2img", "inpaint", "inpaint_upload")  # AUTOMATIC1111's sub-tab ids
PAGE_IMAGES = ("init_img", "init_img_with_mask", "init_img_inpaint", "init_mask_inpaint")
PAGE_SAME = {"hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler", "hr_cfg": 0}
# The page's number boxes (Gradio gives None for an emptied one): the job's sizes and seeds, and the guidance rules'
# fields too finely placed for a slider (webui/ui_guidance.py).
PAGE_NUMBER_BOXES = ("steps", "width", "height", "batch_size", "n_iter", "seed", "subseed", "clip_skip",
                     "dng_prior", "dng_offset", "dng_p_min", "dng_p_max")
# The page's radios show labels; the fields hold their index (AUTOMATIC1111's `type="index"` radios).
PAGE_CHOICES: dict[str, tuple[str, ...]] = {
    "resize_mode": tuple(processing.RESIZE_MODES),
    "inpainting_mask_invert": ("Inpaint masked", "Inpaint not masked"),
    "inpainting_fill": tuple(processing.INPAINTING_FILL),
    "inpaint_full_res": ("Whole picture", "Only masked"),
}
PAGE_BOOLS = ("inpaint_full_res",)


def page_value(name: str, value: Any) -> Any:
    """A field's value as the page's control shows it (the inverse of page_request's mapping), for
    filling the page from an infotext."""
    if name in PAGE_CHOICES and isinstance(value, (bool, int)) and 0 <= int(value) < len(PAGE_CHOICES[name]):
        return PAGE_CHOICES[name][int(value)]
    if name in PAGE_SAME and value is None:
        return PAGE_SAME[name]
    return value


def page_images(request: dict) -> dict:
    """The img2img tab's image inputs (AUTOMATIC1111's `init_img`, `init_img_with_mask`, `init_img_inpaint`,
    `init_mask_inpaint`, by the selected sub-tab) -> `init_images` and `mask`, decoded as the API's are.

    They are taken out of `request`. Uploads arrive as file paths and are read with the same checks
    as a base64 image of the API (modules/images.py `decode_image`); a mask drawn in the browser
    (the layers of the inpaint editor: drawn = alpha above 128, AUTOMATIC1111's create_binary_mask)
    becomes the PNG a client would send.
    """
    mode = request.pop(IMG2IMG_MODE, None) or "img2img"
    inputs = {name: request.pop(name, None) for name in PAGE_IMAGES}
    if mode not in IMG2IMG_MODES:
        raise InvalidParameter(f"unknown img2img mode {mode!r} (one of {', '.join(IMG2IMG_MODES)})",
                               field=IMG2IMG_MODE)
    mask = None
    if mode == "img2img":
        image = inputs["init_img"]
    elif mode == "inpaint":
        editor = inputs["init_img_with_mask"] or {}
        image = editor.get("background")
        mask = drawn_mask(editor.get("layers") or [])
        if image is not None and mask is None:
            raise InvalidParameter("Inpaint: draw over the part of the image to repaint (no mask is drawn)",
                                   field="mask")
    else:
        image, mask = inputs["init_img_inpaint"], inputs["init_mask_inpaint"]
        if image is not None and mask is None:
            raise InvalidParameter("Inpaint upload: upload a mask too (white = repaint)", field="mask")
    if image is None:
        raise InvalidParameter("img2img needs an init image: upload one", field="init_images")
    out = {"init_images": [page_image(image, "init_images")]}
    if mask is not None:
        out["mask"] = page_image(mask, "mask")
    return out


def drawn_mask(layers: list):
    """The editor's layers (RGBA, transparent where nothing is drawn) -> a white-on-black mask, or None if empty."""
    import numpy as np
    from PIL import Image

    drawn = None
    for layer in layers:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 128
        drawn = alpha if drawn is None or drawn.shape != alpha.shape else drawn | alpha
    if drawn is None or not drawn.any():
        return None
    return Image.fromarray(drawn.astype(np.uint8) * 255, "L")


def page_image(value: Any, field: str):
    """An image of the page (an uploaded file's path, or a picture the browser made) -> the decoded image,
    through the same decoder and limits as the API's base64 images."""
    from PIL import Image

    if isinstance(value, Image.Image):
        data = images_module.png_bytes(value)
    elif isinstance(value, (str, Path)):
        path = Path(value)
        try:
            size = path.stat().st_size
            if size > images_module.MAX_IMAGE_BYTES:
                raise InvalidParameter(f"{field}: the image is {size / 2**20:.1f} MB; at most "
                                       f"{images_module.MAX_IMAGE_BYTES // 2**20} MB are accepted", field=field)
            data = path.read_bytes()
        except OSError as e:
            raise InvalidParameter(f"{field}: cannot read the uploaded file ({e.strerror})", field=field) from e
    else:
        raise InvalidParameter(f"{field} must be an image", field=field)
    return images_module.decode_image(data, field=field, max_side=MAX_IMAGE_SIDE)


def outdir(args, options: dict, kind: str) -> Path:
    """Where a job kind's images go, as AUTOMATIC1111: the `outdir_samples` option (all kinds), else
    `outdir_<kind>_samples`; an img2img folder left at its default sits beside --outdir-samples."""
    from modules import options as options_module

    key = f"outdir_{kind}_samples"
    at_default = kind != "txt2img" and options.get(key) == options_module.OPTIONS[key].default
    folder = options.get("outdir_samples") or (None if at_default else options.get(key))
    if folder:
        return Path(folder)
    default = Path(getattr(args, "outdir_samples", "outputs/txt2img-images"))
    return default if kind == "txt2img" else default.parent / f"{kind}-images"


def outdir_grids(options: dict | None, p: StableDiffusionProcessing) -> Path | None:
    """Where a job's grids go: the `outdir_grids` option, else `outdir_<kind>_grids` when set to other
    than its default; else None: beside the images folder (xyz_grid's default, so a server started
    with --outdir-samples keeps its grids there too)."""
    from modules import options as options_module

    options = options or {}
    kind = "img2img" if isinstance(p, StableDiffusionProcessingImg2Img) else "txt2img"
    key = f"outdir_{kind}_grids"
    folder = options.get("outdir_grids") or (options.get(key) if options.get(key) != options_module.OPTIONS[key].default
                                             else None)
    return Path(folder) if folder else None
