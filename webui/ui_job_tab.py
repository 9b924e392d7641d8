"""The layout of a job tab (txt2img, img2img): AUTOMATIC1111's controls and element ids, nothing else.

`build_job_tab(ctx, kind)` is called inside a `gr.Tab` and returns a `JobTab`: the job's
controls keyed by their field names (the page's job is built from this dict by the job
layer, webui/jobs.py), and the components the handlers (webui/ui_generate.py,
webui/ui_inspector.py) read and write. Element ids are `<kind>_<name>`, as AUTOMATIC1111's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from modules import sd_guidance, sd_samplers
from modules.scripts import XYZ_PLOT, xyz_grid
from webui import compare, inspector, previews, ui_hires, ui_img2img
from webui.ui_common import preview_label, progress_html, scheduler_labels
from webui.ui_extra_networks import build_extra_networks
from webui.ui_guidance import build_rule_controls
from webui.ui_styles import build_styles

NEGATIVE_GUIDANCE_HELP = """\
**CFG**: the negative prompt is the unconditional branch. **Perp-Neg**: only the part of the negative that is
*not* along the prompt acts, so a negative sharing a concept with the prompt (`red` against `a red square`) does not
remove it (per channel / per pixel: the projection taken per latent channel or spatial position).
**Negative weight**: 0 = no negative, 1 = as written, >1 stronger. **Negative start/end**: the fraction of the steps
in which the negative acts (late negatives keep the composition). **Guidance interval**: guidance only in this part
of the steps, scale 1 elsewhere. **CFG rescale**: tames the over-saturation of high CFG. **NGMS**: skip the negative
pass on odd steps once the noise level falls below this sigma (faster). **Dynamic negative**, **APG** and
**Dynamic thresholding** show their own settings below when picked."""


@dataclass
class JobTab:
    kind: str
    fields: dict[str, gr.components.Component]  # the job's controls, by field name (`name[i]`, `xyz_<arg>`)
    c: dict[str, Any] = field(default_factory=dict)  # everything else, by role ("generate", "gallery", ...)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["c"][name]
        except KeyError:
            raise AttributeError(name) from None


def build_job_tab(ctx, kind: str) -> JobTab:
    """The controls of one job tab, laid out as AUTOMATIC1111's (prompts on top, settings left, results right)."""
    fields: dict[str, gr.components.Component] = {}
    c: dict[str, Any] = {}
    sampler_names = [s.name for s in sd_samplers.all_samplers]
    default_size = ctx.model.default_size if ctx.model is not None else 512

    with gr.Row(elem_id=f"{kind}_toprow", elem_classes="sdneg-wrap"):
        with gr.Column(scale=6, min_width=320):
            fields["prompt"] = gr.Textbox(label="Prompt", elem_id=f"{kind}_prompt", lines=3,
                                          placeholder="Prompt (Shift+Enter to generate)")
            c["prompt_tokens"] = gr.HTML("0/75", elem_id=f"{kind}_token_counter", padding=False,
                                         elem_classes="sdneg-token-counter")
            fields["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id=f"{kind}_neg_prompt", lines=2,
                                                   placeholder="Negative prompt")
            c["negative_tokens"] = gr.HTML("0/75", elem_id=f"{kind}_negative_token_counter", padding=False,
                                           elem_classes="sdneg-token-counter")
        with gr.Column(scale=1, min_width=160):
            c["generate"] = gr.Button("Generate", variant="primary", elem_id=f"{kind}_generate",
                                      elem_classes="sdneg-generate")
            c["interrupt"] = gr.Button("Interrupt", elem_id=f"{kind}_interrupt", elem_classes="sdneg-generate")
            c["estimate"] = gr.HTML("", elem_id=f"{kind}_estimate", padding=False)
            build_styles(ctx, kind, fields, c)  # the Styles multi-select (a job field) and its buttons
    build_extra_networks(ctx, kind, c)  # the Extra networks cards (Textual Inversion, Lora) under the prompts

    with gr.Row(elem_classes="sdneg-wrap"):
        with gr.Column(scale=1, elem_id=f"{kind}_settings"):
            with gr.Column(visible=kind == "img2img", elem_id=f"{kind}_settings_top") as c["settings_top"]:
                if kind == "img2img":  # its init image (and mask) above the settings
                    ui_img2img.build_image_inputs(ctx, kind, fields, c)
            with gr.Row():
                fields["sampler_name"] = gr.Dropdown(sampler_names, value="DDIM" if "DDIM" in sampler_names
                                                     else sampler_names[0], label="Sampling method",
                                                     elem_id=f"{kind}_sampling")
                fields["scheduler"] = gr.Dropdown(scheduler_labels(), value="Automatic", label="Schedule type",
                                                  elem_id=f"{kind}_scheduler")
            fields["steps"] = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{kind}_steps")
            with gr.Row():
                with gr.Column(scale=3, min_width=160):
                    fields["width"] = gr.Slider(64, 2048, value=default_size, step=8, label="Width",
                                                elem_id=f"{kind}_width")
                    fields["height"] = gr.Slider(64, 2048, value=default_size, step=8, label="Height",
                                                 elem_id=f"{kind}_height")
                with gr.Column(scale=1, min_width=120):
                    fields["n_iter"] = gr.Slider(1, 100, value=1, step=1, label="Batch count",
                                                 elem_id=f"{kind}_batch_count")
                    fields["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size",
                                                     elem_id=f"{kind}_batch_size")
            fields["cfg_scale"] = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id=f"{kind}_cfg_scale")
            with gr.Row():
                fields["seed"] = gr.Number(value=-1, precision=0, label="Seed", elem_id=f"{kind}_seed", scale=4)
                c["random_seed"] = gr.Button("⚄", elem_id=f"{kind}_random_seed", elem_classes="sdneg-tool", scale=0)
                c["reuse_seed"] = gr.Button("♻", elem_id=f"{kind}_reuse_seed", elem_classes="sdneg-tool", scale=0)
            if kind == "txt2img":
                ui_hires.build_hires_accordion(ctx, kind, fields)
            build_guidance_accordion(ctx, kind, fields)  # with the settings, so the results start beside the prompts
            with gr.Accordion("Live previews", open=True, elem_id=f"{kind}_preview_settings"):
                c["preview_subject"] = gr.Radio(previews.SUBJECTS, value=previews.SUBJECT_COMBINED,
                                                label="Preview shows the pred_x0 of", elem_id=f"{kind}_preview_subject")
                c["preview_method"] = gr.Radio(previews.METHODS, value=previews.METHOD_CHEAP,
                                               label="Preview method (Approx cheap: no VAE; Full: VAE decode "
                                                     "every step, slower)", elem_id=f"{kind}_preview_method")
            build_script_controls(kind, fields, c)

        with gr.Column(scale=1, elem_id=f"{kind}_results"):
            build_results(kind, c)
    return JobTab(kind, fields, c)


