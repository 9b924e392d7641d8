"""The trajectory inspector: what each branch predicted at every step, and where and when guidance acted.

A job's trajectory is kept as latents, not pictures: `TrajectoryRecorder` is an after_sample
hook that clones, per step, the guided pred_x0, the prompt branch's and the negative
branch's pred_x0 and the guidance statistics of `StepInfo.stats`. The clone stays on the
model's device until the UI thread asks for the steps (`records()`), which moves them to
the CPU as float32, so the sampling thread never waits for a transfer. Pictures are made on
demand for the one step the user picked (`render_step`), with the cheap latent->RGB
projection by default or the VAE when the page's preview method says "Full".

The "where guidance acted" map is |decode(combined) - decode(prompt branch)| averaged over
RGB: the pixels that guidance (the negative prompt, for CFG, together with the prompt's
extrapolation) moved away from what the prompt alone predicted. It is normalised per step
(its maximum is printed beside it) and blended over the combined image; the per-step plot
of `stats["guidance"]` (the norm of the guided minus the prompt-branch model output, per
image) says *when* it acted.

Each browser session has its own entry in `SessionInspections`, keyed by the same session
key as its jobs, so one user's inspector can never show another's trajectory.
"""
from __future__ import annotations

import html
import io
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from modules import sd_vae_approx
from modules.sd_samplers_common import StepInfo

VIEWS = ("prompt", "negative", "combined", "heatmap")
VIEW_LABELS = {
    "prompt": "Prompt branch",
    "negative": "Negative branch",
    "combined": "Combined guidance",
    "heatmap": "Where guidance acted",
}
MAX_TILE = 256  # long side of one image of the batch in a view
MIN_TILE = 160  # small images (a 64x64 model) are scaled up to this, so the views are readable
MAX_VIEW = 512  # long side of a whole view (all images of the batch)
MAX_TRAJECTORY_BYTES = 512 * 2 ** 20  # per job, on the CPU; the oldest batches go first beyond it
HEAT_FLOOR = 1e-6
LIVE_INTERVAL = 1.0  # seconds between inspector updates while a job runs
HIRES = "hires"  # StepInfo.pass_label of the hires fix's second pass


def pass_prefix(pass_label: str | None) -> str:
    """`Hires fix · ` before the captions of the hires fix's steps (the first pass's read as any job's)."""
    return "Hires fix · " if pass_label == HIRES else ""


@dataclass
class StepRecord:
    """One sampling step of one batch: latents of each branch, the guidance statistics per image."""

    step: int  # 1-based
    steps: int
    batch_no: int  # 1-based
    combined: torch.Tensor  # (N, C, h, w)
    prompt: torch.Tensor | None
    negative: torch.Tensor | None
    stats: dict[str, Any] = field(default_factory=dict)  # name -> (N,) tensor, then list[float] once on the CPU
    on_cpu: bool = False
    seq: int = 0  # 0-based position among all the steps the recorder has seen (kept when older ones are dropped)
    pass_label: str | None = None  # "txt2img", "img2img", or "hires" (the hires fix's second pass)

    def to_cpu(self) -> None:
        if self.on_cpu:
            return
        for name in ("combined", "prompt", "negative"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to("cpu", torch.float32))
        self.stats = {k: [float(v) for v in torch.as_tensor(s).flatten().float().cpu()] for k, s in self.stats.items()}
        self.on_cpu = True

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.combined, self.prompt, self.negative) if t is not None)


class TrajectoryRecorder:
    """An after_sample hook keeping every step's latents (guided, prompt branch, negative branch) and stats.

    It is the one hook of a page job that copies a step's tensors: the step previews
    (webui/previews.py) and the inspector both read its records.
    """

    def __init__(self, batch_count: int = 1, max_bytes: int = MAX_TRAJECTORY_BYTES,
                 model: Callable[[], Any] | None = None):
        """`model` returns the model the job runs on; it is asked once, at the first step (on the
        sampling thread, while that model is the running one), and kept as a weak reference, so a
        checkpoint switched away from later is not held in memory by a trajectory."""
        self.batch_count = batch_count
        self.max_bytes = max_bytes
        self._model_source = model
        self._model_ref: Callable[[], Any] = lambda: None
        self._records: list[StepRecord] = []
        self._lock = threading.Lock()
        self._batch_no = 0
        self._seen = 0
        self.dropped = 0  # records let go to keep the trajectory under max_bytes

    def __call__(self, info: StepInfo) -> None:
        if info.step == 0 and info.pass_label != HIRES:  # the hires pass continues its batch
            self._batch_no += 1
        if self._model_source is not None:
            model, self._model_source = self._model_source(), None
            try:
                self._model_ref = weakref.ref(model)
            except TypeError:  # not weak-referenceable: keep it
                self._model_ref = lambda: model
        prompt, negative = info.branches.get("prompt"), info.branches.get("negative")
        record = StepRecord(
            info.step + 1, info.steps, self._batch_no, info.pred_x0.detach().clone(),
            prompt.detach().clone() if prompt is not None else None,
            negative.detach().clone() if negative is not None else None,
            {k: v.detach().clone() for k, v in (info.stats or {}).items() if isinstance(v, torch.Tensor)},
            pass_label=info.pass_label)
        with self._lock:
            record.seq = self._seen
            self._seen += 1
            self._records.append(record)

    @property
    def model(self):
        """The model the job ran on, or None if unknown or since freed."""
        return self._model_ref()

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def records_since(self, seq: int) -> list[StepRecord]:
        """The records from position `seq` on (moved to the CPU), for a reader that has seen the ones before."""
        return [r for r in self.records() if r.seq >= seq]

    def records(self) -> list[StepRecord]:
        """Every step so far, moved to the CPU (on the calling thread), oldest batches dropped past the cap."""
        with self._lock:
            records = list(self._records)
        for r in records:
            r.to_cpu()
        with self._lock:
            total = sum(r.nbytes() for r in self._records)
            while total > self.max_bytes and len(self._records) > 1:
                first = self._records[0].batch_no
                if all(r.batch_no == first for r in self._records):
                    break
                while self._records and self._records[0].batch_no == first:
                    total -= self._records.pop(0).nbytes()
                    self.dropped += 1
            return list(self._records)


