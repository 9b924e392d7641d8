"""What the UI and the API share: the loaded model, the options, the one-job-at-a-time queue, the running job.

There is one `WebUIContext` per server, created by app.py and handed to the UI and the API;
each job brings its own JobState, so progress, previews and interrupt stay per job. The
queue is `queue_lock`: a job from the UI and one from the API wait for each other, and
`current_state` is always the job that holds the lock (the one progress and interrupt see).
The options are AUTOMATIC1111's full set (modules/options.py), persisted in
`--ui-settings-file`; the VAE the `sd_vae` option names is applied to every model loaded.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from modules import options as options_module
from modules import processing, sd_checkpoint_cache, sd_models, sd_vae
from modules.errors import InvalidParameter, UserError
from modules.job_state import JobState
from modules.processing import Processed
from modules.sd_samplers_common import AfterSampleHook

log = logging.getLogger("webui")


def cmd_args_repo() -> Path:
    from modules import cmd_args

    return cmd_args.REPO


class WebUIContext:
    def __init__(self, args, model: sd_models.SDModel | None = None):
        self.args = args
        self.model = model
        self.queue_lock = threading.Lock()  # one generation at a time on the model
        self.current_state: JobState | None = None  # the running job, for the progress and interrupt APIs
        self.current_model: sd_models.SDModel | None = None  # the model it runs on (for its previews)
        self.backend = None  # a queue back-end that replaces the in-process one (webui/queue_ray.py's RayBackend)
        self.settings_file = getattr(args, "ui_settings_file", None)
        samples = getattr(args, "outdir_samples", "") or ""
        defaults = {"outdir_txt2img_samples": str(samples),  # img2img's beside it, as AUTOMATIC1111's outputs/
                    "outdir_img2img_samples": str(Path(samples).parent / "img2img-images") if samples else ""}
        self.options = (options_module.Options.from_file(self.settings_file, defaults) if self.settings_file
                        else options_module.Options(defaults))
        for problem in filter(None, [self.options.load_error, *self.options.load_warnings]):
            log.warning("settings: %s", problem)
        self._checkpoints: list[sd_models.CheckpointInfo] | None = None
        self.checkpoint: sd_models.CheckpointInfo | None = None  # the loaded model's entry
        self.unloaded_path: Path | None = None  # the checkpoint unload-checkpoint freed, for reload-checkpoint
        self._speed = None  # (model, job_cost.UnetSpeed) once measured
        self.checkpoint_cache = sd_checkpoint_cache.CheckpointCache()  # switching back is a copy (load_kwargs)
        self.models_dir = Path(getattr(args, "models_dir", None) or cmd_args_repo() / "models")  # ESRGAN/, Lora/, ...
        from modules import styles as styles_module

        self.styles = styles_module.StyleDatabase(getattr(args, "styles_file", None) or [])
        for warning in self.styles.warnings:
            log.warning("styles: %s", warning)
        self.vaes = self.refresh_vaes()
        if model is not None:
            self.checkpoint = self._info_for_path(Path(model.path))
            self._model_loaded(model)

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
        """load_model's arguments from the flags (--device, --no-half, --medvram, ...), and the RAM checkpoint
        cache sized by the options (sd_checkpoint_cache, sd_checkpoints_limit)."""
        return {**sd_models.load_kwargs_from_args(self.args), "cache": self.checkpoint_cache.configure(self.options)}

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
        self._model_loaded(model)
        return model

    def _model_loaded(self, model: sd_models.SDModel) -> None:
        """A model was loaded: record it in the options and give it the VAE the `sd_vae` option names
        (one that does not fit this model is reported, and the checkpoint's own VAE serves)."""
        if self.checkpoint is not None and model is self.model:
            self.options.record("sd_model_checkpoint", self.checkpoint.title)
            self.options.record("sd_checkpoint_hash", self.checkpoint.sha256)
        try:
            self.apply_vae(model)
        except UserError as e:
            log.warning("VAE: %s (the checkpoint's own VAE is used)", e)

    def apply_vae(self, model: sd_models.SDModel, setting: str | None = None, overrides_per_model: bool | None = None
                  ) -> None:
        """Give `model` the VAE the `sd_vae` option names (or `setting`, not yet stored)."""
        setting = self.options.get("sd_vae") if setting is None else setting
        if overrides_per_model is None:
            overrides_per_model = self.options.get("sd_vae_overrides_per_model_preferences", True)
        sd_vae.apply_vae_setting(model, setting, self.vaes,
                                 vae_path=getattr(self.args, "vae_path", None),
                                 overrides_per_model=overrides_per_model,
                                 allow_pickle=bool(getattr(self.args, "allow_pickle_checkpoints", False)))

    def unload_model(self) -> None:
        """Free the model (AUTOMATIC1111's unload-checkpoint); jobs are refused until one is loaded again."""
        with self.queue_lock:
            if self.model is not None:
                sd_models.unload_model(self.model)
            if self.model is not None:
                self.unloaded_path = Path(self.model.path)
            self.model = None

    def reload_model(self) -> None:
        """Load the checkpoint again (after unload-checkpoint, or to re-read its file)."""
        path = Path(self.model.path) if self.model is not None else self.unloaded_path
        if path is None:
            raise InvalidParameter("No checkpoint to reload", field="sd_model_checkpoint")
        with self.queue_lock:
            self._switch(path)

    # -- cost ----------------------------------------------------------------------------------
    def unet_speed(self):
        """The loaded model's measured UNet speed (modules/job_cost.py), measured once per model, between jobs."""
        from modules import job_cost

        model = self.model
        if model is None:
            return None
        if self._speed is None or self._speed[0] is not model:
            with self.queue_lock:
                if self._speed is None or self._speed[0] is not self.model:
                    self._speed = (self.model, job_cost.measure(self.model))
        return self._speed[1]

    def known_unet_speed(self):
        """The loaded model's UNet speed if already measured, else None (never waits)."""
        speed = self._speed
        return speed[1] if speed is not None and speed[0] is self.model else None

    def check_cost(self, p, runs: int = 1) -> float | None:
        """Refuse a job (of `runs` runs of `p`, for a script) over --max-job-seconds: a 422 naming the
        limit. Returns the estimate in seconds, or None when no limit is set."""
        from modules import job_cost

        limit = getattr(self.args, "max_job_seconds", None)
        if not limit or self.model is None:
            return None
        seconds = runs * job_cost.estimate_seconds(p, self.model, self.unet_speed())
        if seconds > limit:
            raise InvalidParameter(
                f"This job would take about {job_cost.describe(seconds)} on this server, over its limit of "
                f"{job_cost.describe(limit)} per job (--max-job-seconds {limit:g}): lower the size, steps or "
                f"batch", field="max_job_seconds")
        return seconds

    # -- VAEs --------------------------------------------------------------------------------
    def refresh_vaes(self) -> list:
        self.vaes = sd_vae.list_vaes(sd_vae.vae_dirs_from_args(self.args), self.checkpoint_dirs())
        return self.vaes

    # -- options -----------------------------------------------------------------------------
    def get_options(self) -> dict:
        return self.options.get_all()

    def set_options(self, values: dict) -> None:
        """Write options (all or nothing): a bad value is a 422 naming the key and nothing changes; an
        unknown checkpoint or VAE a 404; a checkpoint that fails to load a 422 with the old one serving."""
        if not isinstance(values, dict):
            raise InvalidParameter("the options must be an object of key: value", field="options")
        with self.queue_lock:
            changes = self.options.validate(values, is_api=True)
            clip = changes.get("CLIP_stop_at_last_layers")
            if clip is not None and self.model is not None and clip > self.model.max_clip_skip:
                raise InvalidParameter(f"CLIP_stop_at_last_layers must be at most {self.model.max_clip_skip} for "
                                       f"the loaded model, got {clip}", field="CLIP_stop_at_last_layers")
            name = changes.get("sd_model_checkpoint")
            info = self.find_checkpoint(name) if isinstance(name, str) else None
            if "sd_vae" in changes:
                sd_vae.validate_setting(changes["sd_vae"], self.vaes)
            switched = info is not None and not self.is_current(info)
            vae_keys = ("sd_vae", "sd_vae_overrides_per_model_preferences")
            old_vae = tuple(self.options.get(k) for k in vae_keys)
            new_vae = tuple(changes.get(k, v) for k, v in zip(vae_keys, old_vae))
            if switched:
                self._switch_model_only(Path(info.path))
            if (switched or new_vae != old_vae) and self.model is not None:
                try:  # before anything is stored: a VAE that does not fit changes no option (the old VAE serves)
                    self.apply_vae(self.model, *new_vae)
                except UserError:
                    if switched:
                        self._record_checkpoint()
                    raise
            self.options.set(changes, is_api=True)
            self._record_checkpoint()
            self.save_options()

    def _record_checkpoint(self) -> None:
        if self.checkpoint is not None:
            self.options.record("sd_model_checkpoint", self.checkpoint.title)
            self.options.record("sd_checkpoint_hash", self.checkpoint.sha256)

    def _switch_model_only(self, path: Path) -> None:
        model = sd_models.switch_model(self.model, path, **self.load_kwargs())
        self.model, self.checkpoint = model, self._info_for_path(path)

    def save_options(self) -> None:
        if not self.settings_file:
            return
        try:
            self.options.save(self.settings_file)
        except OSError as e:
            log.warning("settings not saved to %s: %s", self.settings_file, e)

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
        if self.backend is not None:  # --workers / --ray-address: the job runs on a Ray Serve replica
            return self.backend.run(job, state, hooks)
        with self.queue_lock:
            model = self.model
            if job.checkpoint is not None and not self.is_current(job.checkpoint):
                if job.keep_checkpoint:
                    model = self._switch(Path(job.checkpoint.path))
                else:
                    model = sd_models.load_model(job.checkpoint.path, **self.load_kwargs())
                    self._model_loaded(model)
            if model is None:
                raise InvalidParameter("No model is loaded: POST /sdapi/v1/reload-checkpoint or pick a checkpoint",
                                       field="sd_model_checkpoint")
            self.current_state, self.current_model = state, model
            try:
                run = job.script.run if job.script is not None else processing.process_images
                return run(model, job.p, hooks=hooks, state=state)
            finally:
                self.current_state = self.current_model = None
