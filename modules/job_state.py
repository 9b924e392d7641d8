"""Progress, interrupt and skip of one generation job.

AUTOMATIC1111 keeps this in a process-wide `shared.state`; here each job gets its own
`JobState`, passed explicitly, so two users' jobs never see each other's progress or
previews and tests can build one without a server.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobState:
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    job_timestamp: str = ""
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    textinfo: str | None = None
    time_start: float | None = None
    current_step_info: Any = None  # the last StepInfo seen (latents stay on the model's device)
    # the live preview (AUTOMATIC1111's current_image): latents of the subject and step the job's live
    # preview options chose, and the method to show them with (webui/jobs.py's LivePreview)
    preview_latents: Any = None
    preview_method: str = "cheap"
    owner: str | None = None  # who sent the job ("api:<user>", "page:<session>"): progress shows a job to its owner
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self, job: str, job_count: int) -> None:
        with self._lock:
            self.job, self.job_count, self.job_no = job, job_count, 0
            self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            self.sampling_step = self.sampling_steps = 0
            self.current_step_info = None  # `interrupted` stays: a job stopped while queued never starts
            self.preview_latents = None
            self.time_start = time.time()

    def end(self) -> None:
        with self._lock:
            self.job = ""
            self.time_start = None

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    def next_batch(self) -> None:
        with self._lock:
            self.job_no += 1
            self.sampling_step = 0
            self.skipped = False

    def progress(self) -> tuple[float, float]:
        """(fraction done over the whole job, estimated seconds left), as the progress API reports."""
        with self._lock:
            if not self.job or not self.job_count or self.time_start is None:
                return 0.0, 0.0
            per_batch = 1.0 / self.job_count
            done = self.job_no * per_batch
            if self.sampling_steps:
                done += per_batch * self.sampling_step / self.sampling_steps
            elapsed = time.time() - self.time_start
            eta = elapsed / done - elapsed if done > 0 else 0.0
            return min(done, 1.0), max(eta, 0.0)