def build_guidance_accordion(ctx, kind: str, fields: dict) -> None:
    """The "Negative guidance" accordion: the guidance fields of sd_guidance.GuidanceFields."""
    with gr.Accordion("Negative guidance", open=False, elem_id=f"{kind}_negative_guidance"):
        gr.Markdown(NEGATIVE_GUIDANCE_HELP)
        with gr.Row():
            fields["guidance"] = gr.Dropdown([r.name for r in sd_guidance.guidance_rules], value="CFG",
                                             label="Guidance rule", elem_id=f"{kind}_guidance")
            fields["negative_weight"] = gr.Slider(0, 5, value=1, step=0.05, label="Negative weight",
                                                  elem_id=f"{kind}_negative_weight")
        with gr.Row():
            fields["negative_start"] = gr.Slider(0, 1, value=0, step=0.05, label="Negative start",
                                                 elem_id=f"{kind}_negative_start")
            fields["negative_end"] = gr.Slider(0, 1, value=1, step=0.05, label="Negative end",
                                               elem_id=f"{kind}_negative_end")
        with gr.Row():
            fields["guidance_interval[0]"] = gr.Slider(0, 1, value=0, step=0.05, label="Guidance interval from",
                                                       elem_id=f"{kind}_guidance_interval_low")
            fields["guidance_interval[1]"] = gr.Slider(0, 1, value=1, step=0.05, label="Guidance interval to",
                                                       elem_id=f"{kind}_guidance_interval_high")
        with gr.Row():
            fields["cfg_rescale"] = gr.Slider(0, 1, value=0, step=0.05, label="CFG rescale",
                                              elem_id=f"{kind}_cfg_rescale")
            # starts at the option's value when the page loads (the API's default comes from the same option)
            fields["s_min_uncond"] = gr.Slider(0, 15, value=lambda: ctx.options.get("s_min_uncond") or 0, step=0.1,
                                               label="Negative Guidance minimum sigma (NGMS)",
                                               elem_id=f"{kind}_s_min_uncond")
        gr.Markdown("**NAG** (Normalized Attention Guidance): the negative acts inside the cross-attention, so it "
                    "works at CFG 1 (distilled models). Scale 1 = off.")
        with gr.Row():
            fields["nag_scale"] = gr.Slider(1, 20, value=1, step=0.25, label="NAG scale", elem_id=f"{kind}_nag_scale")
            fields["nag_tau"] = gr.Slider(1, 10, value=2.5, step=0.1, label="NAG tau", elem_id=f"{kind}_nag_tau")
            fields["nag_alpha"] = gr.Slider(0, 1, value=0.5, step=0.05, label="NAG alpha",
                                            elem_id=f"{kind}_nag_alpha")
        with gr.Row():
            fields["nag_start"] = gr.Slider(0, 1, value=0, step=0.05, label="NAG start", elem_id=f"{kind}_nag_start")
            fields["nag_end"] = gr.Slider(0, 1, value=1, step=0.05, label="NAG end", elem_id=f"{kind}_nag_end")
        build_rule_controls(kind, fields, fields["guidance"])  # the picked rule's own fields, shown with it
        fields["negative_report"] = gr.Checkbox(value=False, label="After the job: the model's own verdict on whether "
                                                "each image still shows the negative prompt",
                                                elem_id=f"{kind}_negative_report")


