"""The trajectory inspector and Compare of one job tab: the session's own last or running job only.

The pictures are made by webui/inspector.py; this module connects them to the tab's
slider, views and Compare button. While a job runs, `live` renders its newest step into
the views directly (at most once a second, and only while the slider follows the newest
step), so slider, caption, views and plot always show the same step.
"""
from __future__ import annotations

import dataclasses
import html
import time

import gradio as gr

from modules.errors import UserError
from modules.job_state import JobState
from webui import compare, inspector, jobs, previews
from webui.ui_common import error_html, log, progress_html, session_key, user_error


def slider_max(n: int) -> int:
    return max(n, 2)  # a slider needs some range; steps past the last show the last


class InspectorHandlers:
    def __init__(self, ctx, tab, sessions, inspections):
        self.ctx, self.tab, self.sessions, self.inspections = ctx, tab, sessions, inspections

    @property
    def outputs(self) -> list:
        return [*self.tab.inspector_views, self.tab.inspector_plot, self.tab.inspector_info]

    def render(self, job, index, method) -> list:
        """The four views, the plot and the caption of step `index` (1-based over the whole job)."""
        blank = [None] * (len(self.tab.inspector_views) + 1)
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
            return [*blank, error_html(f"Inspector: {e}")]
        return [*(views[name] for name in inspector.VIEWS), plot, inspector.inspector_html(job, record, facts)]

    def show(self, index, method, request: gr.Request):
        return self.render(self.inspections.get(session_key(request)), index, method)

    def latest(self, method, request: gr.Request):
        """After a job: the slider on its last step, and that step's views."""
        job = self.inspections.get(session_key(request))
        n = len(job.recorder) if job is not None else 0
        if job is not None:
            job.follow = True
        return [gr.update(maximum=slider_max(n), value=max(n, 1)), *self.render(job, n, method)]

    def live(self, job, method) -> dict:
        """While a job runs: the slider grows with the steps; when it follows the newest step, the views show it."""
        n = len(job.recorder) if job is not None else 0
        if not n or not job.live_due(time.time()):
            return {}
        if not job.follow:
            return {self.tab.inspector_step: gr.update(maximum=slider_max(n))}
        return {self.tab.inspector_step: gr.update(maximum=slider_max(n), value=n),
                **dict(zip(self.outputs, self.render(job, n, method)))}

    def moved(self, index, request: gr.Request):
        job = self.inspections.get(session_key(request))
        if job is not None:
            job.follow = int(index or 0) >= len(job.recorder)

    def compare(self, mode, request: gr.Request):
        """Rerun the session's last result with the same seeds and settings, one thing changed."""
        t = self.tab
        job = self.inspections.get(session_key(request))
        processed = job.processed if job is not None else None
        if job is not None and job.script:
            message = f"Compare reruns a plain result; your last job ran the {job.script} script"
        elif processed is None or not processed.images:
            message = "Nothing to compare yet: generate first, then Compare reruns that result"
        else:
            message = None
        try:
            if message is None:
                mode = compare.resolve_mode(mode)
                base = dataclasses.replace(job.p, seed=processed.seed, subseed=processed.subseed,
                                           do_not_save_samples=True)
                other_p = compare.variant(base, mode, unstyled=job.unstyled)
        except UserError as e:
            message = str(e)
        if message is not None:
            user_error("compare", message)
            yield {t.compare_info: error_html(message)}
            return
        label = compare.label_for(mode)
        key = session_key(request)
        state = JobState(owner=f"page:{key}")
        if not self.sessions.start(key, state):  # one job per session; Interrupt stops this one too
            message = "Your previous job is still running: wait for it or interrupt it"
            user_error("compare", message)
            yield {t.compare_info: error_html(message)}
            return
        try:
            yield {t.compare_gallery: [], t.compare_info: progress_html(f"Rerunning {label}…"),
                   t.compare_button: gr.update(interactive=False)}
            other = jobs.run_job(self.ctx, jobs.Job(t.kind, other_p), state)
        except UserError as e:
            user_error("compare", str(e))
            yield {t.compare_info: error_html(str(e)), t.compare_button: gr.update(interactive=True)}
            return
        finally:
            self.sessions.finish(key, state)
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
        yield {t.compare_gallery: items, t.compare_info: f"<div>{html.escape(summary)}</div>",
               t.compare_button: gr.update(interactive=True)}

    def wire(self) -> None:
        t = self.tab
        # one queue for both: a slower older view must never land after a newer one
        views = dict(show_progress="hidden", trigger_mode="always_last", concurrency_id=f"{t.kind}_inspector_views",
                     concurrency_limit=1)
        t.inspector_step.change(self.show, [t.inspector_step, t.preview_method], self.outputs, **views)
        t.inspector_step.input(self.moved, [t.inspector_step], None, queue=False, show_progress="hidden")
        t.preview_method.change(self.show, [t.inspector_step, t.preview_method], self.outputs, **views)
        t.compare_button.click(self.compare, [t.compare_mode], [t.compare_gallery, t.compare_info, t.compare_button],
                               show_progress="hidden", concurrency_limit=None)
