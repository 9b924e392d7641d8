"""The Settings tab and the quick settings beside the checkpoint: AUTOMATIC1111's options on the page.

The tab shows the options this engine honours (`modules/options.sections()`), grouped as
AUTOMATIC1111 groups them (categories, then sections by label), one control per option with
its element id `setting_<key>`. "Apply settings" (`settings_submit`) sends the values that
differ from the stored ones through `ctx.set_options`, the same all-or-nothing door the API's
POST /sdapi/v1/options uses: a bad value changes nothing and the result line names its key.
The quick settings (AUTOMATIC1111's `quicksettings_list`: the VAE, Clip skip) sit in the top
row beside the checkpoint and are left out of the tab, as there, so every id is on the page once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from modules import options as options_module
from modules import sd_vae
from modules.errors import UserError

# In the top row, not in the tab (the checkpoint dropdown is webui/ui.py's own).
QUICKSETTINGS = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers")

# The search box filters in the browser: a native input listener (typing, pasting, clearing), installed
# once when the tab mounts, hides the settings (and then the sections) whose label and id do not match.
SEARCH_JS = """
if (!window.sdnegSettingsSearch) {
  window.sdnegSettingsSearch = (box) => {
    const q = (box.value || "").toLowerCase().trim();
    document.querySelectorAll("#tab_settings .sdneg-setting").forEach((el) => {
      const text = (el.innerText + " " + el.id).toLowerCase();
      el.style.display = !q || text.includes(q) ? "" : "none";
    });
    document.querySelectorAll("#tab_settings .sdneg-settings-section").forEach((section) => {
      const shown = [...section.querySelectorAll(".sdneg-setting")].some((el) => el.style.display !== "none");
      section.style.display = shown ? "" : "none";
    });
  };
  document.addEventListener("input", (e) => {
    if (e.target.closest && e.target.closest("#settings_search")) window.sdnegSettingsSearch(e.target);
  });
}
"""


@dataclass
class SettingsTab:
    controls: dict[str, gr.components.Component] = field(default_factory=dict)  # option key -> control
    kinds: dict[str, str] = field(default_factory=dict)
    result: Any = None
    submit: Any = None
    search: Any = None


def vae_choices(ctx) -> list[str]:
    return sd_vae.vae_choices(ctx.vaes or [])


def make_control(ctx, option: dict) -> gr.components.Component:
    """The control AUTOMATIC1111 gives an option of this kind (checkbox, slider, dropdown, number, text)."""
    key, label, kind = option["key"], option["label"], option["kind"]
    value = lambda: page_value(ctx.options.get(key), kind)  # noqa: E731 (the stored value at each page load)
    common = dict(label=label, elem_id=f"setting_{key}", elem_classes="sdneg-setting", interactive=True)
    if kind == "bool":
        return gr.Checkbox(value=value, **common)
    if kind in ("int", "float", "number"):
        lo, hi = option["minimum"], option["maximum"]
        if lo is not None and hi is not None:
            step = 1 if kind == "int" else 0.01
            return gr.Slider(lo, hi, value=value, step=step, **common)
        return gr.Number(value=value, precision=0 if kind == "int" else None, **common)
    if option["choices_from"] == "vaes":
        return gr.Dropdown(choices=vae_choices(ctx), value=value, **common)
    if option["choices"] is not None:
        return gr.Dropdown(choices=list(option["choices"]), value=value, multiselect=kind == "list", **common)
    if kind == "list":
        return gr.Dropdown(choices=[], value=value, multiselect=True, allow_custom_value=True, **common)
    return gr.Textbox(value=value, lines=1, **common)


def page_value(value: Any, kind: str) -> Any:
    """An option's value as its control shows it ("" for a null text)."""
    if kind == "str?" and value is None:
        return ""
    return value


