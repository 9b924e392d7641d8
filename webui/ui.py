"""The Gradio page: txt2img in AUTOMATIC1111's layout and element ids, with step-by-step previews.

Generate is a generator: the job runs on a worker thread (waiting for the shared queue in
`WebUIContext.txt2img`), and the generator streams the preview gallery and the progress
bar to the page until the job ends. Everything about a job lives in that generator call:
its `JobState`, its `PreviewCollector`, its files; the only thing shared between browser
sessions is `SessionJobs`, which maps a session to its running job so that Interrupt
stops that job and no other.
"""
from __future__ import annotations

import dataclasses
import html
import logging
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, PngImagePlugin

from modules import images as images_module, sd_guidance, sd_samplers
from modules.errors import UserError
from modules.job_state import JobState
from modules.processing import StableDiffusionProcessingTxt2Img
from modules.scripts import XYZ_PLOT, xyz_grid
from webui import compare, inspector, jobs, previews
from webui.context import WebUIContext

log = logging.getLogger(__name__)

UPDATE_INTERVAL = 0.25  # seconds between streamed updates while a job runs
CLEANUP_DELAY = 30.0  # seconds between a session's end and the deletion of its files


def gallery_interval(n: int) -> float:
    """Seconds between preview-gallery updates: each update sends the whole list, so a long
    trajectory (many batches) is sent less often."""
    return max(UPDATE_INTERVAL, n / 400)

CSS = """
#txt2img_token_counter, #txt2img_negative_token_counter { align-self: flex-end; width: auto !important;
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
#txt2img_generate, #txt2img_interrupt { min-height: 3em; }
.sdneg-tool { max-width: 3em; min-width: 3em !important; }
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


def job_progress_text(state: JobState, started: float) -> tuple[str, float]:
    """`Step 7/20 · 35% · 2.4 s left` for a running job, or what it waits for."""
    if state.interrupted:
        return "Interrupting…", 0.0
    if not state.job:
        return f"Waiting in the queue… {time.time() - started:.0f} s", 0.0
    fraction, eta = state.progress()
    text = f"Step {state.sampling_step}/{state.sampling_steps}"
    if state.textinfo:  # a script's own progress, e.g. `X/Y/Z plot: cell 2 of 6`
        text = f"{state.textinfo} · {text}"
    if state.job_count > 1:
        text += f" · batch {min(state.job_no + 1, state.job_count)}/{state.job_count}"
    text += f" · {100 * fraction:.0f}%"
    if state.sampling_step:
        text += f" · {eta:.1f} s left"
    return text, fraction


def preview_label(subject: str) -> str:
    what = "combined | prompt | negative, left to right" if subject == previews.SUBJECT_ALL else subject.lower()
    return f"Denoising steps: the predicted final image (pred_x0) at each step — {what}"


def infotext_html(info: str) -> str:
    if not info:
        return ""
    return '<div class="sdneg-infotext">' + html.escape(info) + "</div>"


def page_job(ctx: WebUIContext, values: dict[str, Any], kind: str = "txt2img") -> jobs.Job:
    """The page's inputs -> the job, through the same job layer as the API."""
    if ctx.model is None:
        raise UserError("No model is loaded: pick a checkpoint")
    return jobs.make_job(kind, jobs.page_request(values, ctx.options), ctx)


def current_title(ctx: WebUIContext) -> str:
    """AUTOMATIC1111's checkpoint title (`name [shorthash]`) of the loaded model."""
    if getattr(ctx, "checkpoint", None) is not None:
        return ctx.checkpoint.title
    return f"{ctx.model.name} [{ctx.model.shorthash}]" if ctx.model is not None else ""


def checkpoint_titles(ctx: WebUIContext, refresh: bool = False) -> list[str]:
    """Every checkpoint that can be picked (as of the last refresh), the loaded one included."""
    infos = ctx.refresh_checkpoints() if refresh else ctx.checkpoints
    titles = [info.title for info in infos]
    current = current_title(ctx)
    return titles if not current or current in titles else [current, *titles]


