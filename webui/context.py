"""What the UI and the API share: the loaded model, the one-job-at-a-time queue, the running job.

There is one `WebUIContext` per server, created by app.py and handed to the UI and the API;
each job brings its own JobState, so progress, previews and interrupt stay per job.
"""
from __future__ import annotations

import threading
from pathlib import Path

from modules import processing, sd_models
from modules.job_state import JobState
from modules.processing import Processed, StableDiffusionProcessingTxt2Img
from modules.sd_samplers_common import AfterSampleHook


class WebUIContext:
    def __init__(self, args, model: sd_models.SDModel | None = None):
        self.args = args
        self.model = model
        self.queue_lock = threading.Lock()  # one generation at a time on the model
        self.current_state: JobState | None = None  # the running job, for the progress and interrupt APIs

    def load_model(self, path: str | Path) -> sd_models.SDModel:
        """Switch checkpoints between jobs; a failed load raises and leaves the current model serving."""
        with self.queue_lock:
            model = sd_models.load_model(path, device=getattr(self.args, "device", None))
            self.model = model
            return model

    def txt2img(self, p: StableDiffusionProcessingTxt2Img, state: JobState | None = None,
                hooks: list[AfterSampleHook] = ()) -> Processed:
        """Wait for the queue, then run the job; `state` may be interrupted while it waits."""
        state = state or JobState()
        with self.queue_lock:
            self.current_state = state
            try:
                return processing.process_images(self.model, p, hooks=hooks, state=state)
            finally:
                self.current_state = None
