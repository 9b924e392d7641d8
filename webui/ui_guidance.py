"""The guidance rules' own controls (Dynamic negative, APG, Dynamic thresholding) in the "Negative guidance" accordion.

Each rule's fields (sd_guidance.RULE_FIELDS) get one control each, in a group shown only while that rule is
picked in the Guidance rule dropdown (as Forge and the sd-dynamic-thresholding extension show a feature's
settings only when it is on). Defaults and ranges are read from modules/sd_guidance.py (RuleParams, RANGES,
DYNTHRES_MODES), so a page job with untouched controls is the API's job with the fields left out, and a value
the page lets through is one the job layer accepts. The controls are plain job fields: the job layer
(webui/jobs.py) carries them like every other control, and a pasted infotext fills them by field name.
"""
from __future__ import annotations

from dataclasses import fields as dataclass_fields

import gradio as gr

from modules import sd_guidance

# field -> (label, slider step; None: a number box, for values too small or too finely placed for a slider's steps)
CONTROLS: dict[str, tuple[str, float | None]] = {
    "dng_scale": ("DNG scale", 0.5),
    "dng_prior": ("DNG prior (the posterior's start)", None),
    "dng_temperature": ("DNG temperature", 0.01),
    "dng_offset": ("DNG offset", None),
    "dng_p_min": ("DNG p min", None),
    "dng_p_max": ("DNG p max", None),
    "nag_follows_dng": ("NAG follows DNG (with NAG on: NAG's scale follows the posterior)", None),
    "apg_eta": ("APG eta (weight of the parallel part)", 0.05),
    "apg_norm_threshold": ("APG norm threshold (0 = no clip)", 0.5),
    "apg_momentum": ("APG momentum (negative = reverse, 0 = none)", 0.05),
    "dynthres_mimic_scale": ("Mimic CFG Scale", 0.5),
    "dynthres_threshold_percentile": ("Top percentile of latents to clamp", 0.001),
    "dynthres_mimic_mode": ("Mimic Scale Scheduler", None),
    "dynthres_mimic_scale_min": ("Minimum value of the Mimic Scale Scheduler", 0.5),
    "dynthres_cfg_mode": ("CFG Scale Scheduler", None),
    "dynthres_cfg_scale_min": ("Minimum value of the CFG Scale Scheduler", 0.5),
    "dynthres_sched_val": ("Scheduler Value (Power, Repeating and Sawtooth schedulers)", 0.01),
}
GROUP_IDS = {"Dynamic negative": "dng", "APG": "apg", "Dynamic thresholding": "dynthres"}
HELP = {
    "Dynamic negative": "**Dynamic negative**: the negative's scale follows the model's own estimate that the "
                        "negative concept is in the image: `DNG scale * p / (1 - p)`, p from the prior, updated "
                        "each step (temperature, offset), kept within p min..p max.",
    "APG": "**APG**: CFG's update split along the prompt's prediction; the parallel part (the one that "
           "oversaturates) weighed by eta, clipped to the norm threshold, with reverse momentum.",
    "Dynamic thresholding": "**Dynamic thresholding**: guide at the CFG scale, keep the value range CFG at the "
                            "mimic scale would give (against burn at high CFG). Mimic = CFG scale is plain CFG.",
}


def default(name: str) -> object:
    """The API's default of a rule field (a job that leaves it out gets this)."""
    return next(f.default for f in dataclass_fields(sd_guidance.RuleParams) if f.name == name)


def build_control(kind: str, name: str) -> gr.components.Component:
    label, step = CONTROLS[name]
    value, elem_id = default(name), f"{kind}_{name}"
    if isinstance(value, bool):
        return gr.Checkbox(value=value, label=label, elem_id=elem_id)
    if name.endswith("_mode"):
        return gr.Dropdown(list(sd_guidance.DYNTHRES_MODES), value=value, label=label, elem_id=elem_id)
    if step is None:  # out-of-range values are the job layer's to refuse, naming the field
        return gr.Number(value=value, label=label, elem_id=elem_id)
    lo, hi = sd_guidance.RANGES[name]
    return gr.Slider(lo, hi, value=value, step=step, label=label, elem_id=elem_id)


def build_rule_controls(kind: str, fields: dict, rule_dropdown: gr.Dropdown) -> dict[str, gr.Group]:
    """One hidden group per rule with fields of its own; the dropdown shows the picked rule's group only."""
    groups: dict[str, gr.Group] = {}
    for rule, names in sd_guidance.RULE_FIELDS.items():
        with gr.Group(visible=rule_dropdown.value == rule, elem_id=f"{kind}_guidance_{GROUP_IDS[rule]}") as group:
            gr.Markdown(HELP[rule])
            for start in range(0, len(names), 3):
                with gr.Row():
                    for name in names[start:start + 3]:
                        fields[name] = build_control(kind, name)
        groups[rule] = group

    def show(rule: str) -> list:
        return [gr.Group(visible=rule == name) for name in groups]

    rule_dropdown.change(show, rule_dropdown, list(groups.values()), queue=False, show_progress="hidden")
    return groups