def scheduler_names() -> list[str]:
    """Schedule types, once the sampler registry has them (AUTOMATIC1111's `sd_schedulers`)."""
    for name in ("all_schedulers", "schedulers"):
        items = getattr(sd_samplers, name, None)
        if items:
            return [getattr(s, "label", None) or getattr(s, "name", None) or str(s) for s in items]
    return []


NEGATIVE_GUIDANCE_HELP = """\
**CFG**: the negative prompt is the unconditional branch. **Perp-Neg**: only the part of the negative that is
*not* along the prompt acts, so a negative sharing a concept with the prompt (`red` against `a red square`) does not
remove it (per channel / per pixel: the projection taken per latent channel or spatial position).
**Negative weight**: 0 = no negative, 1 = as written, >1 stronger. **Negative start/end**: the fraction of the steps
in which the negative acts (late negatives keep the composition). **Guidance interval**: guidance only in this part
of the steps, scale 1 elsewhere. **CFG rescale**: tames the over-saturation of high CFG. **NGMS**: skip the negative
pass on odd steps once the noise level falls below this sigma (faster)."""


def create_ui(ctx: WebUIContext) -> gr.Blocks:
    sessions = SessionJobs()
    inspections = inspector.SessionInspections()  # each session's last job, for the trajectory inspector
    # A job's files (step previews, results, animation) go straight into Gradio's cache folder,
    # which Gradio serves as is: streaming the gallery then costs no hashing or copying.
    work_root = Path(gr.utils.get_upload_folder()) / "sdneg-jobs"
    work_root.mkdir(parents=True, exist_ok=True)
    outdir = str(getattr(ctx.args, "outdir_samples", "outputs/txt2img-images"))

    def default_size() -> int:
        return ctx.model.default_size if ctx.model is not None else 512

    def token_counter(text: str) -> str:
        if ctx.model is None or not text:
            return "0/75"
        try:
            used, available = ctx.model.cond_stage.count_tokens(text)
        except Exception:  # a counter must never break typing
            log.exception("token count failed")
            return ""
        return f"{used}/{available}"

    sampler_names = [s.name for s in sd_samplers.all_samplers]
    default_sampler = "DDIM" if "DDIM" in sampler_names else sampler_names[0]  # the reference sampler
    schedulers = scheduler_names()

    with gr.Blocks(title="Stable Diffusion - negative prompts", delete_cache=(3600, 86400)) as demo:
        gr.HTML(f"<style>{CSS}</style>", padding=False, elem_id="sdneg_css")
        with gr.Row():
            checkpoint = gr.Dropdown(choices=checkpoint_titles(ctx), value=lambda: current_title(ctx),
                                     label="Stable Diffusion checkpoint", elem_id="setting_sd_model_checkpoint",
                                     scale=4)
            refresh_checkpoints = gr.Button("↻", elem_id="refresh_sd_model_checkpoint", elem_classes="sdneg-tool",
                                            scale=0)

        # Inputs of the job, by their StableDiffusionProcessingTxt2Img field names: the p is built from this dict.
        fields: dict[str, gr.components.Component] = {}
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                with gr.Row(elem_id="txt2img_toprow"):
                    with gr.Column(scale=6):
                        fields["prompt"] = gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=3,
                                                      placeholder="Prompt (Shift+Enter to generate)")
                        prompt_tokens = gr.HTML("0/75", elem_id="txt2img_token_counter", padding=False)
                        fields["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id="txt2img_neg_prompt",
                                                               lines=2, placeholder="Negative prompt")
                        negative_tokens = gr.HTML("0/75", elem_id="txt2img_negative_token_counter", padding=False)
                        with gr.Accordion("Negative guidance", open=False, elem_id="txt2img_negative_guidance"):
                            gr.Markdown(NEGATIVE_GUIDANCE_HELP)
                            with gr.Row():
                                fields["guidance"] = gr.Dropdown(
                                    [r.name for r in sd_guidance.guidance_rules], value="CFG", label="Guidance rule",
                                    elem_id="txt2img_guidance")
                                fields["negative_weight"] = gr.Slider(0, 5, value=1, step=0.05, label="Negative weight",
                                                                      elem_id="txt2img_negative_weight")
                            with gr.Row():
                                fields["negative_start"] = gr.Slider(0, 1, value=0, step=0.05, label="Negative start",
                                                                     elem_id="txt2img_negative_start")
                                fields["negative_end"] = gr.Slider(0, 1, value=1, step=0.05, label="Negative end",
                                                                   elem_id="txt2img_negative_end")
                            with gr.Row():
                                fields["guidance_interval[0]"] = gr.Slider(
                                    0, 1, value=0, step=0.05, label="Guidance interval from",
                                    elem_id="txt2img_guidance_interval_low")
                                fields["guidance_interval[1]"] = gr.Slider(
                                    0, 1, value=1, step=0.05, label="Guidance interval to",
                                    elem_id="txt2img_guidance_interval_high")
                            with gr.Row():
                                fields["cfg_rescale"] = gr.Slider(0, 1, value=0, step=0.05, label="CFG rescale",
                                                                  elem_id="txt2img_cfg_rescale")
                                fields["s_min_uncond"] = gr.Slider(0, 15, value=lambda: ctx.options.get("s_min_uncond") or 0, step=0.1,
                                                                   label="Negative Guidance minimum sigma (NGMS)",
                                                                   elem_id="txt2img_s_min_uncond")
                    with gr.Column(scale=1, min_width=160):
                        generate_button = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
                        interrupt_button = gr.Button("Interrupt", elem_id="txt2img_interrupt")

                with gr.Row():
                    with gr.Column(scale=1, elem_id="txt2img_settings"):
                        with gr.Row():
                            fields["sampler_name"] = gr.Dropdown(sampler_names, value=default_sampler,
                                                                 label="Sampling method", elem_id="txt2img_sampling")
                            if schedulers:
                                fields["scheduler"] = gr.Dropdown(schedulers, value=schedulers[0],
                                                                  label="Schedule type", elem_id="txt2img_scheduler")
                        fields["steps"] = gr.Slider(1, 150, value=20, step=1, label="Sampling steps",
                                                    elem_id="txt2img_steps")
                        with gr.Row():
                            with gr.Column(scale=3):
                                fields["width"] = gr.Slider(64, 2048, value=default_size, step=8, label="Width",
                                                            elem_id="txt2img_width")
                                fields["height"] = gr.Slider(64, 2048, value=default_size, step=8, label="Height",
                                                             elem_id="txt2img_height")
                            with gr.Column(scale=1, min_width=120):
                                fields["n_iter"] = gr.Slider(1, 100, value=1, step=1, label="Batch count",
                                                             elem_id="txt2img_batch_count")
                                fields["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size",
                                                                 elem_id="txt2img_batch_size")
                        fields["cfg_scale"] = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale",
                                                        elem_id="txt2img_cfg_scale")
                        with gr.Row():
                            fields["seed"] = gr.Number(value=-1, precision=0, label="Seed", elem_id="txt2img_seed",
                                                       scale=4)
                            random_seed = gr.Button("⚄", elem_id="txt2img_random_seed", elem_classes="sdneg-tool",
                                                    scale=0)
                            reuse_seed = gr.Button("♻", elem_id="txt2img_reuse_seed", elem_classes="sdneg-tool",
                                                   scale=0)
                        with gr.Accordion("Live previews", open=True, elem_id="txt2img_preview_settings"):
                            preview_subject = gr.Radio(previews.SUBJECTS, value=previews.SUBJECT_COMBINED,
                                                       label="Preview shows the pred_x0 of",
                                                       elem_id="txt2img_preview_subject")
                            preview_method = gr.Radio(previews.METHODS, value=previews.METHOD_CHEAP,
                                                      label="Preview method (Approx cheap: linear latent->RGB, "
                                                            "no VAE; Full: VAE decode every step, slower)",
                                                      elem_id="txt2img_preview_method")
                        # ---- Script (AUTOMATIC1111's dropdown): the X/Y/Z plot (modules/scripts/xyz_grid.py) ----
                        fields["script_name"] = gr.Dropdown(["None", XYZ_PLOT], value="None", label="Script",
                                                            elem_id="script_list")
                        with gr.Group(visible=False, elem_id="script_txt2img_xyz_plot") as xyz_group:
                            for axis, default_type in (("x", "CFG Scale"), ("y", "Negative prompt"),
                                                       ("z", "Nothing")):
                                with gr.Row():
                                    fields[f"xyz_{axis}_type"] = gr.Dropdown(
                                        xyz_grid.AXIS_NAMES, value=default_type, label=f"{axis.upper()} type",
                                        elem_id=f"script_txt2img_xyz_plot_{axis}_type", scale=1)
                                    fields[f"xyz_{axis}_values"] = gr.Textbox(
                                        label=f"{axis.upper()} values", lines=1, scale=3,
                                        elem_id=f"script_txt2img_xyz_plot_{axis}_values",
                                        placeholder='e.g. 3, 7  ·  1-5 (+2)  ·  1-10 [4]  ·  "", red, "blue, green"')
                            with gr.Row():
                                fields["xyz_draw_legend"] = gr.Checkbox(
                                    value=True, label="Draw legend", elem_id="script_txt2img_xyz_plot_draw_legend")
                                fields["xyz_include_lone_images"] = gr.Checkbox(
                                    value=True, label="Include Sub Images",
                                    elem_id="script_txt2img_xyz_plot_include_lone_images")
                                fields["xyz_include_sub_grids"] = gr.Checkbox(
                                    value=False, label="Include Sub Grids",
                                    elem_id="script_txt2img_xyz_plot_include_sub_grids")
                                fields["xyz_no_fixed_seeds"] = gr.Checkbox(
                                    value=False, label="Keep -1 for seeds",
                                    elem_id="script_txt2img_xyz_plot_no_fixed_seeds")
                            fields["xyz_margin_size"] = gr.Slider(0, 500, value=0, step=2, label="Grid margins (px)",
                                                                  elem_id="script_txt2img_xyz_plot_margin_size")
                        fields["script_name"].change(lambda name: gr.update(visible=name == XYZ_PLOT),
                                                     fields["script_name"], xyz_group, queue=False,
                                                     show_progress="hidden")

                    with gr.Column(scale=1, elem_id="txt2img_results"):
                        progress = gr.HTML(progress_html("Idle"), elem_id="txt2img_progress", padding=False)
                        preview_gallery = gr.Gallery(label=preview_label(previews.SUBJECT_COMBINED),
                                                     elem_id="txt2img_preview_gallery", columns=5, height=300,
                                                     format="png", object_fit="contain", interactive=False)
                        gallery = gr.Gallery(label="Output", elem_id="txt2img_gallery", columns=4, height=320,
                                             format="png", object_fit="contain", interactive=False)
                        trajectory = gr.DownloadButton("Download the trajectory (animated GIF)", visible=False,
                                                       elem_id="txt2img_trajectory_download")
                        info = gr.HTML(elem_id="html_info_txt2img")
                        # ---- compare without negative (webui/compare.py) ----
                        with gr.Row(elem_id="txt2img_compare_row", equal_height=True):
                            compare_mode = gr.Dropdown(compare.compare_modes(), value=compare.WITHOUT_NEGATIVE,
                                                       label="Compare this result with the same seeds and settings…",
                                                       elem_id="txt2img_compare_mode", scale=3)
                            compare_button = gr.Button("Compare", elem_id="txt2img_compare", scale=1)
                        compare_gallery = gr.Gallery(label="Comparison", elem_id="txt2img_compare_gallery", columns=3,
                                                     height=260, format="png", object_fit="contain",
                                                     interactive=False)
                        compare_info = gr.HTML(elem_id="txt2img_compare_info")
                        # ---- trajectory inspector (webui/inspector.py) ----
                        with gr.Accordion("Trajectory inspector", open=True, elem_id="txt2img_inspector"):
                            inspector_step = gr.Slider(1, 2, value=1, step=1, label="Step",
                                                       elem_id="txt2img_inspector_step")
                            inspector_info = gr.HTML(inspector.inspector_html(None, None),
                                                     elem_id="txt2img_inspector_info")
                            with gr.Row(elem_id="txt2img_inspector_views"):
                                inspector_views = [gr.Image(label=inspector.VIEW_LABELS[name], type="pil", format="png",
                                                            interactive=False, min_width=100, height=200,
                                                            buttons=["download"], elem_id=f"txt2img_inspector_{name}")
                                                   for name in inspector.VIEWS]
                            inspector_plot = gr.Image(label="How strongly guidance acted, per step", type="pil",
                                                      format="png", interactive=False, buttons=["download"],
                                                      show_label=False, height=260, elem_id="txt2img_inspector_plot")

            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                with gr.Row():
                    with gr.Column():
                        png_image = gr.Image(label="Source", type="filepath", image_mode=None, sources=["upload"],
                                             elem_id="pnginfo_image", height=360)
                    with gr.Column():
                        png_html = gr.HTML(elem_id="pnginfo_html")
                        png_parameters = gr.State("")
                        send_to_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_to_txt2img")

        last_job = gr.State({"seeds": [], "infotexts": []})  # per session: the last results, for seed reuse
        selected = gr.State(0)
        field_names = list(fields)
        field_components = [fields[n] for n in field_names]

        # ---- generation ----------------------------------------------------------------------------
        def generate(request: gr.Request, *args):
            subject, method, *values = args
            values = dict(zip(field_names, values))
            try:
                job = page_job(ctx, values)
                p = job.p
                collector = previews.PreviewCollector(lambda: getattr(ctx, "current_model", None) or ctx.model, subject, method, (p.width, p.height),
                                                      batch_count=job.runs)
                recorder = inspector.TrajectoryRecorder(job.runs,
                                                        model=lambda: getattr(ctx, "current_model", None) or ctx.model)
                inspected = collector.inspected = inspector.InspectedJob(  # the trajectory, for the inspector
                    p, recorder, lambda: recorder.model or ctx.model,
                    script=job.script.name if job.script is not None else None)
            except (UserError, ValueError) as e:
                yield {progress: progress_html(str(e), error=True)}
                raise gr.Error(str(e))
            key = session_key(request)
            state = JobState()
            job_dir = work_root / uuid.uuid4().hex
            if not sessions.start(key, state, job_dir):
                message = "Your previous job is still running: wait for it or interrupt it"
                gr.Warning(message)
                return
            job_dir.mkdir(parents=True)
            result: dict[str, Any] = {}
            inspections.put(key, inspected)

            def work():
                try:
                    result["processed"] = inspected.processed = jobs.run_job(
                        ctx, job, state, hooks=[collector, inspected.recorder])
                except BaseException as e:  # reported on the page below
                    result["error"] = e

            started = time.time()
            worker = threading.Thread(target=work, name="txt2img-job", daemon=True)
            worker.start()
            items: list[tuple[str, str]] = []
            try:
                yield {preview_gallery: gr.update(value=[], label=preview_label(subject)), gallery: [], info: "",
                       trajectory: gr.update(visible=False), progress: progress_html("Waiting in the queue…"),
                       generate_button: gr.update(interactive=False)}
                yield from stream_previews(worker, state, collector, job_dir, items, started)
                error = result.get("error")
                if error is None:
                    yield finish(result["processed"], p, state, collector, job_dir, items, started)
                    return
            except Exception as e:  # a bug on this side of the job: say so, keep the page usable
                error = e
            finally:
                if worker.is_alive():  # the page went away or broke: stop the job rather than sample for nobody
                    state.interrupt()
                sessions.finish(key, state)
            if isinstance(error, UserError):
                message = str(error)
            else:
                log.error("txt2img failed", exc_info=error)
                message = f"Generation failed: {type(error).__name__}: {error}"
            yield {preview_gallery: list(items), progress: progress_html(message, error=True),
                   generate_button: gr.update(interactive=True)}
            raise gr.Error(message)

        def stream_previews(worker, state, collector, job_dir, items, started):
            """While the job runs: new step pictures to files, the gallery and progress to the page."""
            last_gallery = 0.0
            while True:
                worker.join(UPDATE_INTERVAL)
                frames = collector.frames()
                new = len(frames) > len(items)
                for i in range(len(items), len(frames)):
                    path = job_dir / f"step-{i:05}.png"
                    collector.store(i, path)
                    items.append((str(path), frames[i].caption))
                if not worker.is_alive():
                    return
                text, fraction = job_progress_text(state, started)
                update = {progress: progress_html(text, fraction)}
                if new and time.time() - last_gallery >= gallery_interval(len(items)):
                    update[preview_gallery], last_gallery = list(items), time.time()
                    update.update(inspector_live(getattr(collector, "inspected", None)))
                yield update

        def finish(processed, p, state, collector, job_dir, items, started) -> dict:
            """The last update: results (PNG files with their infotext), animation, status."""
            outputs = [str(images_module.write_png(job_dir / f"{i:05}-{processed.all_seeds[i]}.png", im, text))
                       for i, (im, text) in enumerate(zip(processed.images, processed.infotexts))]
            animation = previews.save_animation(collector.frames(), job_dir / f"trajectory-{processed.seed}.gif")
            elapsed = time.time() - started
            if processed.interrupted:
                status = f"Interrupted at step {state.sampling_step}/{p.steps} after {elapsed:.1f} s"
            else:
                status = f"Done: {len(outputs)} image(s), {p.steps} steps, {elapsed:.1f} s"
            return {
                preview_gallery: list(items),
                gallery: outputs,
                info: infotext_html(processed.info),
                trajectory: gr.update(value=str(animation), visible=True) if animation else gr.update(visible=False),
                progress: progress_html(status, 0.0 if processed.interrupted else 1.0),
                last_job: {"seeds": processed.all_seeds[:len(outputs)], "infotexts": processed.infotexts},
                selected: 0,
                generate_button: gr.update(interactive=True),
            }

        # ---- trajectory inspector (webui/inspector.py): the session's own last or running job only --------
        inspector_outputs = [*inspector_views, inspector_plot, inspector_info]

        def slider_max(n: int) -> int:
            return max(n, 2)  # a slider needs some range; steps past the last show the last

        def inspector_render(job, index, method) -> list:
            """The four views, the plot and the caption of step `index` (1-based over the whole job)."""
            blank = [None] * (len(inspector_views) + 1)
            if job is None:
                return [*blank, inspector.inspector_html(None, None)]
            records = job.recorder.records()
            if not records:
                return [*blank, inspector.inspector_html(job, None)]
            record = records[min(max(int(index or 1), 1), len(records)) - 1]
            try:
                views, facts = inspector.render_step(job.model(), record,
                                                     "full" if method == previews.METHOD_FULL else "cheap",
                                                     (job.p.width, job.p.height))
                plot = inspector.guidance_plot(records, record)
            except Exception as e:  # a picture must never break the page
                log.exception("inspector failed")
                return [*blank, f'<div class="sdneg-error">Inspector: {html.escape(str(e))}</div>']
            return [*(views[name] for name in inspector.VIEWS), plot, inspector.inspector_html(job, record, facts)]

        def inspector_show(index, method, request: gr.Request):
            return inspector_render(inspections.get(session_key(request)), index, method)

        def inspector_latest(method, request: gr.Request):
            """After a job: the slider on its last step, and that step's views."""
            job = inspections.get(session_key(request))
            n = len(job.recorder) if job is not None else 0
            if job is not None:
                job.follow = True
            return [gr.update(maximum=slider_max(n), value=max(n, 1)), *inspector_render(job, n, method)]

        def inspector_live(job) -> dict:
            """While a job runs: the slider grows with the steps (and follows the newest unless moved back)."""
            n = len(job.recorder) if job is not None else 0
            if not n or not job.live_due(time.time()):
                return {}
            return {inspector_step: gr.update(maximum=slider_max(n), value=n) if job.follow
                    else gr.update(maximum=slider_max(n))}

        def inspector_moved(index, request: gr.Request):
            job = inspections.get(session_key(request))
            if job is not None:
                job.follow = int(index or 0) >= len(job.recorder)

        inspector_step.change(inspector_show, [inspector_step, preview_method], inspector_outputs,
                              show_progress="hidden", trigger_mode="always_last")
        inspector_step.input(inspector_moved, [inspector_step], None, queue=False, show_progress="hidden")
        preview_method.change(inspector_show, [inspector_step, preview_method], inspector_outputs,
                              show_progress="hidden", trigger_mode="always_last")

        # ---- compare without negative (webui/compare.py): rerun the session's last job, one thing changed ----
        def compare_run(mode, request: gr.Request):
            job = inspections.get(session_key(request))
            processed = job.processed if job is not None else None
            if job is not None and job.script:
                message = f"Compare reruns a plain result; your last job ran the {job.script} script"
                yield {compare_info: f'<div class="sdneg-error">{html.escape(message)}</div>'}
                raise gr.Error(message)
            if processed is None or not processed.images:
                message = "Nothing to compare yet: generate first, then Compare reruns that result"
                yield {compare_info: f'<div class="sdneg-error">{html.escape(message)}</div>'}
                raise gr.Error(message)
            try:
                mode = compare.resolve_mode(mode)
                base = dataclasses.replace(job.p, seed=processed.seed, subseed=processed.subseed,
                                           do_not_save_samples=True)
                other_p = compare.variant(base, mode)
            except UserError as e:
                yield {compare_info: f'<div class="sdneg-error">{html.escape(str(e))}</div>'}
                raise gr.Error(str(e))
            label = compare.label_for(mode)
            key, state = session_key(request), JobState()
            if not sessions.start(key, state):  # one job per session; Interrupt stops this one too
                message = "Your previous job is still running: wait for it or interrupt it"
                yield {compare_info: f'<div class="sdneg-error">{html.escape(message)}</div>'}
                raise gr.Error(message)
            try:
                yield {compare_gallery: [], compare_info: progress_html(f"Rerunning {label}…"),
                       compare_button: gr.update(interactive=False)}
                other = jobs.run_job(ctx, jobs.Job("txt2img", other_p), state)
            except UserError as e:
                yield {compare_info: f'<div class="sdneg-error">{html.escape(str(e))}</div>',
                       compare_button: gr.update(interactive=True)}
                raise gr.Error(str(e))
            finally:
                sessions.finish(key, state)
            items, means = [], []
            for i, (a, b) in enumerate(zip(processed.images, other.images)):
                seed = processed.all_seeds[i]
                means.append(compare.mean_difference(a, b))
                items += [(a, f"seed {seed}: as generated"), (b, f"seed {seed}: {label}"),
                          (compare.difference(a, b, amplify=True), f"difference, mean {means[-1]:.1f}/255")]
            summary = (f"Left: your result. Middle: the same seeds and settings {label}. Right: |difference|, "
                       f"stretched to full brightness. Mean difference {sum(means) / len(means):.2f}/255 over "
                       f"{len(means)} image(s).")
            if processed.interrupted or other.interrupted:
                summary += (" Interrupted: an interrupted run's images are its last predictions, not finished images"
                            " (and an interrupted rerun has only the batches it reached).")
            yield {compare_gallery: items, compare_info: f"<div>{html.escape(summary)}</div>",
                   compare_button: gr.update(interactive=True)}

        compare_button.click(compare_run, [compare_mode], [compare_gallery, compare_info, compare_button],
                             show_progress="hidden", concurrency_limit=None)

        generate_outputs = [preview_gallery, gallery, info, trajectory, progress, last_job, selected, generate_button,
                            inspector_step]
        generate_inputs = [preview_subject, preview_method, *field_components]
        for trigger in (generate_button.click, fields["prompt"].submit, fields["negative_prompt"].submit):
            trigger(generate, generate_inputs, generate_outputs, show_progress="hidden", concurrency_limit=None).then(
                inspector_latest, [preview_method], [inspector_step, *inspector_outputs], show_progress="hidden")

        def interrupt(request: gr.Request):
            sessions.interrupt(session_key(request))

        interrupt_button.click(interrupt, None, None, queue=False, show_progress="hidden")

        def session_ended(request: gr.Request):
            sessions.close(session_key(request))
            inspections.close(session_key(request))

        demo.unload(session_ended)

        # ---- results: infotext of the picked image, seed buttons ----------------------------------------
        def pick(job, evt: gr.SelectData):
            index = evt.index if isinstance(evt.index, int) else 0
            texts = job.get("infotexts") or []
            return index, infotext_html(texts[index] if index < len(texts) else "")

        gallery.select(pick, [last_job], [selected, info], show_progress="hidden")
        random_seed.click(lambda: -1, None, fields["seed"], queue=False, show_progress="hidden")

        def reuse(job, index):
            seeds = job.get("seeds") or []
            if not seeds:
                gr.Warning("No image generated yet: nothing to reuse")
                return gr.update()
            return seeds[index if index < len(seeds) else 0]

        reuse_seed.click(reuse, [last_job, selected], fields["seed"], queue=False, show_progress="hidden")

        # ---- token counters ---------------------------------------------------------------------------
        fields["prompt"].change(token_counter, fields["prompt"], prompt_tokens, queue=False, show_progress="hidden")
        fields["negative_prompt"].change(token_counter, fields["negative_prompt"], negative_tokens, queue=False,
                                         show_progress="hidden")

        # ---- checkpoints --------------------------------------------------------------------------------
        def switch_checkpoint(title: str):
            """The checkpoint is the server's, as in AUTOMATIC1111: switching it changes it for everyone,
            after the running job (the switch waits for the queue)."""
            if not title or title == current_title(ctx):
                return gr.update()
            try:
                gr.Info(f"Loading {title}…")
                ctx.load_checkpoint(title)
            except UserError as e:
                gr.Warning(str(e))
            return gr.update(value=current_title(ctx))

        checkpoint.input(switch_checkpoint, checkpoint, checkpoint, concurrency_limit=1)
        refresh_checkpoints.click(lambda: gr.update(choices=checkpoint_titles(ctx, refresh=True),
                                                    value=current_title(ctx)), None, checkpoint)

        # ---- PNG Info -----------------------------------------------------------------------------------
        def read_png_info(path):
            if not path:
                return "", ""
            try:
                with Image.open(path) as im:
                    items = dict(im.info)
            except Exception as e:
                return f'<div class="sdneg-error">Cannot read the image: {html.escape(str(e))}</div>', ""
            parameters = items.pop("parameters", None)
            if parameters is None and not items:
                return "<div>Nothing found in the image.</div>", ""
            parts = []
            if parameters:
                parts.append(f"<p><b>parameters</b></p>{infotext_html(parameters)}")
            for k, v in items.items():
                if isinstance(v, (str, int, float)):
                    parts.append(f"<p><b>{html.escape(str(k))}</b></p><div class='sdneg-infotext'>"
                                 f"{html.escape(str(v))}</div>")
            return "".join(parts), parameters or ""

        png_image.change(read_png_info, png_image, [png_html, png_parameters])

        def send_parameters(text: str):
            if not text:
                gr.Warning("No generation parameters to send")
                return {}
            values = images_module.infotext_to_fields(images_module.parse_generation_parameters(text))
            updates: dict = {tabs: gr.Tabs(selected="txt2img")}
            for name, value in values.items():
                if isinstance(value, (tuple, list)):  # a tuple field shown as one control per element
                    updates.update({fields[f"{name}[{i}]"]: v for i, v in enumerate(value) if f"{name}[{i}]" in fields})
                    continue
                component = fields.get(name)
                if component is None:
                    continue
                if name == "sampler_name":
                    data = sd_samplers.find_sampler_config(value)
                    if data is None:
                        gr.Warning(f"Unknown sampler {value!r}: not changed")
                        continue
                    value = data.name
                updates[component] = value
            return updates

        send_to_txt2img.click(send_parameters, png_parameters, [tabs, *field_components])
    demo.sdneg_fields = dict(fields)  # the job's controls by field name (tests check the page makes the API's job)
    return demo
