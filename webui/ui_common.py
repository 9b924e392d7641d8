"""What every part of the page shares: its CSS, the progress bar, the session registry, small renderers.

Nothing here holds a job or a model: the session registry (`SessionJobs`) maps a browser
session to its running job, so Interrupt stops that job and no other.
"""
from __future__ import annotations

import html
import logging
import shutil
import threading
import time
from pathlib import Path

import gradio as gr

from modules import sd_samplers
from modules.job_state import JobState
from webui import previews

log = logging.getLogger("webui")

FIRST_PASS, HIRES_PASS = "First pass", "Hires fix"  # the hires fix's passes, as the progress line names them
UPDATE_INTERVAL = 0.25  # seconds between streamed updates while a job runs
CLEANUP_DELAY = 30.0  # seconds between a session's end and the deletion of its files

CSS = """
.sdneg-token-counter { align-self: flex-end; width: auto !important;
  min-height: 0 !important; margin-top: calc(-1.9em - var(--layout-gap, 12px)) !important; margin-right: 1.2em;
  font-size: 0.85em; opacity: 0.75; z-index: 5; pointer-events: none; background: transparent !important;
  border: none !important; box-shadow: none !important; padding: 0 !important; }
.sdneg-progress { position: relative; height: 1.6em; border-radius: 4px; background: var(--block-background-fill, #eee);
  border: 1px solid var(--border-color-primary, #ccc); overflow: hidden; }
.sdneg-progress-bar { position: absolute; left: 0; top: 0; bottom: 0; background: var(--color-accent, #f97316);
  opacity: 0.55; transition: width 0.2s; }
.sdneg-progress-text { position: relative; padding: 0 8px; line-height: 1.6em; font-size: 0.9em; }
.sdneg-error { color: var(--error-text-color, #b91c1c); font-weight: 600; white-space: pre-wrap; }
.sdneg-infotext { font-family: var(--font-mono, monospace); font-size: 0.85em; white-space: pre-wrap;
  word-break: break-word; }
.sdneg-generate { min-height: 3em; }
.sdneg-warnings { color: var(--color-accent, #b45309); font-size: 0.9em; }
.sdneg-warnings ul { margin: 0.2em 0 0 1.2em; padding: 0; }
.sdneg-tool { max-width: 3em; min-width: 3em !important; }
/* the result: every image whole, at any aspect ratio, never wider than its column */
.sdneg-result .grid-wrap { height: auto !important; max-height: none !important; }
.sdneg-result .grid-container { grid-template-columns: repeat(auto-fit, minmax(min(100%, 200px), 1fr)) !important; }
.sdneg-result .thumbnail-item { aspect-ratio: auto !important; height: auto !important; }
.sdneg-result .thumbnail-item img { width: 100% !important; height: auto !important; max-height: 60vh !important;
  object-fit: contain !important; }
/* the page holds at narrow widths: columns wrap instead of running off the right edge */
.sdneg-wrap { flex-wrap: wrap !important; }
.sdneg-wrap > .column { min-width: min(100%, 340px) !important; }
.sdneg-views > * { min-width: min(100%, 150px) !important; }
/* galleries of many small pictures: as many columns as fit, never wider than the gallery */
.sdneg-steps .grid-container { grid-template-columns: repeat(auto-fill, minmax(88px, 1fr)) !important; }
.sdneg-steps .thumbnail-item { min-width: 0 !important; max-width: 100% !important; }
.sdneg-views label span, .sdneg-views .label-wrap span { white-space: nowrap; overflow: visible; }
"""


