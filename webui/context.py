"""What the UI and the API share: the loaded model, the one-job-at-a-time queue, the running job.

There is one `WebUIContext` per server, created by app.py and handed to the UI and the API;
each job brings its own JobState, so progress, previews and interrupt stay per job. The
queue is `queue_lock`: a job from the UI and one from the API wait for each other, and
`current_state` is always the job that holds the lock (the one progress and interrupt see).
"""
from __future__ import annotations

import threading
from pathlib import Path

from modules import processing, sd_models
from modules.errors import InvalidParameter
from modules.job_state import JobState
from modules.processing import Processed
from modules.sd_samplers_common import AfterSampleHook

# Options of AUTOMATIC1111's settings that this server knows, with their defaults. Only these
# are served by GET /sdapi/v1/options and accepted by POST; the others are ignored, as
# AUTOMATIC1111 ignores keys it does not know.
DEFAULT_OPTIONS = {
    "sd_model_checkpoint": None,  # title of the loaded checkpoint; setting it switches the model
    "sd_checkpoint_hash": None,  # read-only: sha256 of the loaded checkpoint
    "CLIP_stop_at_last_layers": 1,  # the default clip skip of jobs that do not set one
    "samples_save": True,  # the UI saves its images (the API follows each request's save_images)
    "samples_format": "png",  # read-only
    "outdir_txt2img_samples": None,  # read-only: --outdir-samples
}
READ_ONLY_OPTIONS = {"sd_checkpoint_hash", "samples_format", "outdir_txt2img_samples"}