def build_script_controls(kind: str, fields: dict, c: dict) -> None:
    """AUTOMATIC1111's Script dropdown and the X/Y/Z plot's controls (modules/scripts/xyz_grid.py)."""
    fields["script_name"] = gr.Dropdown(["None", XYZ_PLOT], value="None", label="Script", elem_id="script_list"
                                        if kind == "txt2img" else f"{kind}_script_list")
    with gr.Group(visible=False, elem_id=f"script_{kind}_xyz_plot") as xyz_group:
        for axis, default_type in (("x", "CFG Scale"), ("y", "Negative prompt"), ("z", "Nothing")):
            with gr.Row():
                fields[f"xyz_{axis}_type"] = gr.Dropdown(xyz_grid.AXIS_NAMES, value=default_type,
                                                         label=f"{axis.upper()} type", scale=1,
                                                         elem_id=f"script_{kind}_xyz_plot_{axis}_type")
                fields[f"xyz_{axis}_values"] = gr.Textbox(
                    label=f"{axis.upper()} values", lines=1, scale=3, elem_id=f"script_{kind}_xyz_plot_{axis}_values",
                    placeholder='e.g. 3, 7  ·  1-5 (+2)  ·  1-10 [4]  ·  "", red, "blue, green"')
        with gr.Row():
            for name, label, default in (("draw_legend", "Draw legend", True),
                                         ("include_lone_images", "Include Sub Images", True),
                                         ("include_sub_grids", "Include Sub Grids", False),
                                         ("no_fixed_seeds", "Keep -1 for seeds", False)):
                fields[f"xyz_{name}"] = gr.Checkbox(value=default, label=label,
                                                    elem_id=f"script_{kind}_xyz_plot_{name}")
        fields["xyz_margin_size"] = gr.Slider(0, 500, value=0, step=2, label="Grid margins (px)",
                                              elem_id=f"script_{kind}_xyz_plot_margin_size")
    fields["script_name"].change(lambda name: gr.update(visible=name == XYZ_PLOT), fields["script_name"], xyz_group,
                                 queue=False, show_progress="hidden")
    c["xyz_group"] = xyz_group