class SessionJobs:
    """The running job of each browser session, so Interrupt stops the presser's job only."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: dict[str, JobState] = {}
        self._dirs: dict[str, Path] = {}

    def start(self, key: str, state: JobState, job_dir: Path | None = None) -> bool:
        """Register the session's new job; False if it already has one queued or running.

        A job with a `job_dir` replaces the session's files; one without (Compare, which reruns
        the last result beside it) leaves them.
        """
        with self._lock:
            if key in self._jobs:
                return False
            self._jobs[key] = state
            old = self._dirs.get(key) if job_dir is not None else None
            if job_dir is not None:
                self._dirs[key] = job_dir
        if old is not None and old != job_dir:  # a session's page shows only its last job: its older files can go
            shutil.rmtree(old, ignore_errors=True)
        return True

    def finish(self, key: str, state: JobState) -> None:
        with self._lock:
            if self._jobs.get(key) is state:
                del self._jobs[key]

    def close(self, key: str) -> None:
        """The session ended (tab closed or reloaded): stop its job and delete its files."""
        self.interrupt(key)
        with self._lock:
            old = self._dirs.pop(key, None)
        if old is not None:  # a little later: the closing page may still be fetching thumbnails
            timer = threading.Timer(CLEANUP_DELAY, shutil.rmtree, args=(old,), kwargs={"ignore_errors": True})
            timer.daemon = True
            timer.start()

    def interrupt(self, key: str) -> bool:
        with self._lock:
            state = self._jobs.get(key)
        if state is None:
            return False
        state.interrupt()
        return True


def session_key(request: gr.Request | None) -> str:
    if request is None:
        return "anonymous"
    return f"{getattr(request, 'username', None) or ''}/{request.session_hash or id(request)}"


def progress_html(text: str, fraction: float = 0.0, error: bool = False) -> str:
    cls = "sdneg-progress-text sdneg-error" if error else "sdneg-progress-text"
    return (f'<div class="sdneg-progress"><div class="sdneg-progress-bar" style="width: {100 * fraction:.1f}%"></div>'
            f'<span class="{cls}">{html.escape(text)}</span></div>')


def error_html(message: str) -> str:
    return f'<div class="sdneg-error">{html.escape(message)}</div>'


def user_error(what: str, message: str) -> None:
    """A request the engine refused: one line in the server log and a toast on the page (no traceback)."""
    log.warning("%s refused: %s", what, message)
    gr.Warning(message)


def job_progress_text(state: JobState, started: float, passes: int = 1) -> tuple[str, float]:
    """`Step 7/20 · 35% · 2.4 s left` for a running job, or what it waits for.

    With the hires fix (`passes=2`) the line says which pass runs (`First pass`, `Hires fix`) and
    counts batches, not passes (the job state counts each pass, as AUTOMATIC1111's job_count)."""
    if state.interrupted:
        return "Interrupting…", 0.0
    if not state.job:
        return f"Waiting in the queue… {time.time() - started:.0f} s", 0.0
    fraction, eta = state.progress()
    text = f"Step {state.sampling_step}/{state.sampling_steps}"
    info = state.textinfo or ""
    if passes > 1 and HIRES_PASS not in info:
        info = f"{info} · {FIRST_PASS}" if info else FIRST_PASS
    if info:  # a script's own progress, e.g. `X/Y/Z plot: cell 2 of 6`, and the pass
        text = f"{info} · {text}"
    count = max(state.job_count // passes, 1)
    number = min(state.job_no // passes + 1, count)
    if count > 1:
        text += f" · batch {number}/{count}"
    text += f" · {100 * fraction:.0f}%"
    if state.sampling_step:
        text += f" · {eta:.1f} s left"
    return text, fraction


def gallery_interval(n: int) -> float:
    """Seconds between preview-gallery updates: each update sends the whole list, so a long
    trajectory (many batches) is sent less often."""
    return max(UPDATE_INTERVAL, n / 400)


def preview_label(subject: str) -> str:
    what = "combined | prompt | negative, left to right" if subject == previews.SUBJECT_ALL else subject.lower()
    return f"Denoising steps: the predicted final image (pred_x0) at each step — {what}"


def infotext_html(info: str) -> str:
    if not info:
        return ""
    return '<div class="sdneg-infotext">' + html.escape(info) + "</div>"


def warnings_html(comments: str) -> str:
    """A job's warnings (`Processed.comments`, one a line: a missing LoRA, a skipped embedding, an unknown
    style, a styles line that could not be read), under its infotext."""
    lines = [line for line in (comments or "").splitlines() if line.strip()]
    if not lines:
        return ""
    return ('<div class="sdneg-warnings"><b>Warnings</b><ul>'
            + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul></div>")


def current_title(ctx) -> str:
    """AUTOMATIC1111's checkpoint title (`name [shorthash]`) of the loaded model."""
    if getattr(ctx, "checkpoint", None) is not None:
        return ctx.checkpoint.title
    return f"{ctx.model.name} [{ctx.model.shorthash}]" if ctx.model is not None else ""


def checkpoint_titles(ctx, refresh: bool = False) -> list[str]:
    """Every checkpoint that can be picked (as of the last refresh), the loaded one included."""
    infos = ctx.refresh_checkpoints() if refresh else ctx.checkpoints
    titles = [info.title for info in infos]
    current = current_title(ctx)
    return titles if not current or current in titles else [current, *titles]


def scheduler_labels() -> list[str]:
    return [s.label for s in sd_samplers.all_schedulers]


def token_counter(model, text: str, steps: int = 20, positive: bool = True, styles: list[str] | None = None,
                  style_db=None) -> str:
    """`used/available` as AUTOMATIC1111's update_token_counter counts (modules/extra_networks.count_prompt_tokens):
    the selected `styles` applied first when a StyleDatabase is given (what the job will encode), then per AND
    part and per schedule entry (prompt editing, alternation) the largest; `<lora:...>` tags are not tokens;
    BREAK and embeddings count as encoded."""
    from modules import extra_networks

    if model is None:
        return "0/75"
    try:
        steps = max(1, int(steps or 20))
        used, available = extra_networks.count_prompt_tokens(model, text or "", steps, list(styles or []), style_db,
                                                             is_positive=positive)
        return "%d/%d" % (used, available)
    except Exception as e:  # a counter must never break typing
        log.warning("token count failed: %s: %s", type(e).__name__, e)
        return ""


SHOW_ESTIMATE_FROM = 5.0  # seconds: faster jobs need no warning


def estimate_html(ctx, job) -> str:
    """`About 2 min on this server` under Generate when a job will take a while (slow devices, big jobs)."""
    from modules import job_cost

    speed = ctx.known_unet_speed()
    if speed is None or ctx.model is None:
        return ""
    seconds = job.runs // max(job.p.n_iter, 1) * job_cost.estimate_seconds(job.p, ctx.model, speed)
    if seconds < SHOW_ESTIMATE_FROM:
        return ""
    limit = getattr(ctx.args, "max_job_seconds", None)
    over = f" (over this server's limit of {job_cost.describe(limit)})" if limit and seconds > limit else ""
    return f'<div class="sdneg-estimate">About {job_cost.describe(seconds)} on this server{over}</div>'
