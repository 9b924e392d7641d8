"""AUTOMATIC1111's HTTP API (/sdapi/v1) on this project's engine, so its clients work unchanged.

Routes and schemas only: a request becomes a job in `webui/jobs.py` (the same code the page
uses) and runs on the shared queue, so progress and interrupt see whichever job is running,
whoever sent it. The request models are generated from the processing classes' fields (a
field added to `StableDiffusionProcessing*` becomes a JSON field here with no change to
this file), plus the API-only fields AUTOMATIC1111 adds (`sampler_index`, `send_images`,
`save_images`, `script_name`, ...). Every error a client can cause is a 4xx with a
`detail`: the engine's `UserError`s carry their status code (422 bad value, 404 unknown
sampler or checkpoint).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import math
import secrets
import time
import typing
from typing import Annotated, Any, Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, create_model

from modules import images as images_module
from modules import sd_samplers, upscaler
from modules.errors import InvalidParameter, SamplerNotFound, UserError
from modules.job_state import JobState
from modules.scripts import XYZ_PLOT
from modules.scripts.sd_upscale import SD_UPSCALE
from webui import api_train, jobs
from webui.context import WebUIContext

# AUTOMATIC1111's fields that exist only in its API request, with their defaults there.
API_FIELDS: dict[str, tuple[Any, Any, str]] = {
    "sampler_index": (str, "Euler", "Legacy name of sampler_name; used when sampler_name is not given"),
    "scheduler": (Optional[str], None, "Schedule type (Automatic, Karras, ...) where the sampler supports it"),
    "send_images": (bool, True, "Return the images as base64 PNG"),
    "save_images": (bool, False, "Also save the images under the server's output folder"),
    "script_name": (Optional[str], None, "null, or \"x/y/z plot\" (its arguments in script_args)"),
    "script_args": (Any, [], "For \"x/y/z plot\": an object of named arguments (x_type, x_values, y_type, "
                             "y_values, z_type, z_values, draw_legend, include_lone_images, include_sub_grids, "
                             "no_fixed_seeds, margin_size); otherwise ignored"),
    "alwayson_scripts": (dict, {}, "Not supported: must be empty"),
    "override_settings": (Optional[dict], None,
                          "Honoured: sd_model_checkpoint, CLIP_stop_at_last_layers, s_min_uncond, eta_ddim, "
                          "eta_ancestral; other keys are ignored"),
    "override_settings_restore_afterwards": (bool, True, "False keeps an overriding sd_model_checkpoint loaded"),
    "infotext": (Optional[str], None, "Infotext whose values fill the fields the request does not set"),
    "force_task_id": (Optional[str], None, "Ignored"),
    "enable_hr": (bool, False, "Not supported: must be false"),
    "restore_faces": (Optional[bool], None, "Not supported: must be false"),
    "tiling": (Optional[bool], None, "Not supported: must be false"),
    "seed_resize_from_w": (int, -1, "Not supported: must be -1 or 0"),
    "seed_resize_from_h": (int, -1, "Not supported: must be -1 or 0"),
    "refiner_checkpoint": (Optional[str], None, "Not supported: must be null"),
    "do_not_save_grid": (bool, False, "X/Y/Z plot: do not save the grid (it is saved only with save_images)"),
}

SAMPLER_NOT_FOUND = "Sampler not found"
DISCONNECT_POLL = 0.5  # seconds between checks that a job's client is still there
PREVIEW_MAX_SIDE = 1024


def _not_a_bool(value: Any) -> Any:
    """JSON `true` is not a number (pydantic would take it as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _pydantic_type(tp: Any) -> Any:
    """The field's annotation if pydantic can validate it (numbers refusing booleans), else Any
    (the job layer checks it)."""
    if tp in (int, float):
        return Annotated[tp, BeforeValidator(_not_a_bool)]
    try:
        TypeAdapter(tp)
        return tp
    except Exception:
        return Any


def build_request_model(kind: str, name: str) -> type[BaseModel]:
    """A job kind's request: every processing field (optional, its dataclass default), plus API_FIELDS.

    Unknown fields are allowed (AUTOMATIC1111's clients send many); `null` means "the default".
    """
    hints = jobs.field_types(kind)
    fields: dict[str, Any] = {}
    for fname, f in jobs.request_fields(kind).items():
        tp = Optional[_pydantic_type(hints.get(fname, Any))]
        if fname in ("width", "height"):
            fields[fname] = (tp, Field(default=None, description="Default: the model's training size (512 for SD 1.x)"))
        elif fname == "sampler_name":
            fields[fname] = (tp, Field(default=None, description="Sampler name or alias; see /sdapi/v1/samplers"))
        elif f.default is not dataclasses.MISSING:
            fields[fname] = (tp, Field(default=f.default))
        elif f.default_factory is not dataclasses.MISSING:
            fields[fname] = (tp, Field(default_factory=f.default_factory))
        else:
            fields[fname] = (tp, Field(default=None))
    for fname, (tp, default, description) in API_FIELDS.items():
        if fname not in fields:
            fields[fname] = (Optional[_pydantic_type(tp)], Field(default=default, description=description))
    return create_model(name, __config__=ConfigDict(extra="allow"), **fields)


def request_dict(req: BaseModel) -> dict:
    """What the client sent (its fields and unknown extras), without the model's defaults: the job layer's input."""
    data = {k: getattr(req, k) for k in req.model_fields_set}
    data.update(req.model_extra or {})
    return data


class ErrorResponse(BaseModel):
    """Every 4xx of this API: `detail` is a message, or FastAPI's list of validation errors."""
    detail: Any = Field(description="What is wrong: a message, or a list of {loc, msg, type} for malformed JSON")
    error: Optional[str] = Field(default=None, description="The error's kind (InvalidParameter, ModelNotFound, ...)")
    field: Optional[str] = Field(default=None, description="The request field at fault, when there is one")
    body: Any = None
    errors: Any = None


class TextToImageResponse(BaseModel):
    images: Optional[list[str]] = Field(default=None, description="The generated images, base64 PNG with infotext")
    parameters: dict
    info: str


class TextToImageCompareResponse(BaseModel):
    """POST /sdapi/v1/txt2img-compare: the request as given, and again with one thing changed (webui/compare.py)."""
    compare_with: str = Field(description="What the second run changed: 'Without negative prompt', 'Without styles', "
                                          "'Without LoRA' or a guidance rule")
    images: list[str] = Field(description="The request's images, base64 PNG with infotext")
    images_compare: list[str] = Field(description="Same seeds and settings, negative prompt empty (or without the "
                                                  "styles, the <lora:...> tags, or under the other rule)")
    differences: list[str] = Field(description="|images - images_compare| per pixel and channel, base64 PNG (black: equal)")
    mean_differences: list[float] = Field(description="Mean of each difference image, 8-bit units")
    parameters: dict
    info: str
    info_compare: str


class ImageToImageResponse(TextToImageResponse):
    pass


class ExtrasBaseRequest(BaseModel):
    """AUTOMATIC1111's extras fields; face restoration fields are accepted and must be 0 (none installed)."""
    model_config = ConfigDict(extra="allow")
    resize_mode: int = Field(default=0, description="0: by upscaling_resize, 1: to upscaling_resize_w x h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(default=0, ge=0, le=0, description="No face restorers are installed: 0")
    codeformer_visibility: float = Field(default=0, ge=0, le=0, description="No face restorers are installed: 0")
    codeformer_weight: float = 0
    upscaling_resize: float = Field(default=2, ge=1, le=8)
    upscaling_resize_w: int = Field(default=512, ge=1, le=4096)
    upscaling_resize_h: int = Field(default=512, ge=1, le=4096)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(default=0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field(default="", description="base64 image (PNG, JPEG or WebP)")


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(default_factory=list)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: Optional[str] = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class PNGInfoRequest(BaseModel):
    image: str = Field(description="The image: base64, or a data:image/...;base64, URI")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: Optional[str] = None
    textinfo: Optional[str] = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


def encode_pil_to_base64(image: Image.Image, infotext: str | None, settings=None) -> str:
    """The image with its infotext, base64: a PNG with the `parameters` chunk, or in the job's
    `samples_format` (its SaveSettings) as AUTOMATIC1111's API sends the images of a job."""
    return base64.b64encode(images_module.image_bytes(image, infotext, settings)).decode("ascii")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN/Infinity: Python's JSON reads them, strict JSON cannot carry them back
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return None
    return str(value)


class Api:
    """The /sdapi/v1 routes on a FastAPI app, for one WebUIContext."""

    def __init__(self, app: FastAPI, ctx: WebUIContext, auth: list[tuple[str, str]] | None = None,
                 log: bool = False):
        self.app, self.ctx = app, ctx
        self.credentials = {u: p for u, p in (auth or [])}
        self.Txt2ImgRequest = build_request_model("txt2img", "StableDiffusionProcessingTxt2Img")
        dependencies = [Depends(self.auth)] if self.credentials else []
        errors = {code: {"model": ErrorResponse} for code in (401, 404, 405, 422)}
        router = APIRouter(prefix="/sdapi/v1", dependencies=dependencies, tags=["sdapi"], responses=errors)
        Txt2Img = self.Txt2ImgRequest

        async def txt2img(req: Txt2Img, request: Request) -> TextToImageResponse:  # type: ignore[valid-type]
            return await self.text2imgapi(req, request)

        txt2img.__annotations__ = {"req": Txt2Img, "request": Request, "return": TextToImageResponse}
        router.add_api_route("/txt2img", txt2img, methods=["POST"], response_model=TextToImageResponse)
        from webui import compare

        Txt2ImgCompare = create_model("StableDiffusionProcessingTxt2ImgCompare", __base__=Txt2Img, compare_with=(
            str, Field(default="no negative", description="'no negative' (rerun with the negative prompt empty), "
                                                          "'no styles' (the prompts as sent, before styles), 'no lora' "
                                                          "(the <lora:...> tags taken out) or a guidance rule: "
                                                          + ", ".join(compare.compare_modes()[3:]))))

        async def txt2img_compare(req: Txt2ImgCompare, request: Request) -> TextToImageCompareResponse:  # type: ignore[valid-type]
            return await self.text2img_compare_api(req, request)

        txt2img_compare.__annotations__ = {"req": Txt2ImgCompare, "request": Request,
                                           "return": TextToImageCompareResponse}
        router.add_api_route("/txt2img-compare", txt2img_compare, methods=["POST"],
                             response_model=TextToImageCompareResponse)
        Img2Img = self.Img2ImgRequest = build_request_model("img2img", "StableDiffusionProcessingImg2Img")

        async def img2img(req: Img2Img, request: Request) -> ImageToImageResponse:  # type: ignore[valid-type]
            return await self.img2imgapi(req, request)

        img2img.__annotations__ = {"req": Img2Img, "request": Request, "return": ImageToImageResponse}
        router.add_api_route("/img2img", img2img, methods=["POST"], response_model=ImageToImageResponse)
        router.add_api_route("/extra-single-image", self.extras_single, methods=["POST"],
                             response_model=ExtrasSingleImageResponse)
        router.add_api_route("/extra-batch-images", self.extras_batch, methods=["POST"],
                             response_model=ExtrasBatchImagesResponse)
        router.add_api_route("/upscalers", self.get_upscalers, methods=["GET"])
        router.add_api_route("/latent-upscale-modes", self.get_latent_upscale_modes, methods=["GET"])
        router.add_api_route("/embeddings", self.get_embeddings, methods=["GET"])
        router.add_api_route("/refresh-embeddings", self.refresh_embeddings, methods=["POST"])
        api_train.add_routes(router, self)  # create/embedding, train/embedding (webui/api_train.py)
        router.add_api_route("/loras", self.get_loras, methods=["GET"])
        router.add_api_route("/refresh-loras", lambda: None, methods=["POST"])  # the folder is read at each listing
        router.add_api_route("/progress", self.progressapi, methods=["GET"], response_model=ProgressResponse)
        router.add_api_route("/interrupt", self.interruptapi, methods=["POST"])
        router.add_api_route("/skip", self.skipapi, methods=["POST"])
        router.add_api_route("/png-info", self.pnginfoapi, methods=["POST"], response_model=PNGInfoResponse)
        router.add_api_route("/samplers", self.get_samplers, methods=["GET"], response_model=list[SamplerItem])
        router.add_api_route("/schedulers", self.get_schedulers, methods=["GET"], response_model=list[SchedulerItem])
        router.add_api_route("/sd-models", self.get_sd_models, methods=["GET"], response_model=list[SDModelItem])
        router.add_api_route("/refresh-checkpoints", self.refresh_checkpoints, methods=["POST"])
        router.add_api_route("/options", self.get_config, methods=["GET"])
        router.add_api_route("/options", self.set_config, methods=["POST"])
        router.add_api_route("/cmd-flags", self.get_cmd_flags, methods=["GET"])
        router.add_api_route("/scripts", self.get_scripts_list, methods=["GET"])
        router.add_api_route("/prompt-styles", self.get_prompt_styles, methods=["GET"])
        router.add_api_route("/sd-vae", self.get_sd_vaes, methods=["GET"])
        router.add_api_route("/refresh-vae", self.refresh_vae, methods=["POST"])
        router.add_api_route("/hypernetworks", lambda: [], methods=["GET"])  # no hypernetworks in this project
        router.add_api_route("/face-restorers", lambda: [], methods=["GET"])  # none installed (see /interrogate)
        router.add_api_route("/realesrgan-models", lambda: [], methods=["GET"])
        router.add_api_route("/extensions", lambda: [], methods=["GET"])  # no extension mechanism
        router.add_api_route("/script-info", self.get_script_info, methods=["GET"])
        router.add_api_route("/memory", self.get_memory, methods=["GET"])
        router.add_api_route("/unload-checkpoint", self.unload_checkpoint, methods=["POST"])
        router.add_api_route("/reload-checkpoint", self.reload_checkpoint, methods=["POST"])
        router.add_api_route("/interrogate", self.interrogate, methods=["POST"])
        if getattr(ctx.args, "api_server_stop", False):
            for name in ("server-kill", "server-restart", "server-stop"):
                router.add_api_route(f"/{name}", self.server_stop, methods=["POST"])
        app.include_router(router)
        install_error_handlers(app)
        install_method_check(app, router)
        if log:
            install_api_log(app)

    # -- auth --------------------------------------------------------------------------------
    def auth(self, credentials: Optional[HTTPBasicCredentials] = Depends(HTTPBasic(auto_error=False))) -> bool:
        if credentials is not None and credentials.username in self.credentials and secrets.compare_digest(
                credentials.password.encode(), self.credentials[credentials.username].encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    # -- txt2img -----------------------------------------------------------------------------
    def job(self, kind: str, req: BaseModel) -> jobs.Job:
        """The request as a job of the one job layer (checked before it queues)."""
        return jobs.make_job(kind, request_dict(req), self.ctx)

    def caller(self, request: Request) -> str:
        """Who sent a request: `api:<user>` with --api-auth, else `api:` (every caller is the same anonymous one)."""
        if not self.credentials:
            return "api:"
        try:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            user = base64.b64decode(token).decode().partition(":")[0] if scheme.lower() == "basic" else ""
        except (binascii.Error, UnicodeDecodeError):
            user = ""
        return f"api:{user}"

    async def run(self, request: Request, job: jobs.Job):
        """Run a job off the event loop; a client that goes away cancels it (while it waits) or interrupts it."""
        state = JobState(owner=self.caller(request))
        task = asyncio.ensure_future(run_in_threadpool(jobs.run_job, self.ctx, job, state))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if not task.done() and not state.interrupted and await request.is_disconnected():
                state.interrupt()
        return await task

    async def text2imgapi(self, req: BaseModel, request: Request) -> dict:
        job = await run_in_threadpool(self.job, "txt2img", req)  # parsing and checks off the event loop
        processed = await self.run(request, job)
        images = [encode_pil_to_base64(im, text, job.p.opts.saving)
                  for im, text in zip(processed.images, processed.infotexts)] if job.send_images else []
        return {"images": images, "parameters": _jsonable(req.model_dump()), "info": json.dumps(processed.js())}

    async def text2img_compare_api(self, req: BaseModel, request: Request) -> dict:
        """The job, then the same seeds and settings with the negative prompt empty (or another guidance rule)."""
        from webui import compare

        compare_with = req.model_dump().get("compare_with")
        first, second = await run_in_threadpool(lambda: jobs.compare_jobs(self.job("txt2img", req), compare_with))
        processed = await self.run(request, first)
        other = await self.run(request, second)
        pairs = list(zip(processed.images, other.images))
        return {
            "compare_with": compare.resolve_mode(compare_with),
            "images": [encode_pil_to_base64(im, text) for im, text in zip(processed.images, processed.infotexts)],
            "images_compare": [encode_pil_to_base64(im, text) for im, text in zip(other.images, other.infotexts)],
            "differences": [encode_pil_to_base64(compare.difference(a, b), None) for a, b in pairs],
            "mean_differences": [compare.mean_difference(a, b) for a, b in pairs],
            "parameters": _jsonable(req.model_dump()),
            "info": json.dumps(processed.js()),
            "info_compare": json.dumps(other.js()),
        }

    async def img2imgapi(self, req: BaseModel, request: Request) -> dict:
        job = await run_in_threadpool(self.job, "img2img", req)
        processed = await self.run(request, job)
        images = [encode_pil_to_base64(im, text, job.p.opts.saving)
                  for im, text in zip(processed.images, processed.infotexts)] if job.send_images else []
        parameters = _jsonable(req.model_dump())
        if not req.model_dump().get("include_init_images"):  # AUTOMATIC1111 leaves the init images out
            parameters["init_images"], parameters["mask"] = None, None
        return {"images": images, "parameters": parameters, "info": json.dumps(processed.js())}

    # -- extras: upscaling ------------------------------------------------------------------
    def _upscale(self, image: Image.Image, req: "ExtrasBaseRequest") -> Image.Image:
        from modules import upscaler

        names = upscaler.upscaler_names(self.ctx.models_dir)
        first = req.upscaler_1 or "None"
        if first not in names:
            raise InvalidParameter(f"Unknown upscaler {first!r}. Available: {', '.join(names)}", field="upscaler_1")
        if req.upscaling_resize not in (None,) and not 1 <= req.upscaling_resize <= 8:
            raise InvalidParameter("upscaling_resize must be between 1 and 8", field="upscaling_resize")
        if req.resize_mode == 1:
            size = (req.upscaling_resize_w, req.upscaling_resize_h)
            if not all(isinstance(v, int) and 1 <= v <= 4096 for v in size):
                raise InvalidParameter("upscaling_resize_w/h must be 1..4096", field="upscaling_resize_w")
            kwargs = {"size": size}
        else:
            kwargs = {"scale": req.upscaling_resize}
            if max(image.size) * req.upscaling_resize > 4096:
                raise InvalidParameter("the upscaled image would be over 4096 px a side", field="upscaling_resize")
        allow = bool(getattr(self.ctx.args, "allow_pickle_checkpoints", False))
        out = upscaler.upscale_image(image, first, models_dir=self.ctx.models_dir, allow_pickle=allow, **kwargs)
        second = req.upscaler_2 or "None"
        if second != "None" and req.extras_upscaler_2_visibility > 0:
            if second not in names:
                raise InvalidParameter(f"Unknown upscaler {second!r}", field="upscaler_2")
            other = upscaler.upscale_image(image, second, models_dir=self.ctx.models_dir, allow_pickle=allow,
                                           size=out.size)
            out = Image.blend(out.convert("RGB"), other.convert("RGB"), float(req.extras_upscaler_2_visibility))
        return out

    def extras_single(self, req: "ExtrasSingleImageRequest") -> dict:
        image = images_module.decode_base64_image(req.image, field="image", max_side=jobs.MAX_IMAGE_SIDE)
        out = self._upscale(image, req)
        return {"html_info": "", "image": encode_pil_to_base64(out, None)}

    def extras_batch(self, req: "ExtrasBatchImagesRequest") -> dict:
        images = [images_module.decode_base64_image(item.data, field="imageList", max_side=jobs.MAX_IMAGE_SIDE)
                  for item in req.imageList]
        return {"html_info": "", "images": [encode_pil_to_base64(self._upscale(im, req), None) for im in images]}

    def get_upscalers(self) -> list[dict]:
        from modules import upscaler

        return [u.js() for u in upscaler.list_upscalers(self.ctx.models_dir)]

    def get_latent_upscale_modes(self) -> list[dict]:
        from modules import upscaler

        return upscaler.latent_upscale_modes()

    # -- embeddings, LoRA, styles ------------------------------------------------------------
    def get_embeddings(self) -> dict:
        from modules import textual_inversion

        if self.ctx.model is None:
            return {"loaded": {}, "skipped": {}}
        return textual_inversion.get_embeddings(self.ctx.model)

    def refresh_embeddings(self) -> None:
        from modules import textual_inversion

        if self.ctx.model is not None:
            textual_inversion.refresh_embeddings(self.ctx.model)

    def get_loras(self) -> list[dict]:
        from modules import extra_networks_lora

        return extra_networks_lora.get_loras(getattr(self.ctx.args, "lora_dir", None) or self.ctx.models_dir / "Lora")

    # -- progress, interrupt, skip -------------------------------------------------------------
    async def progressapi(self, request: Request, skip_current_image: bool = False) -> dict:
        """A coroutine, like interrupt: it answers even while queued requests hold every worker thread.

        With --api-auth a caller sees its own running job only; anyone else's (another API
        user's, a page user's) shows as busy, without its preview or prompt.
        """
        state = self.ctx.current_state
        if state is None or not state.job:
            return {"progress": 0.0, "eta_relative": 0.0, "state": _state_dict(state, idle=True),
                    "current_image": None, "textinfo": None}
        if self.credentials and state.owner != self.caller(request):
            return {"progress": 0.0, "eta_relative": 0.0, "state": {**_state_dict(None, idle=True), "job": "busy"},
                    "current_image": None, "textinfo": "Busy with another user's job"}
        progress, eta = state.progress()
        current_image = None
        latents = state.preview_latents  # as the job's live preview options chose (webui/jobs.py LivePreview)
        if not skip_current_image and latents is not None:
            method = state.preview_method
            # the cheap projection answers on the event loop; the VAE or TAESD waits for a worker thread
            current_image = self.preview(latents) if method == "cheap" else \
                await run_in_threadpool(self.preview, latents, method)
        return {"progress": progress, "eta_relative": eta, "state": _state_dict(state),
                "current_image": current_image, "textinfo": state.textinfo}

    def preview(self, latents, method: str = "cheap") -> str | None:
        """The running batch's latest preview latents through the live preview method
        (the cheap latent->RGB projection, TAESD or the VAE), as one PNG grid."""
        from modules import sd_vae_approx

        model = self.ctx.current_model or self.ctx.model
        try:
            rgb = sd_vae_approx.latents_to_rgb(model, latents, method)
            cols = int(len(rgb) ** 0.5 + 0.999999)
            # image size, but the grid at most PREVIEW_MAX_SIDE pixels wide: this runs on the event loop
            # (the cheap preview may already be at image size: the model's own preview decoder)
            up = max(1, latents.shape[-1] * model.vae_scale_factor // rgb.shape[-1])
            scale = max(1, min(up, PREVIEW_MAX_SIDE // max(1, cols * rgb.shape[-1])))
            size = (rgb.shape[-1] * scale, rgb.shape[-2] * scale)
            tiles = sd_vae_approx.to_pil(rgb, size)
        except Exception:  # a preview must never fail the progress call
            return None
        rows = (len(tiles) + cols - 1) // cols
        grid = Image.new("RGB", (cols * size[0], rows * size[1]))
        for i, tile in enumerate(tiles):
            grid.paste(tile, ((i % cols) * size[0], (i // cols) * size[1]))
        return encode_pil_to_base64(grid, None)

    # interrupt and skip are coroutines: they must answer even when every worker thread is
    # taken by requests waiting in the queue
    async def interruptapi(self, request: Request) -> dict:
        state = self.ctx.current_state
        if state is not None and (not self.credentials or state.owner == self.caller(request)):
            state.interrupt()
        return {}

    async def skipapi(self, request: Request) -> dict:
        state = self.ctx.current_state
        if state is not None and (not self.credentials or state.owner == self.caller(request)):
            state.skip()
        return {}

    # -- png-info ----------------------------------------------------------------------------
    def pnginfoapi(self, req: PNGInfoRequest) -> dict:
        """The image's text chunks, read without decoding its pixels (PNG, JPEG and WebP only)."""
        if not req.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        items = dict(images_module.read_image_text(images_module.decode_base64_bytes(req.image, field="image")))
        geninfo = items.pop("parameters", None) or ""
        params = images_module.parse_generation_parameters(geninfo) if geninfo else {}
        return {"info": geninfo, "items": items, "parameters": params}

    # -- lists -------------------------------------------------------------------------------
    def get_samplers(self) -> list[dict]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)}
                for s in sd_samplers.all_samplers]

    def get_schedulers(self) -> list[dict]:
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
                 "need_inner_model": s.need_inner_model} for s in sd_samplers.all_schedulers]

    def get_sd_models(self) -> list[dict]:
        return [{"title": c.title, "model_name": c.model_name, "hash": c.shorthash, "sha256": c.sha256,
                 "filename": str(c.path), "config": None} for c in self.ctx.checkpoints]

    def refresh_checkpoints(self) -> None:
        self.ctx.refresh_checkpoints()

    def get_config(self) -> dict:
        return self.ctx.get_options()

    def set_config(self, req: dict[str, Any]) -> None:
        self.ctx.set_options(req)

    def get_cmd_flags(self) -> dict:
        flags = {k: _jsonable(v) for k, v in vars(self.ctx.args).items()}
        for secret in ("api_auth", "gradio_auth"):
            if flags.get(secret):
                flags[secret] = "***"
        return flags

    def get_scripts_list(self) -> dict:
        return {"txt2img": [XYZ_PLOT.lower()], "img2img": [XYZ_PLOT.lower(), SD_UPSCALE.lower()]}

    def get_prompt_styles(self) -> list:
        self.ctx.styles.reload()
        return self.ctx.styles.prompt_styles()

    def get_sd_vaes(self) -> list:
        return [v.api() for v in self.ctx.vaes]

    def refresh_vae(self) -> None:
        self.ctx.refresh_vaes()

    def get_script_info(self) -> list[dict]:
        """AUTOMATIC1111's script list with each script's arguments (here: the X/Y/Z plot's named ones)."""
        from modules.scripts import xyz_grid

        defaults = xyz_grid.XYZArgs()
        args = [{"label": name, "value": getattr(defaults, name, None), "minimum": None, "maximum": None,
                 "step": None, "choices": xyz_grid.AXIS_NAMES if name.endswith("_type") else None}
                for name in jobs.XYZ_ARGUMENTS]
        upscale_args = [{"label": label, "value": value, "minimum": lo, "maximum": hi, "step": step, "choices": choices}
                        for label, value, lo, hi, step, choices in (
                            ("info", None, None, None, None, None), ("Tile overlap", 64, 0, 256, 16, None),
                            ("Upscaler", 0, None, None, None, [u.name for u in upscaler.list_upscalers(
                                self.ctx.models_dir)]), ("Scale Factor", 2.0, 1.0, 4.0, 0.05, None))]
        return [{"name": XYZ_PLOT.lower(), "is_alwayson": False, "is_img2img": is_img2img, "args": args}
                for is_img2img in (False, True)] + [
                {"name": SD_UPSCALE.lower(), "is_alwayson": False, "is_img2img": True, "args": upscale_args}]

    def get_memory(self) -> dict:
        """RAM and CUDA figures in AUTOMATIC1111's shape (bytes); with Ray workers, also each replica's state."""
        memory = self._memory()
        backend = getattr(self.ctx, "backend", None)
        if backend is not None:
            memory["workers"] = backend.workers()
        return memory

    def _memory(self) -> dict:
        import psutil
        import torch

        vm = psutil.virtual_memory()
        ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
        if not torch.cuda.is_available():
            return {"ram": ram, "cuda": {"error": "CUDA is not available on this server"}}
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()

        def pair(name):
            return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

        return {"ram": ram, "cuda": {
            "system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}}

    def unload_checkpoint(self) -> dict:
        self.ctx.unload_model()
        return {}

    def reload_checkpoint(self) -> dict:
        self.ctx.reload_model()
        return {}

    def interrogate(self, req: dict[str, Any]) -> None:
        """Interrogation needs models this project does not ship: a 422 that says which and why."""
        raise InvalidParameter("Interrogation (CLIP interrogator, DeepBooru) needs models this project does not ship "
                               "and cannot download: no interrogator is installed on this server", field="model")

    def server_stop(self, request: Request) -> dict:
        """--api-server-stop: stop the server (kill, restart and stop all stop it: there is no launcher to restart)."""
        import os
        import signal
        import threading

        threading.Timer(0.2, os.kill, args=(os.getpid(), signal.SIGTERM)).start()
        return {}


def _state_dict(state: JobState | None, idle: bool = False) -> dict:
    """AUTOMATIC1111's `shared.state.dict()`."""
    if state is None or idle:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"skipped": state.skipped, "interrupted": state.interrupted, "stopping_generation": False,
            "job": state.job, "job_count": state.job_count, "job_timestamp": state.job_timestamp,
            "job_no": state.job_no, "sampling_step": state.sampling_step, "sampling_steps": state.sampling_steps}


def install_error_handlers(app: FastAPI) -> None:
    """UserError -> its 4xx with `detail`; a sampler AUTOMATIC1111's way ("Sampler not found")."""

    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        detail = SAMPLER_NOT_FOUND if isinstance(exc, SamplerNotFound) else str(exc)
        return JSONResponse(status_code=exc.status_code,
                            content={"error": type(exc).__name__, "detail": detail, "body": "",
                                     "errors": str(exc), "field": exc.field})

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422, made safe for inputs JSON cannot carry back (NaN, bytes)
        return JSONResponse(status_code=422, content={"detail": _jsonable(jsonable_encoder(exc.errors()))})

    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def install_method_check(app: FastAPI, router: APIRouter) -> None:
    """A known /sdapi/v1 path with the wrong method is a 405 naming the allowed ones (the page mounted
    at / would otherwise answer 404 for it)."""
    allowed: dict[str, set[str]] = {}
    for route in router.routes:
        allowed.setdefault(route.path, set()).update(route.methods or ())

    class MethodCheck:  # plain ASGI, not BaseHTTPMiddleware: that would hide a client's disconnect from the routes
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            methods = allowed.get(scope.get("path")) if scope["type"] == "http" else None
            method = scope.get("method")
            if methods and method not in methods and not (method == "HEAD" and "GET" in methods):
                response = JSONResponse(status_code=405, headers={"Allow": ", ".join(sorted(methods))},
                                        content={"error": "MethodNotAllowed", "field": None,
                                                 "detail": f"{method} is not allowed here; use {', '.join(sorted(methods))}"})
                return await response(scope, receive, send)
            return await self.inner(scope, receive, send)

    app.add_middleware(MethodCheck)


def install_api_log(app: FastAPI) -> None:
    """--api-log: one line per API request (time, client, status, method, path, duration)."""

    @app.middleware("http")
    async def log_and_time(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith("/sdapi/"):
            client = f"{request.client.host}:{request.client.port}" if request.client else "-"
            print(f"API {time.strftime('%Y-%m-%d %H:%M:%S')} {response.status_code} {request.method} "
                  f"{request.url.path} {client} {time.perf_counter() - start:.3f}s", flush=True)
        return response
