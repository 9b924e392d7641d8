"""One job's step-by-step previews: an after_sample hook that keeps a pred_x0 image per step.

Each generation builds its own `PreviewCollector`, so two people's previews never mix.
The hook runs on the sampling thread and must stay cheap: it projects the latents to RGB
(the "Approx cheap" linear map by default, the VAE only when asked), arranges the batch
(and, for "All three", the combined / prompt / negative predictions side by side) into one
small picture, and appends it. The UI thread reads `frames()` while sampling runs and
does the slow parts (PNG files, the animation) itself.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from modules import sd_vae_approx
from modules.sd_samplers_common import StepInfo

# What the preview shows (AUTOMATIC1111's `live_preview_content`, plus all three at once).
SUBJECT_COMBINED, SUBJECT_PROMPT, SUBJECT_NEGATIVE, SUBJECT_ALL = "Combined", "Prompt", "Negative prompt", "All three"
SUBJECTS = [SUBJECT_COMBINED, SUBJECT_PROMPT, SUBJECT_NEGATIVE, SUBJECT_ALL]
# How latents become pixels (AUTOMATIC1111's `show_progress_type` names).
METHOD_CHEAP, METHOD_FULL = "Approx cheap", "Full"
METHODS = [METHOD_CHEAP, METHOD_FULL]

MAX_TILE = 256  # long side of one preview tile, in pixels
MAX_PICTURE = 768  # long side of one step's picture (all tiles), so a long job's previews stay small
MAX_ANIMATION_FRAMES = 300


@dataclass
class PreviewFrame:
    step: int  # 1-based
    steps: int
    batch_no: int  # 1-based batch (of batch count)
    batch_count: int
    image: Image.Image | None  # None once the UI has written it to `path` and let it go
    path: Path | None = None
    seq: int = 0  # the recorder's position of the step
    pass_label: str | None = None  # "hires" for the hires fix's second pass

    @property
    def caption(self) -> str:
        text = f"{'Hires fix · ' if self.pass_label == 'hires' else ''}Step {self.step}/{self.steps}"
        return text + (f" · batch {self.batch_no}/{self.batch_count}" if self.batch_count > 1 else "")


def tile_size(width: int, height: int, max_side: int = MAX_TILE) -> tuple[int, int]:
    """The size one image of the batch gets in a preview: the image's, scaled down to `max_side`."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def grid(rows: list[list[Image.Image]], size: tuple[int, int]) -> Image.Image:
    """Paste equally sized tiles into one picture, row by row."""
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * size[0], len(rows) * size[1]), (128, 128, 128))
    for y, row in enumerate(rows):
        for x, tile in enumerate(row):
            out.paste(tile, (x * size[0], y * size[1]))
    return out


