"""AUTOMATIC1111's POST /sdapi/v1/create/embedding and /sdapi/v1/train/embedding, on this project's trainer.

Create writes `<embeddings-dir>/<name>.safetensors` (this project's embedding format, AUTOMATIC1111's
`.safetensors` layout, where AUTOMATIC1111 writes a `.pt`), initialised from `init_text`'s token
embeddings of the loaded model, and re-reads the folder so `/embeddings` lists it.

Train runs `training/train_embedding.py`'s `train_embedding` on the job queue (`ctx.queue_lock`, so
it never runs beside a generation job), as the current job: `/progress` shows its step of `steps`
and the loss in `textinfo`, `/interrupt` stops it after the current step with the embedding and the
optimiser state saved; the next train request for the same embedding continues from there. Every
field is checked before anything is queued or written (a 4xx naming the field); a failure while
training is AUTOMATIC1111's 200 with the error in `info`.

Used from the TrainEmbedding fields: embedding_name, learn_rate (a number or AUTOMATIC1111's
`rate:step, rate` schedule), batch_size, data_root (images with caption .txt files),
training_width / training_height, steps (the total, as AUTOMATIC1111: an embedding at step 40 trained
with steps=100 runs 60 more), save_embedding_every (how often the resume state is saved) and
log_directory (where that state is kept). Accepted and ignored (IGNORED_TRAIN_FIELDS): the rest.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from modules import textual_inversion as ti
from modules.errors import InvalidParameter, NotFound
from modules.job_state import JobState

MAX_VECTORS = 75  # AUTOMATIC1111's slider: one chunk
MAX_STEPS = 100_000  # AUTOMATIC1111's default "Max steps"
MAX_BATCH = 256
MAX_SIDE = 2048
MAX_DATA_FILES = 20_000  # a data_root like "/" is refused, not walked

# TrainEmbedding fields this trainer has no counterpart for: accepted (as AUTOMATIC1111's clients send
# them) and ignored. The captions are always `[name], [filewords]`; the latents the VAE's mean
# (AUTOMATIC1111's "deterministic"); no preview images are drawn.
IGNORED_TRAIN_FIELDS = ("id_task", "gradient_step", "varsize", "clip_grad_mode", "clip_grad_value", "shuffle_tags",
                        "tag_drop_out", "latent_sampling_method", "use_weight", "create_image_every",
                        "template_filename", "save_image_with_stored_embedding", "preview_from_txt2img",
                        "preview_prompt", "preview_negative_prompt", "preview_steps", "preview_sampler_name",
                        "preview_cfg_scale", "preview_seed", "preview_width", "preview_height")


class CreateEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(description="The embedding's name (letters, digits, spaces and ._-), its file's stem")
    num_vectors_per_token: int = Field(1, description=f"Vectors, 1 to {MAX_VECTORS}")
    overwrite_old: bool = Field(False, description="Replace an embedding of that name")
    init_text: str = Field("*", description="Text whose token embeddings the vectors start from")


class TrainEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    embedding_name: str = Field(description="A loaded embedding (GET /embeddings), stored as .safetensors")
    learn_rate: Union[float, str] = Field("0.005", description="A rate or AUTOMATIC1111's `rate:step, rate` schedule")
    batch_size: int = 1
    data_root: str = Field(description="Folder of training images with caption .txt files beside them")
    log_directory: Optional[str] = Field(None, description="Where the resume state is kept (default cache/)")
    training_width: Optional[int] = Field(None, description="Default: the model's native size")
    training_height: Optional[int] = None
    steps: int = Field(100, description="Train until this step (the embedding's own count)")
    save_embedding_every: int = Field(50, description="Save the resume state every N steps (0: only at the end)")
    # accepted and ignored (IGNORED_TRAIN_FIELDS); extra fields are allowed too
    id_task: Optional[str] = None
    gradient_step: Any = 1
    varsize: Any = False
    clip_grad_mode: Any = "disabled"
    clip_grad_value: Any = "0.1"
    shuffle_tags: Any = False
    tag_drop_out: Any = 0
    latent_sampling_method: Any = "deterministic"
    use_weight: Any = False
    create_image_every: Any = 0
    template_filename: Any = None
    save_image_with_stored_embedding: Any = False
    preview_from_txt2img: Any = False


# -- create -----------------------------------------------------------------------------------------
def embedding_folder(model) -> Path:
    folder = getattr(getattr(model, "embedding_db", None), "embeddings_dir", None)
    if folder is None:
        raise InvalidParameter("The server has no embeddings folder (--embeddings-dir)", field="name")
    return Path(folder)


def check_name(name: str) -> str:
    """The name as given, or a 422: AUTOMATIC1111 drops other characters silently, here the request is refused
    so the file is not written under a name the caller did not choose."""
    stripped = name.strip()
    if not stripped or stripped != ti.sanitize_name(name) or stripped.startswith("."):
        raise InvalidParameter(f"name must be letters, digits, spaces and ._- (not starting with .), got {name!r}",
                               field="name")
    return stripped


def create_embedding(ctx, req: CreateEmbeddingRequest) -> dict:
    """POST /sdapi/v1/create/embedding; waits for the queue, so a running job's embeddings do not change under it."""
    name = check_name(req.name)
    if not 1 <= req.num_vectors_per_token <= MAX_VECTORS:
        raise InvalidParameter(f"num_vectors_per_token must be between 1 and {MAX_VECTORS}, got "
                               f"{req.num_vectors_per_token}", field="num_vectors_per_token")
    with ctx.queue_lock:
        model = _model(ctx)
        folder = embedding_folder(model)
        path = folder / f"{name}.safetensors"
        taken = model.embedding_db.loaded.get(name) or model.embedding_db.skipped.get(name)
        taken_file = Path(getattr(taken, "filename", None) or getattr(taken, "path", None) or path)
        if taken is not None and taken_file.resolve() != path.resolve():  # overwriting would leave two of that name
            raise InvalidParameter(f"An embedding named {name!r} is stored in {taken_file}: overwrite_old replaces only "
                           f"{path.name}; rename or remove that file", field="name")
        if (path.exists() or taken is not None) and not req.overwrite_old:
            raise InvalidParameter(f"An embedding named {name!r} exists ({path}): "
                           f"set overwrite_old to replace it", field="name")
        written = ti.create_embedding(model, name, req.num_vectors_per_token, req.init_text, folder,
                                      overwrite_old=True)
    return {"info": f"create embedding filename: {written}"}