def option_value(value: Any, kind: str) -> Any:
    """A control's value as the option stores it: Gradio's numbers are floats (20.0 is 20 for an int
    option, checked by the options' own rules), an emptied text of a "text or null" option is null."""
    if kind == "str?" and value == "":
        return None
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def changed_values(ctx, values: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    """The page's values that differ from the stored ones (only those are written, as AUTOMATIC1111)."""
    stored = ctx.options
    out = {}
    for key, value in values.items():
        value = option_value(value, kinds[key])
        if key not in stored or not options_module.same(stored[key], value):
            out[key] = value
    return out


def apply_settings(ctx, values: dict[str, Any], kinds: dict[str, str]) -> str:
    """Write the changed values through ctx.set_options (all or nothing); the result line for the page."""
    changes = changed_values(ctx, values, kinds)
    if not changes:
        return "Nothing changed."
    try:
        ctx.set_options(changes)
    except UserError as e:
        return f"Error: {e} (nothing was changed)"
    keys = ", ".join(changes)
    return f"{len(changes)} setting{'s' if len(changes) != 1 else ''} changed: {keys}."


def build_settings_tab(ctx) -> SettingsTab:
    """The tab's controls, grouped by category and section; `wire_settings_tab` connects them."""
    tab = SettingsTab()
    with gr.Row():
        tab.submit = gr.Button("Apply settings", variant="primary", elem_id="settings_submit", scale=1)
        tab.search = gr.Textbox(placeholder="Search settings…", show_label=False, elem_id="settings_search",
                                scale=3, container=False)
    tab.result = gr.HTML("", elem_id="settings_result")
    gr.HTML("", js_on_load=SEARCH_JS, elem_id="settings_search_script", padding=False, container=False)
    category = None
    for section in options_module.sections():
        options = [o for o in section["options"] if o["key"] not in QUICKSETTINGS]
        if not options:
            continue
        if section["category"] != category:
            category = section["category"]
            gr.Markdown(f"## {category}", elem_classes="sdneg-settings-category")
        with gr.Group(elem_id=f"settings_section_{section['id']}".replace("-", "_"),
                      elem_classes="sdneg-settings-section"):
            gr.Markdown(f"### {section['label']}")
            for option in options:
                tab.controls[option["key"]] = make_control(ctx, option)
                tab.kinds[option["key"]] = option["kind"]
    return tab


def wire_settings_tab(ctx, tab: SettingsTab) -> None:
    keys = list(tab.controls)

    def submit(*values):
        line = apply_settings(ctx, dict(zip(keys, values)), tab.kinds)
        stored = [gr.update(value=page_value(ctx.options.get(k), tab.kinds[k])) for k in keys]
        return [line, *stored]

    tab.submit.click(submit, list(tab.controls.values()), [tab.result, *tab.controls.values()],
                     concurrency_limit=1)


def build_quicksettings(ctx) -> dict[str, gr.components.Component]:
    """The VAE dropdown with its refresh button and the Clip skip slider, for the top row."""
    c: dict[str, Any] = {}
    c["sd_vae"] = gr.Dropdown(choices=vae_choices(ctx), value=lambda: ctx.options.get("sd_vae"), label="SD VAE",
                              elem_id="setting_sd_vae", scale=2)
    c["refresh_sd_vae"] = gr.Button("↻", elem_id="refresh_sd_vae", elem_classes="sdneg-tool", scale=0)
    clip = options_module.OPTIONS["CLIP_stop_at_last_layers"]
    c["CLIP_stop_at_last_layers"] = gr.Slider(clip.minimum, clip.maximum, step=1, label=clip.label,
                                              value=lambda: ctx.options.get("CLIP_stop_at_last_layers"),
                                              elem_id="setting_CLIP_stop_at_last_layers", scale=2)
    return c


def wire_quicksettings(ctx, c: dict) -> None:
    """A quick setting applies as soon as it changes (AUTOMATIC1111's quicksettings); a refused value
    is a warning and the control shows the stored one again."""

    def setter(key: str, kind: str):
        def apply(value):
            try:
                ctx.set_options({key: option_value(value, kind)})
            except UserError as e:
                gr.Warning(str(e))
            return gr.update(value=ctx.options.get(key))
        return apply

    c["sd_vae"].input(setter("sd_vae", "str"), c["sd_vae"], c["sd_vae"], concurrency_limit=1)
    c["CLIP_stop_at_last_layers"].release(setter("CLIP_stop_at_last_layers", "int"), c["CLIP_stop_at_last_layers"],
                                          c["CLIP_stop_at_last_layers"], concurrency_limit=1)

    def refresh():
        ctx.refresh_vaes()
        return gr.update(choices=vae_choices(ctx), value=ctx.options.get("sd_vae"))

    c["refresh_sd_vae"].click(refresh, None, c["sd_vae"])
