"""A job from the page: its inputs -> the job layer -> the queue, streamed back to the page while it runs.

Generate is a generator: the job runs on a worker thread (waiting for the shared queue in
`jobs.run_job`), and the generator streams the preview gallery, the progress bar and the
inspector's newest step to the page until the job ends. Everything about a job lives in
that generator call: its `JobState`, its `TrajectoryRecorder` (the one hook that copies a
step's latents; the previews and the inspector read it), its files.
"""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from modules import images as images_module
from modules.errors import UserError
from modules.job_state import JobState
from webui import inspector, jobs, previews
from webui.ui_common import (UPDATE_INTERVAL, error_html, gallery_interval, infotext_html, job_progress_text, log,
                             preview_label, progress_html, session_key, user_error, warnings_html)
from webui.ui_inspector import InspectorHandlers
from webui.ui_job_tab import JobTab


def page_job(ctx, values: dict[str, Any], kind: str = "txt2img", check_cost: bool = True) -> jobs.Job:
    """The page's inputs -> the job, through the same job layer as the API."""
    if ctx.model is None:
        raise UserError("No model is loaded: pick a checkpoint")
    return jobs.make_job(kind, jobs.page_request(values, ctx.options), ctx, check_cost=check_cost)


def verdict_html(processed) -> str:
    """The negative-prompt verdict of each image (modules/negative_verdict.py), under the result."""
    if not processed.negative_report:
        return ""
    rows = []
    for seed, report in zip(processed.all_seeds, processed.negative_report):
        if report.get("score") is None:
            continue
        rows.append(f"seed {seed}: P(shows “{report['negative']}”) = {report['probability']:.2f} "
                    f"(score {report['score']:+.4f}, {report['unet_evaluations']} UNet evaluations)")
    return ('<div class="sdneg-infotext"><b>Did the negative work?</b> The model as its own judge\n'
            + "\n".join(rows) + "</div>") if rows else ""


def reached(recorder: inspector.TrajectoryRecorder, steps: int) -> str:
    """`step 38/150` (and `· batch 2/4`) of the last step a job completed."""
    records = recorder.records()
    if not records:
        return f"step 0/{steps}"
    last = records[-1]
    return inspector.step_caption(last, recorder.batch_count).replace("Step", "step", 1)


class GenerateHandler:
    """Generate for one job tab: run the page's job, stream it, show the result."""

    def __init__(self, ctx, tab: JobTab, sessions, inspections, views: InspectorHandlers, work_root: Path):
        self.ctx, self.tab, self.sessions, self.inspections = ctx, tab, sessions, inspections
        self.views, self.work_root = views, work_root
        self.field_names = list(tab.fields)

    @property
    def inputs(self) -> list:
        return [self.tab.preview_subject, self.tab.preview_method, *(self.tab.fields[n] for n in self.field_names)]

    @property
    def outputs(self) -> list:
        t = self.tab
        return [t.preview_gallery, t.gallery, t.info, t.trajectory, t.progress, t.last_job, t.selected, t.generate,
                t.inspector_step, *self.views.outputs]

    def model(self):
        return getattr(self.ctx, "current_model", None) or self.ctx.model

    def run(self, request: gr.Request, *args):
        t = self.tab
        subject, method, *values = args
        values = dict(zip(self.field_names, values))
        try:
            job = page_job(self.ctx, values, t.kind)
        except UserError as e:
            user_error(t.kind, str(e))
            yield {t.progress: progress_html(str(e), error=True)}
            return
        p = job.p
        recorder = inspector.TrajectoryRecorder(job.runs, model=self.model)
        collector = previews.PreviewCollector(self.model, subject, method, (p.width, p.height), batch_count=job.runs,
                                              recorder=recorder)
        inspected = inspector.InspectedJob(p, recorder, lambda: recorder.model or self.ctx.model,
                                           script=job.script.name if job.script is not None else None,
                                           unstyled=job.unstyled)
        key = session_key(request)
        state = JobState(owner=f"page:{key}")
        job_dir = self.work_root / uuid.uuid4().hex
        if not self.sessions.start(key, state, job_dir):
            user_error(t.kind, "Your previous job is still running: wait for it or interrupt it")
            return
        job_dir.mkdir(parents=True)
        self.inspections.put(key, inspected)
        result: dict[str, Any] = {}

        def work():
            try:
                result["processed"] = inspected.processed = jobs.run_job(self.ctx, job, state, hooks=[recorder])
            except BaseException as e:  # reported on the page below
                result["error"] = e

        started = time.time()
        worker = threading.Thread(target=work, name=f"{t.kind}-job", daemon=True)
        worker.start()
        items: list[tuple[str, str]] = []
        try:
            yield {t.preview_gallery: gr.update(value=[], label=preview_label(subject)), t.gallery: [], t.info: "",
                   t.trajectory: gr.update(visible=False), t.progress: progress_html("Waiting in the queue…"),
                   t.generate: gr.update(interactive=False)}
            yield from self.stream(worker, state, collector, inspected, job_dir, items, started, method)
            error = result.get("error")
            if error is None:
                yield self.finish(result["processed"], p, recorder, collector, job_dir, items, started)
                return
        except Exception as e:  # a bug on this side of the job: say so, keep the page usable
            error = e
        finally:
            if worker.is_alive():  # the page went away or broke: stop the job rather than sample for nobody
                state.interrupt()
            self.sessions.finish(key, state)
        if isinstance(error, UserError):
            message = str(error)
            user_error(t.kind, message)
        else:
            log.error("%s failed", t.kind, exc_info=error)
            message = f"Generation failed: {type(error).__name__}: {error}"
        yield {t.preview_gallery: list(items), t.progress: progress_html(message, error=True),
               t.generate: gr.update(interactive=True)}

    def stream(self, worker, state, collector, inspected, job_dir, items, started, method):
        """While the job runs: new step pictures to files, the gallery, the progress and the inspector to the page."""
        t = self.tab
        last_gallery = 0.0
        while True:
            worker.join(UPDATE_INTERVAL)
            done = not worker.is_alive()  # before the frames are read: a job that ended has given all of them
            frames = collector.frames()
            new = len(frames) > len(items)
            for i in range(len(items), len(frames)):
                path = job_dir / f"step-{i:05}.png"
                collector.store(i, path)
                items.append((str(path), frames[i].caption))
            if done:
                return
            text, fraction = job_progress_text(state, started, passes=2 if getattr(inspected.p, "enable_hr", False)
                                               else 1)
            update = {t.progress: progress_html(text, fraction)}
            if new and time.time() - last_gallery >= gallery_interval(len(items)):
                update[t.preview_gallery], last_gallery = list(items), time.time()
            update.update(self.views.live(inspected, method))
            yield update

    def finish(self, processed, p, recorder, collector, job_dir, items, started) -> dict:
        """The last update: results (PNG files with their infotext), animation, status."""
        t = self.tab
        outputs = [str(images_module.write_png(job_dir / f"{i:05}-{processed.all_seeds[i]}.png", im, text))
                   for i, (im, text) in enumerate(zip(processed.images, processed.infotexts))]
        animation = previews.save_animation(collector.frames(), job_dir / f"trajectory-{processed.seed}.gif")
        elapsed = time.time() - started
        if processed.interrupted:
            status = f"Interrupted at {reached(recorder, p.steps)} after {elapsed:.1f} s"
        else:
            status = f"Done: {len(outputs)} image(s), {p.steps} steps, {elapsed:.1f} s"
        for line in filter(str.strip, (processed.comments or "").splitlines()):
            gr.Warning(line)  # a LoRA left out, a skipped embedding, an unknown style: said where the user looks
        return {
            t.preview_gallery: list(items),
            t.gallery: outputs,
            t.info: infotext_html(processed.info) + warnings_html(processed.comments) + verdict_html(processed),
            t.trajectory: gr.update(value=str(animation), visible=True) if animation else gr.update(visible=False),
            t.progress: progress_html(status, 0.0 if processed.interrupted else 1.0),
            t.last_job: {"seeds": processed.all_seeds[:len(outputs)], "infotexts": processed.infotexts,
                         "images": outputs},
            t.selected: 0,
            t.generate: gr.update(interactive=True),
        }