class WebUIContext:
    def __init__(self, args, model: sd_models.SDModel | None = None):
        self.args = args
        self.model = model
        self.queue_lock = threading.Lock()  # one generation at a time on the model
        self.current_state: JobState | None = None  # the running job, for the progress and interrupt APIs
        self.current_model: sd_models.SDModel | None = None  # the model it runs on (for its previews)
        self.options = dict(DEFAULT_OPTIONS)
        self.options["outdir_txt2img_samples"] = str(getattr(args, "outdir_samples", "") or "")
        self._checkpoints: list[sd_models.CheckpointInfo] | None = None
        self.checkpoint: sd_models.CheckpointInfo | None = None  # the loaded model's entry
        if model is not None:
            self.checkpoint = self._info_for_path(Path(model.path))

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_dirs(self) -> list[Path]:
        """Where checkpoints are listed from: the default folder, --ckpt-dir, and --ckpt itself."""
        from modules import cmd_args

        dirs = [Path(cmd_args.DEFAULT_CKPT_DIR)]
        for extra in (getattr(self.args, "ckpt_dir", None), getattr(self.args, "ckpt", None)):
            if extra and Path(extra).resolve() not in [d.resolve() for d in dirs]:
                dirs.append(Path(extra))
        return dirs

    @property
    def checkpoints(self) -> list[sd_models.CheckpointInfo]:
        """The checkpoint list as of the last refresh (hashes are computed once per entry)."""
        if self._checkpoints is None:
            self.refresh_checkpoints()
        return self._checkpoints

    def refresh_checkpoints(self) -> list[sd_models.CheckpointInfo]:
        old = {Path(c.path).resolve(): c for c in (self._checkpoints or [])}
        fresh = sd_models.list_checkpoints(self.checkpoint_dirs())
        # keep the old entries (and their computed hashes) for files that are still there
        self._checkpoints = [old.get(Path(c.path).resolve(), c) for c in fresh]
        return self._checkpoints

    def _info_for_path(self, path: Path) -> sd_models.CheckpointInfo:
        for info in self.checkpoints:
            if Path(info.path).resolve() == path.resolve():
                return info
        return sd_models.CheckpointInfo(path, path.name)

    def find_checkpoint(self, name: str) -> sd_models.CheckpointInfo:
        """A title, name or short hash -> the checkpoint (404 if none), looked up on disk now, so a
        file added since the last refresh is found too."""
        found = sd_models.find_checkpoint(name, self.checkpoint_dirs())
        return self._info_for_path(Path(found.path))

    def load_kwargs(self) -> dict:
        """load_model's arguments from the flags (--device, --no-half, --medvram, ...)."""
        return sd_models.load_kwargs_from_args(self.args)

    def is_current(self, info: sd_models.CheckpointInfo) -> bool:
        return self.model is not None and Path(self.model.path).resolve() == Path(info.path).resolve()

    def load_model(self, path: str | Path) -> sd_models.SDModel:
        """Switch checkpoints between jobs; a failed load raises and leaves the current model serving."""
        with self.queue_lock:
            return self._switch(Path(path))

    def load_checkpoint(self, name: str) -> sd_models.SDModel:
        """Switch to a checkpoint named by title, name or short hash (404 if unknown, 422 if unloadable)."""
        info = self.find_checkpoint(name)
        with self.queue_lock:
            if self.is_current(info):
                return self.model
            return self._switch(Path(info.path))

    def _switch(self, path: Path) -> sd_models.SDModel:
        """Load `path` and free the current model; if the load fails, the current one stays."""
        model = sd_models.switch_model(self.model, path, **self.load_kwargs())
        self.model = model
        self.checkpoint = self._info_for_path(path)
        return model

    # -- options -----------------------------------------------------------------------------
    def get_options(self) -> dict:
        opts = dict(self.options)
        if self.checkpoint is not None:
            opts["sd_model_checkpoint"] = self.checkpoint.title
            opts["sd_checkpoint_hash"] = self.checkpoint.sha256
        return opts

    def set_options(self, values: dict) -> None:
        """Apply the known options (unknown and read-only keys are ignored, as AUTOMATIC1111 does)."""
        clip = values.get("CLIP_stop_at_last_layers")
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not float(clip).is_integer() \
                    or not 1 <= clip <= processing.LIMITS["clip_skip"][1]:
                raise InvalidParameter(f"CLIP_stop_at_last_layers must be a whole number between 1 and "
                                       f"{processing.LIMITS['clip_skip'][1]}, got {clip!r}",
                                       field="CLIP_stop_at_last_layers")
        if "samples_save" in values and not isinstance(values["samples_save"], bool):
            raise InvalidParameter("samples_save must be true or false", field="samples_save")
        name = values.get("sd_model_checkpoint")
        if name is not None:
            if not isinstance(name, str):
                raise InvalidParameter("sd_model_checkpoint must be a checkpoint title", field="sd_model_checkpoint")
            self.load_checkpoint(name)
        if clip is not None:
            self.options["CLIP_stop_at_last_layers"] = int(clip)
        if "samples_save" in values:
            self.options["samples_save"] = values["samples_save"]

    # -- jobs --------------------------------------------------------------------------------
    def outdir(self, kind: str) -> Path:
        """Where images of a job kind are saved (the options' outdir_*, else --outdir-samples)."""
        from webui import jobs

        return jobs.outdir(self.args, self.options, kind)

    def run(self, job, state: JobState, hooks: list[AfterSampleHook] = ()) -> Processed:
        """The in-process queue back-end: wait for the queue, then run the job (webui/jobs.py's Job).

        `state` may be interrupted while the job waits: it then never starts. A job naming a
        checkpoint runs on it (AUTOMATIC1111's override_settings `sd_model_checkpoint`); it
        becomes the current model only with `job.keep_checkpoint`. A script (the X/Y/Z plot)
        holds the queue for all of its runs.
        """
        with self.queue_lock:
            model = self.model
            if job.checkpoint is not None and not self.is_current(job.checkpoint):
                if job.keep_checkpoint:
                    model = self._switch(Path(job.checkpoint.path))
                else:
                    model = sd_models.load_model(job.checkpoint.path, **self.load_kwargs())
            self.current_state, self.current_model = state, model
            try:
                run = job.script.run if job.script is not None else processing.process_images
                return run(model, job.p, hooks=hooks, state=state)
            finally:
                self.current_state = self.current_model = None