@dataclass
class InspectedJob:
    """A session's last job as the inspector and the compare button need it."""

    p: Any  # StableDiffusionProcessingTxt2Img
    recorder: TrajectoryRecorder
    model: Callable[[], Any]  # the model the job runs on (a getter: the checkpoint may change while it queues)
    processed: Any = None  # Processed, once the job has ended
    script: str | None = None  # the Script the job ran (X/Y/Z plot), None for a plain txt2img
    unstyled: tuple[str, str] | None = None  # the prompts before styles (jobs.Job.unstyled), for Compare
    follow: bool = True  # the slider follows the newest step while the job runs
    last_live: float = 0.0  # when the page was last sent the running job's newest step

    def live_due(self, now: float, interval: float = LIVE_INTERVAL) -> bool:
        """Whether to show the running job's newest step now: at most once per `interval`, since each
        showing renders pictures on the CPU the job samples on."""
        if now - self.last_live < interval:
            return False
        self.last_live = now
        return True


class SessionInspections:
    """Each browser session's last job, by session key; nothing is shared between sessions."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: dict[str, InspectedJob] = {}

    def put(self, key: str, job: InspectedJob) -> None:
        with self._lock:
            self._jobs[key] = job

    def get(self, key: str) -> InspectedJob | None:
        with self._lock:
            return self._jobs.get(key)

    def close(self, key: str) -> None:
        with self._lock:
            self._jobs.pop(key, None)


# ---- pictures -------------------------------------------------------------------------------

def _tile_size(width: int, height: int, n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    max_side = min(MAX_TILE, MAX_VIEW // max(1, cols))
    scale = max(min(MIN_TILE, max_side), min(max(width, height), max_side)) / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _grid(images: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    out = Image.new("RGB", (cols * size[0], rows * size[1]), (128, 128, 128))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * size[0], (i // cols) * size[1]))
    return out


def heat_colors(heat: np.ndarray) -> np.ndarray:
    """(…) values in [0, 1] -> (…, 3) RGB in [0, 1] with matplotlib's `inferno` map."""
    from matplotlib import colormaps

    return colormaps["inferno"](np.clip(heat, 0, 1))[..., :3]