def wire_job_tab(ctx, tab: JobTab, sessions, inspections, work_root: Path) -> GenerateHandler:
    """Generate, Interrupt, the inspector, Compare, seeds, token counters and the result's infotext of one tab."""
    views = InspectorHandlers(ctx, tab, sessions, inspections)
    handler = GenerateHandler(ctx, tab, sessions, inspections, views, work_root)
    f = tab.fields
    for trigger in (tab.generate.click, f["prompt"].submit, f["negative_prompt"].submit):
        trigger(handler.run, handler.inputs, handler.outputs, show_progress="hidden", concurrency_limit=None).then(
            views.latest, [tab.preview_method], [tab.inspector_step, *views.outputs], show_progress="hidden")

    def interrupt(request: gr.Request):
        sessions.interrupt(session_key(request))

    tab.interrupt.click(interrupt, None, None, queue=False, show_progress="hidden")
    views.wire()

    def pick(job, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else 0
        texts = job.get("infotexts") or []
        return index, infotext_html(texts[index] if index < len(texts) else "")

    tab.gallery.select(pick, [tab.last_job], [tab.selected, tab.info], show_progress="hidden")
    tab.random_seed.click(lambda: -1, None, f["seed"], queue=False, show_progress="hidden")

    def reuse(job, index):
        seeds = job.get("seeds") or []
        if not seeds:
            gr.Warning("No image generated yet: nothing to reuse")
            return gr.update()
        return seeds[index if index < len(seeds) else 0]

    tab.reuse_seed.click(reuse, [tab.last_job, tab.selected], f["seed"], queue=False, show_progress="hidden")

    from webui.ui_common import estimate_html, token_counter

    def estimate(*values):
        """The job's cost before Generate, from the same job the click would make (nothing if it is invalid)."""
        try:
            job = page_job(ctx, dict(zip(handler.field_names, values)), tab.kind, check_cost=False)
        except UserError:
            return ""
        return estimate_html(ctx, job)

    cost_inputs = [f[n] for n in ("steps", "width", "height", "batch_size", "n_iter", "sampler_name", "guidance",
                                  "cfg_scale") if n in f]
    for control in cost_inputs:
        control.change(estimate, [f[n] for n in handler.field_names], tab.estimate, queue=False,
                       show_progress="hidden", trigger_mode="always_last")

    def count(text, steps, styles, positive):
        """The box's tokens with the selected styles applied (unless the option says not to), as the job encodes it."""
        with_styles = ctx.options.get("include_styles_into_token_counters", True)
        db = getattr(ctx, "styles", None) if with_styles else None
        return token_counter(ctx.model, text, steps, positive, styles, db)

    styles = f.get("styles")
    for box, counter, positive in ((f["prompt"], tab.prompt_tokens, True),
                                   (f["negative_prompt"], tab.negative_tokens, False)):
        gr.on([box.change, *([styles.change] if styles is not None else [])],
              lambda text, steps, chosen=None, positive=positive: count(text, steps, chosen, positive),
              [box, f["steps"], *([styles] if styles is not None else [])], counter, queue=False,
              show_progress="hidden")
    return handler


__all__ = ["GenerateHandler", "error_html", "page_job", "wire_job_tab"]