def build_results(kind: str, c: dict) -> None:
    """Progress, the per-step previews, the result and its infotext, Compare, the trajectory inspector."""
    c["progress"] = gr.HTML(progress_html("Idle"), elem_id=f"{kind}_progress", padding=False)
    c["preview_gallery"] = gr.Gallery(label=preview_label(previews.SUBJECT_COMBINED),
                                      elem_id=f"{kind}_preview_gallery", columns=5, height=300, format="png",
                                      object_fit="contain", interactive=False, elem_classes="sdneg-steps")
    # no label over the picture (it would cover an X/Y/Z grid's corner label); every image shown whole
    c["gallery"] = gr.Gallery(label="Output", show_label=False, elem_id=f"{kind}_gallery", columns=4, height="auto",
                              format="png", object_fit="contain", interactive=False, elem_classes="sdneg-result")
    c["trajectory"] = gr.DownloadButton("Download the trajectory (animated GIF)", visible=False,
                                        elem_id=f"{kind}_trajectory_download")
    c["send_buttons"] = ui_img2img.build_send_buttons(kind)
    c["info"] = gr.HTML(elem_id=f"html_info_{kind}")
    with gr.Row(elem_id=f"{kind}_compare_row", equal_height=True):
        c["compare_mode"] = gr.Dropdown(compare.compare_modes(), value=compare.WITHOUT_NEGATIVE,
                                        label="Compare this result with the same seeds and settings…",
                                        elem_id=f"{kind}_compare_mode", scale=3)
        c["compare_button"] = gr.Button("Compare", elem_id=f"{kind}_compare", scale=1)
    c["compare_gallery"] = gr.Gallery(label="Comparison", elem_id=f"{kind}_compare_gallery", columns=3, height=260,
                                      format="png", object_fit="contain", interactive=False, elem_classes="sdneg-steps")
    c["compare_info"] = gr.HTML(elem_id=f"{kind}_compare_info")
    with gr.Accordion("Trajectory inspector", open=True, elem_id=f"{kind}_inspector"):
        c["inspector_step"] = gr.Slider(1, 2, value=1, step=1, label="Step", elem_id=f"{kind}_inspector_step")
        c["inspector_info"] = gr.HTML(inspector.inspector_html(None, None), elem_id=f"{kind}_inspector_info")
        with gr.Row(elem_id=f"{kind}_inspector_views", elem_classes="sdneg-views sdneg-wrap"):
            c["inspector_views"] = [gr.Image(label=inspector.VIEW_LABELS[name], type="pil", format="png",
                                             interactive=False, min_width=150, height=200, buttons=["download"],
                                             elem_id=f"{kind}_inspector_{name}") for name in inspector.VIEWS]
        c["inspector_plot"] = gr.Image(label="How strongly guidance acted, per step", type="pil", format="png",
                                       interactive=False, buttons=["download"], show_label=False, height=260,
                                       elem_id=f"{kind}_inspector_plot")
    c["last_job"] = gr.State({"seeds": [], "infotexts": []})  # per session: the last results, for seed reuse
    c["selected"] = gr.State(0)