class PreviewCollector:
    """One `PreviewFrame` per sampling step, rendered from a `TrajectoryRecorder`'s records.

    The recorder is the after_sample hook: it only keeps a device-side copy of the step's
    latents (no transfer, no sync), so sampling does not wait for previews. `frames()`
    turns the steps recorded since its last call into pictures on the thread that asks
    (the UI's streaming loop), with the cheap projection or the VAE. Given no recorder, the
    collector makes its own and is itself the hook (`collector(info)`). `model` is the model
    that samples (or a callable returning it, for a UI whose checkpoint may change while a
    job waits in the queue).
    """

    def __init__(self, model, subject: str = SUBJECT_COMBINED, method: str = METHOD_CHEAP,
                 size: tuple[int, int] = (64, 64), batch_count: int = 1, recorder=None):
        from webui.inspector import TrajectoryRecorder

        if subject not in SUBJECTS:
            raise ValueError(f"unknown preview subject {subject!r}")
        if method not in METHODS:
            raise ValueError(f"unknown preview method {method!r}")
        self._model: Callable = model if callable(model) else (lambda: model)
        self.subject, self.method, self.batch_count = subject, method, batch_count
        self.image_size = tuple(size)
        self.size: tuple[int, int] | None = None  # tile size, once the batch size is known
        self._latent: tuple[int, int] | None = None  # the latent size `size` was made for
        self._first: tuple[int, int] | None = None  # the first pass's latent size (image_size's)
        self.recorder = recorder if recorder is not None else TrajectoryRecorder(batch_count)
        self._frames: list[PreviewFrame] = []
        self._lock = threading.Lock()  # guards _frames
        self._render_lock = threading.Lock()  # one renderer at a time keeps frames in step order
        self.seconds = 0.0  # time spent in the hook (on the sampling thread)
        self.render_seconds = 0.0  # time spent making pictures (on the thread calling frames())

    def __call__(self, info: StepInfo) -> None:
        start = time.perf_counter()
        self.recorder(info)
        self.seconds += time.perf_counter() - start

    def latents_for(self, record) -> list[torch.Tensor | None]:
        """The latents to show, one (N, C, h, w) tensor per column; None where a branch was not computed
        (no negative pass at CFG scale 1)."""
        combined, prompt, negative = record.combined, record.prompt, record.negative
        if self.subject == SUBJECT_ALL:
            return [combined, prompt if prompt is not None else combined, negative]
        if self.subject == SUBJECT_PROMPT:
            return [prompt if prompt is not None else combined]
        if self.subject == SUBJECT_NEGATIVE:
            return [negative]
        return [combined]

    def layout(self, n: int, columns: int) -> tuple[int, int]:
        """(rows, columns) of tiles for a batch of n images: one row per image with several subjects,
        else a near-square grid."""
        if columns > 1:
            return n, columns
        cols = math.ceil(math.sqrt(n))
        return math.ceil(n / cols), cols

    def render(self, n: int, columns: list[torch.Tensor | None]) -> Image.Image:
        """One step's picture: the n images of the batch, one column per subject."""
        latent = next((tuple(c.shape[-2:]) for c in columns if c is not None), None)
        if self._first is None:
            self._first = latent
        if self.size is None or (latent is not None and latent != self._latent):
            image = self.image_size
            if latent is not None and self._first is not None and latent != self._first:  # a larger pass (hires fix)
                image = (round(image[0] * latent[1] / self._first[1]), round(image[1] * latent[0] / self._first[0]))
            self._latent = latent
            rows, cols = self.layout(n, len(columns))
            self.size = tile_size(*image, max_side=min(MAX_TILE, MAX_PICTURE // max(rows, cols)))
        present = [c for c in columns if c is not None]
        method = "full" if self.method == METHOD_FULL else "cheap"
        rgb = None
        if present:
            model, latents = self._model(), torch.cat(present)
            if method == "full":  # the records are on the CPU in float16: the VAE wants its own device and dtype
                latents = latents.to(model.device, model.dtype)
            with torch.no_grad():
                rgb = sd_vae_approx.latents_to_rgb(model, latents, method)
        tiles, k = [], 0
        blank = Image.new("RGB", self.size, (128, 128, 128))
        for c in columns:
            if c is None:
                tiles.append([blank] * n)
            else:
                tiles.append(sd_vae_approx.to_pil(rgb[k * n:(k + 1) * n], self.size))
                k += 1
        if len(columns) > 1:  # one row per image: combined | prompt | negative
            return grid([list(row) for row in zip(*tiles)], self.size)
        cols = math.ceil(math.sqrt(n))
        images = tiles[0]
        return grid([images[i:i + cols] for i in range(0, n, cols)], self.size)

    def frames(self) -> list[PreviewFrame]:
        """Every step's frame so far, rendering the steps recorded since the last call."""
        with self._render_lock:
            with self._lock:
                seen = self._frames[-1].seq + 1 if self._frames else 0
            start = time.perf_counter()
            made = []
            for r in self.recorder.records_since(seen):
                columns = [c.float() if c is not None else None for c in self.latents_for(r)]
                made.append(PreviewFrame(r.step, r.steps, r.batch_no, self.batch_count,
                                         self.render(r.combined.shape[0], columns), seq=r.seq,
                                         pass_label=r.pass_label))
            self.render_seconds += time.perf_counter() - start
            with self._lock:
                self._frames.extend(made)
                return list(self._frames)

    def store(self, index: int, path: Path) -> None:
        """Write frame `index` to `path` (PNG) and drop its picture from memory: a long job's
        trajectory lives on disk, not in RAM."""
        with self._lock:
            frame = self._frames[index]
        if frame.image is not None:
            frame.image.save(path, compress_level=1)
            frame.path, frame.image = Path(path), None


def frame_image(frame: PreviewFrame) -> Image.Image:
    if frame.image is not None:
        return frame.image
    with Image.open(frame.path) as im:
        return im.convert("RGB")


def save_animation(frames: list[PreviewFrame], path: Path, frame_ms: int = 120, hold_last_ms: int = 1500,
                   max_frames: int = MAX_ANIMATION_FRAMES) -> Path | None:
    """The trajectory as an animated GIF (loops forever; the last frame is held), or None without frames.

    One frame per step; a job of more than `max_frames` steps (many batches) is thinned
    evenly, keeping the last frame.
    """
    if not frames:
        return None
    if len(frames) > max_frames:
        keep = sorted({round(i * (len(frames) - 1) / (max_frames - 1)) for i in range(max_frames)})
        frames = [frames[i] for i in keep]
    last = frame_image(frames[-1])
    size = last.size
    images = [im if im.size == size else im.resize(size) for im in (frame_image(f) for f in frames[:-1])] + [last]
    durations = [frame_ms] * (len(images) - 1) + [hold_last_ms]
    path = Path(path)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0,
                   optimize=False, disposal=1)
    return path