# -- train ------------------------------------------------------------------------------------------
def _model(ctx):
    if ctx.model is None:
        raise InvalidParameter("No model is loaded: POST /sdapi/v1/reload-checkpoint or pick a checkpoint",
                               field="sd_model_checkpoint")
    return ctx.model


def _trainer():
    from training import train_embedding as trainer

    return trainer


def check_data_root(data_root: str) -> Path:
    folder = Path(os.path.expanduser(data_root.strip())) if data_root.strip() else None
    if folder is None or not folder.is_dir():
        raise InvalidParameter(f"data_root must be a folder of training images on the server, got {data_root!r}",
                               field="data_root")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise InvalidParameter(f"data_root {data_root!r} is not readable by the server", field="data_root")
    count = 0
    for _, dirs, names in os.walk(folder):
        count += len(dirs) + len(names)
        if count > MAX_DATA_FILES:
            raise InvalidParameter(f"data_root {data_root!r} holds more than {MAX_DATA_FILES} files: point it at "
                                   f"the folder of training images", field="data_root")
    return folder


def check_cost(ctx, model, req: TrainEmbeddingRequest, width: int, height: int, done: int) -> None:
    """--max-job-seconds bounds a training job too: each step is about three UNet calls' work (forward and
    backward) on `batch_size` images; a 422 naming `steps` over the limit."""
    from modules import job_cost

    limit = getattr(ctx.args, "max_job_seconds", None)
    speed = ctx.unet_speed() if limit else None
    if not limit or speed is None:
        return
    f = model.vae_scale_factor
    seconds = max(req.steps - done, 0) * speed.seconds(3 * req.batch_size, (width // f) * (height // f))
    if seconds > limit:
        raise InvalidParameter(f"This training would take about {job_cost.describe(seconds)} on this server, over "
                               f"its limit of {job_cost.describe(limit)} per job (--max-job-seconds {limit:g}): "
                               f"lower steps, batch_size or the training size", field="steps")


def prepare_training(ctx, model, req: TrainEmbeddingRequest) -> dict:
    """Every field checked and the images read: the train_embedding arguments, or a 4xx naming the field."""
    trainer = _trainer()
    if hasattr(model.cond_stage, "clip_l"):
        raise InvalidParameter("Embedding training supports SD 1.x/2.x models (one text encoder)",
                               field="sd_model_checkpoint")
    embedding = model.embedding_db.loaded.get(req.embedding_name) if model.embedding_db is not None else None
    if embedding is None:
        raise NotFound(f"No loaded embedding named {req.embedding_name!r} (GET /sdapi/v1/embeddings; "
                       f"POST /sdapi/v1/create/embedding makes one)", field="embedding_name")
    source = Path(embedding.filename or "")
    if source.suffix.lower() != ".safetensors" or source.stem != embedding.name or isinstance(embedding.vec, dict) \
            or ti.sanitize_name(embedding.name) != embedding.name:
        raise InvalidParameter(f"Embedding {embedding.name!r} is stored as {source.name}: only a "
                               f"<name>.safetensors embedding is trained in place", field="embedding_name")
    if not 1 <= req.steps <= MAX_STEPS:
        raise InvalidParameter(f"steps must be between 1 and {MAX_STEPS}, got {req.steps}", field="steps")
    if not 1 <= req.batch_size <= MAX_BATCH:
        raise InvalidParameter(f"batch_size must be between 1 and {MAX_BATCH}, got {req.batch_size}",
                               field="batch_size")
    if req.save_embedding_every < 0:
        raise InvalidParameter("save_embedding_every must be 0 or more", field="save_embedding_every")
    try:
        schedule = trainer.parse_learn_rate(req.learn_rate, req.steps)
    except ValueError as e:
        raise InvalidParameter(f"learn_rate {req.learn_rate!r} is not a rate or a `rate:step, rate` schedule ({e})",
                               field="learn_rate") from None
    if not all(math.isfinite(rate) and rate > 0 for rate, _ in schedule):
        raise InvalidParameter(f"learn_rate must be positive, got {req.learn_rate!r}", field="learn_rate")
    width = req.training_width or model.default_size
    height = req.training_height or width
    for key, side in (("training_width", width), ("training_height", height)):
        if not 8 <= side <= MAX_SIDE or side % 8:
            raise InvalidParameter(f"{key} must be a multiple of 8 from 8 to {MAX_SIDE}, got {side}", field=key)
    check_cost(ctx, model, req, width, height, int(embedding.step or 0))
    folder = check_data_root(req.data_root)
    try:
        data = trainer.load_folder(folder, width, height)
    except ValueError:
        raise InvalidParameter(f"data_root {req.data_root!r} holds no training images "
                               f"({', '.join(trainer.IMAGE_SUFFIXES)})", field="data_root") from None
    except Exception as e:  # an unreadable, corrupt or oversized image
        raise InvalidParameter(f"data_root: cannot read an image ({type(e).__name__}: {e})",
                               field="data_root") from None
    log_root = Path(os.path.expanduser(req.log_directory)) if req.log_directory else \
        trainer.REPO / "cache" / "train-embedding"
    existing = next((p for p in (log_root, *log_root.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidParameter(f"log_directory {str(log_root)!r} cannot be written by the server",
                               field="log_directory")
    work_dir = log_root / embedding.name
    return {"name": embedding.name, "data": data, "steps": req.steps, "learn_rate": req.learn_rate,
            "batch_size": req.batch_size, "embeddings_dir": source.parent, "work_dir": work_dir,
            "save_every": req.save_embedding_every, "resume": _resumable(work_dir, embedding),
            "initial_vectors": embedding.vec.detach().float().cpu(), "initial_step": int(embedding.step or 0),
            "num_vectors": embedding.vectors}


def _resumable(work_dir: Path, embedding: ti.Embedding) -> bool:
    """Continue with the saved optimiser state only when it belongs to exactly this file's vectors and step
    (the file was written by the same interrupted run); otherwise start afresh from the file."""
    state_file = work_dir / "state.pt"
    if not state_file.is_file():
        return False
    try:
        st = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception:
        return False
    vec = embedding.vec.detach().float().cpu()
    return int(st.get("step", -1)) == int(embedding.step or 0) and tuple(st["vec"].shape) == tuple(vec.shape) \
        and torch.equal(st["vec"].float(), vec)


def train_embedding(ctx, req: TrainEmbeddingRequest, state: JobState) -> dict:
    """POST /sdapi/v1/train/embedding: checks (4xx), then the training as the queue's current job."""
    prepared_for = _model(ctx)
    args = prepare_training(ctx, prepared_for, req)
    with ctx.queue_lock:
        model = _model(ctx)
        if model is not prepared_for:
            raise InvalidParameter("The checkpoint changed while the request waited in the queue: send it again",
                                   field="sd_model_checkpoint")
        if model.embedding_db is None or model.embedding_db.loaded.get(args["name"]) is None:
            raise NotFound(f"Embedding {args['name']!r} was removed while the request waited", field="embedding_name")
        state.begin("train_embedding", 1)
        state.sampling_steps, state.sampling_step = args["steps"], min(args["initial_step"], args["steps"])
        state.textinfo = f"Training embedding {args['name']}"
        ctx.current_state, ctx.current_model = state, model

        def progress(step: int, steps: int, loss: float) -> None:
            state.sampling_step = step
            state.textinfo = f"[{step}/{steps}] loss: {loss:.7f}"

        filename, error = "", None
        try:
            result = _trainer().train_embedding(model, progress_callback=progress,
                                                should_stop=lambda: state.interrupted, show_progress=False, **args)
            filename = str(result.path)
        except Exception as e:  # AUTOMATIC1111 answers 200 with the error in `info`
            error = e
        finally:
            ctx.current_state = ctx.current_model = None
            state.end()
            ti.refresh_embeddings(model)
    return {"info": f"train embedding complete: filename: {filename} error: {error}"}


def add_routes(router, api) -> None:
    """The two routes on the API's router (`api`: webui/api.py's Api, for the context and the caller)."""
    def create(req: CreateEmbeddingRequest) -> dict:
        return create_embedding(api.ctx, req)

    def train(req: TrainEmbeddingRequest, request: Request) -> dict:
        return train_embedding(api.ctx, req, JobState(owner=api.caller(request)))

    router.add_api_route("/create/embedding", create, methods=["POST"])
    router.add_api_route("/train/embedding", train, methods=["POST"])