def guidance_heatmap(combined_rgb: torch.Tensor, prompt_rgb: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-pixel |combined - prompt| averaged over RGB, (N, h, w) scaled to [0, 1] by the step's maximum.

    Returns the map and that maximum (in the [-1, 1] RGB units of the decoded images), so a
    map of tiny differences is not mistaken for a strong one.
    """
    diff = (combined_rgb.float() - prompt_rgb.float()).abs().mean(dim=1)
    peak = float(diff.max()) if diff.numel() else 0.0
    return diff / max(peak, HEAT_FLOOR), peak


def blend_heatmap(combined_rgb: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """The heat map coloured and laid over the combined image: (N, 3, h, w) in [-1, 1].

    The colour's opacity grows with the heat, so where guidance did little the image shows through.
    """
    base = (combined_rgb.float().clamp(-1, 1) + 1) / 2  # [0, 1]
    h = heat.float().clamp(0, 1).numpy()
    colors = torch.from_numpy(heat_colors(h)).float().permute(0, 3, 1, 2)  # (N, 3, h, w)
    alpha = torch.from_numpy(0.25 + 0.7 * h).float().unsqueeze(1)
    return (base * (1 - alpha) + colors * alpha) * 2 - 1


def decode(model, latents: torch.Tensor, method: str) -> torch.Tensor:
    """Latents kept on the CPU (float32) -> (N, 3, h, w) RGB in [-1, 1] on the CPU."""
    if method == "full":
        latents = latents.to(model.device, model.dtype)
        with torch.no_grad():
            return sd_vae_approx.latents_to_rgb(model, latents, "full").float().cpu()
    return sd_vae_approx.latents_to_rgb(model, latents.float(), "cheap")


def render_step(model, record: StepRecord, method: str = "cheap",
                image_size: tuple[int, int] | None = None) -> tuple[dict[str, Image.Image], dict]:
    """The four views of one step (each a grid of the batch) and facts about them.

    `method` is "cheap" (linear projection) or "full" (VAE). The negative view is grey where
    the step had no negative pass (scale 1, NGMS).
    """
    n = record.combined.shape[0]
    if image_size is None:
        f = getattr(model, "vae_scale_factor", 8)
        image_size = (record.combined.shape[-1] * f, record.combined.shape[-2] * f)
    size = _tile_size(*image_size, n)
    parts = [record.combined, record.prompt if record.prompt is not None else record.combined]
    if record.negative is not None:
        parts.append(record.negative)
    rgb = decode(model, torch.cat(parts), method)
    combined, prompt = rgb[:n], rgb[n:2 * n]
    heat, peak = guidance_heatmap(combined, prompt)
    views = {
        "combined": _grid(sd_vae_approx.to_pil(combined, size), size),
        "prompt": _grid(sd_vae_approx.to_pil(prompt, size), size),
        "negative": (_grid(sd_vae_approx.to_pil(rgb[2 * n:], size), size) if record.negative is not None
                     else _grid([Image.new("RGB", size, (128, 128, 128))] * n, size)),
        "heatmap": _grid(sd_vae_approx.to_pil(blend_heatmap(combined, heat), size), size),
    }
    return views, {"heat_peak": peak, "negative_computed": record.negative is not None}


STAT_LABELS = {
    "guidance": "guidance acted: |e - e_prompt|",
    "negative_applied": "Perp-Neg: negative applied (perpendicular)",
    "parallel_removed": "Perp-Neg: negative removed (parallel to prompt)",
}


_ANY = object()


def stat_series(records: list[StepRecord], batch_no: int, pass_label=_ANY) -> dict[str, list[tuple[int, float]]]:
    """(step, mean over the batch) of each statistic, for one batch (and one pass) of the job."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.batch_no != batch_no or (pass_label is not _ANY and r.pass_label != pass_label):
            continue
        for name, values in r.stats.items():
            if values:
                series.setdefault(name, []).append((r.step, float(np.mean(values))))
    return series


def guidance_plot(records: list[StepRecord], current: StepRecord | None = None,
                  size: tuple[float, float] = (5.6, 2.4)) -> Image.Image | None:
    """A small line plot of how strongly guidance acted at each step (PNG-ready PIL image)."""
    if not records:
        return None
    from matplotlib.figure import Figure

    batch_no = current.batch_no if current is not None else records[-1].batch_no
    series = stat_series(records, batch_no, current.pass_label if current is not None else records[-1].pass_label)
    steps = current.steps if current is not None else records[-1].steps
    fig = Figure(figsize=size, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name in ("guidance", "negative_applied", "parallel_removed", *sorted(series)):
        points = series.pop(name, None)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.4, label=STAT_LABELS.get(name, name))
    if current is not None:
        ax.axvline(current.step, color="0.4", linestyle="--", linewidth=1)
    ax.set_xlim(0.5, max(steps, 1) + 0.5)
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{pass_prefix(current.pass_label if current is not None else None)}"
                 "How strongly guidance acted, per step", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("norm of model output", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout(pad=0.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def step_caption(record: StepRecord, batch_count: int) -> str:
    """`Step 3/20`, with `· batch 2/4` when the job sampled several batches (a script's cells count too)."""
    text = f"{pass_prefix(record.pass_label)}Step {record.step}/{record.steps}"
    batches = max(batch_count, record.batch_no)
    return text + (f" · batch {record.batch_no}/{batches}" if batches > 1 else "")


def inspector_html(job: InspectedJob | None, record: StepRecord | None, facts: dict | None = None) -> str:
    """One line under the slider: which step, what the stats say, or why nothing is shown."""
    if job is None:
        return '<div class="sdneg-inspector-info">No job yet: generate to inspect its trajectory.</div>'
    if record is None:
        return '<div class="sdneg-inspector-info">Waiting for the first step…</div>'
    parts = [step_caption(record, job.recorder.batch_count)]
    for name in ("guidance", "negative_applied", "parallel_removed"):
        values = record.stats.get(name)
        if values:
            parts.append(f"{STAT_LABELS[name]} = {np.mean(values):.3g}")
    if facts is not None:
        parts.append(f"heat map max |combined - prompt| = {facts['heat_peak']:.3g}")
        if not facts["negative_computed"]:
            parts.append("no negative pass at this step")
    if job.processed is None:
        parts.append("job running")
    return '<div class="sdneg-inspector-info">' + html.escape(" · ".join(parts)) + "</div>"
