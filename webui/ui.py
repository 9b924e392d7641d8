"""The Gradio page: AUTOMATIC1111's layout and element ids, with step-by-step previews of each branch.

The page is split by job: `ui_job_tab` lays out a job tab (txt2img; img2img has the same
controls plus its images), `ui_generate` runs a tab's job through the one job layer
(webui/jobs.py) and streams it, `ui_inspector` shows its trajectory and runs Compare,
`ui_pnginfo` reads images back. This module puts them on one page. The only state shared
between browser sessions is the session registry (`SessionJobs`, so Interrupt stops the
presser's job only) and each session's last job for its inspector (`SessionInspections`).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from modules.errors import UserError
from webui import inspector
from webui.context import WebUIContext
from webui.ui_common import CSS, SessionJobs, checkpoint_titles, current_title, session_key
from webui.ui_generate import page_job, wire_job_tab  # noqa: F401  (page_job: the page's door to the job layer)
from webui.ui_img2img import wire_result_buttons
from webui.ui_job_tab import build_job_tab
from webui.ui_pnginfo import build_pnginfo_tab
from webui import ui_settings

JOB_TABS = ("txt2img", "img2img")


def create_ui(ctx: WebUIContext) -> gr.Blocks:
    sessions = SessionJobs()
    inspections = inspector.SessionInspections()  # each session's last job, for the trajectory inspector
    # A job's files (step previews, results, animation) go straight into Gradio's cache folder,
    # which Gradio serves as is: streaming the gallery then costs no hashing or copying.
    work_root = Path(gr.utils.get_upload_folder()) / "sdneg-jobs"
    work_root.mkdir(parents=True, exist_ok=True)

    with gr.Blocks(title="Stable Diffusion - negative prompts", delete_cache=(3600, 86400)) as demo:
        gr.HTML(f"<style>{CSS}</style>", padding=False, elem_id="sdneg_css")
        with gr.Row():
            checkpoint = gr.Dropdown(choices=checkpoint_titles(ctx), value=lambda: current_title(ctx),
                                     label="Stable Diffusion checkpoint", elem_id="setting_sd_model_checkpoint",
                                     scale=4)
            refresh = gr.Button("↻", elem_id="refresh_sd_model_checkpoint", elem_classes="sdneg-tool", scale=0)
            quicksettings = ui_settings.build_quicksettings(ctx)  # the VAE and Clip skip, as A1111's quicksettings
        job_tabs = {}
        with gr.Tabs(elem_id="tabs") as tabs:
            for kind in JOB_TABS:
                with gr.Tab(kind, id=kind, elem_id=f"tab_{kind}"):
                    job_tabs[kind] = build_job_tab(ctx, kind)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                build_pnginfo_tab(tabs, job_tabs)
            if getattr(ctx, "backend", None) is not None:  # --workers / --ray-address
                from webui.ui_workers import build_workers_tab

                with gr.Tab("Workers", id="workers", elem_id="tab_workers"):
                    build_workers_tab(ctx)
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                settings_tab = ui_settings.build_settings_tab(ctx)
        ui_settings.wire_settings_tab(ctx, settings_tab)
        ui_settings.wire_quicksettings(ctx, quicksettings)
        for tab in job_tabs.values():
            wire_job_tab(ctx, tab, sessions, inspections, work_root)
        wire_result_buttons(tabs, job_tabs)  # "Send to img2img" / "Send to inpaint" under the results

        def session_ended(request: gr.Request):
            sessions.close(session_key(request))
            inspections.close(session_key(request))

        demo.unload(session_ended)

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
        refresh.click(lambda: gr.update(choices=checkpoint_titles(ctx, refresh=True), value=current_title(ctx)),
                      None, checkpoint)
    demo.sdneg_fields = dict(job_tabs["txt2img"].fields)  # the job's controls by field name (tests: page == API)
    demo.sdneg_tabs = job_tabs
    return demo
