"""The txt2img tab's "Hires. fix" accordion: AUTOMATIC1111's controls and element ids, Forge's hires CFG.

As AUTOMATIC1111's InputAccordion, opening the accordion turns the hires fix on and closing it
turns it off (the checkbox inside, `txt2img_hr-checkbox`, is the `enable_hr` field and says
the same). The controls are processing fields by name; the job layer (webui/jobs.py) maps
"Use same sampler" / "Use same scheduler" / a hires CFG of 0 to "as the first pass".
"""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from modules import processing, sd_samplers, upscaler
from webui.jobs import PAGE_SAME
from webui.ui_common import scheduler_labels


def final_resolution(enable: bool, width, height, scale, resize_x, resize_y) -> str:
    """`from 64x64 to 128x128`, AUTOMATIC1111's "Upscaled resolution" beside the accordion's title."""
    if not enable:
        return ""
    try:
        p = SimpleNamespace(width=int(width), height=int(height), hr_scale=float(scale), hr_resize_x=int(resize_x),
                            hr_resize_y=int(resize_y))
        w, h, _, _ = processing.hires_target(p)
    except (TypeError, ValueError, ZeroDivisionError):
        return ""
    return f"<span class='sdneg-hr-final'>from {p.width}x{p.height} to {w}x{h}</span>"


def build_hires_accordion(ctx, kind: str, fields: dict) -> None:
    """The accordion and its fields (`enable_hr`, `hr_upscaler`, ... keyed by their processing names)."""
    sampler_names = [s.name for s in sd_samplers.all_samplers]
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{kind}_hr") as accordion:
        with gr.Row():
            fields["enable_hr"] = gr.Checkbox(value=False, label="Hires. fix (on while this is open)",
                                              elem_id=f"{kind}_hr-checkbox", scale=1)
            final = gr.HTML("", elem_id="txtimg_hr_finalres", padding=False)
        with gr.Row():
            fields["hr_upscaler"] = gr.Dropdown(upscaler.upscaler_names(getattr(ctx, "models_dir", None)),
                                                value=upscaler.LATENT_UPSCALE_DEFAULT, label="Upscaler",
                                                elem_id=f"{kind}_hr_upscaler")
            fields["hr_second_pass_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps",
                                                       info="0: the sampling steps", elem_id=f"{kind}_hires_steps")
            fields["denoising_strength"] = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                                     elem_id=f"{kind}_denoising_strength")
        with gr.Row():
            fields["hr_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id=f"{kind}_hr_scale")
            fields["hr_resize_x"] = gr.Slider(0, 2048, value=0, step=8, label="Resize width to",
                                              elem_id=f"{kind}_hr_resize_x")
            fields["hr_resize_y"] = gr.Slider(0, 2048, value=0, step=8, label="Resize height to",
                                              elem_id=f"{kind}_hr_resize_y")
        with gr.Row():
            fields["hr_sampler_name"] = gr.Dropdown([PAGE_SAME["hr_sampler_name"], *sampler_names],
                                                    value=PAGE_SAME["hr_sampler_name"], label="Hires sampling method",
                                                    elem_id="hr_sampler")
            fields["hr_scheduler"] = gr.Dropdown([PAGE_SAME["hr_scheduler"], *scheduler_labels()],
                                                 value=PAGE_SAME["hr_scheduler"], label="Hires schedule type",
                                                 elem_id="hr_scheduler")
            fields["hr_cfg"] = gr.Slider(0, 30, value=0, step=0.5, label="Hires CFG Scale",
                                         info="0: the CFG scale",
                                         elem_id=f"{kind}_hr_cfg")
        with gr.Row():
            fields["hr_prompt"] = gr.Textbox(label="Hires prompt", elem_id="hires_prompt", lines=2,
                                             placeholder="Prompt for hires fix pass.\nLeave empty to use the same "
                                                         "prompt as in first pass.")
            fields["hr_negative_prompt"] = gr.Textbox(label="Hires negative prompt", elem_id="hires_neg_prompt",
                                                      lines=2, placeholder="Negative prompt for hires fix pass.\n"
                                                      "Leave empty to use the same negative prompt as in first pass.")
    enable = fields["enable_hr"]
    accordion.expand(lambda: True, None, enable, queue=False, show_progress="hidden")
    accordion.collapse(lambda: False, None, enable, queue=False, show_progress="hidden")
    enable.change(lambda on: gr.Accordion(open=on), enable, accordion, queue=False, show_progress="hidden")
    size_inputs = [enable, fields["width"], fields["height"], fields["hr_scale"], fields["hr_resize_x"],
                   fields["hr_resize_y"]]
    for control in size_inputs:
        control.change(final_resolution, size_inputs, final, queue=False, show_progress="hidden")
