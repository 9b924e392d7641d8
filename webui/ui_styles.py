"""The Styles controls of a job tab, beside the prompts, as AUTOMATIC1111's: pick, apply, save.

The multi-select is a job field (`styles`): the page's job carries the chosen names and the job
layer (webui/jobs.py `apply_styles`) expands them exactly as it does for the API's `styles`.
"Apply styles" writes the chosen styles into the prompt boxes instead (and clears the choice, so
they are not applied twice); "Save style" stores the current prompt and negative prompt under a
name in the first styles file (modules/styles.py, written atomically), refusing a name that
cannot be saved. The styles files' warnings (a line that could not be read) are shown here.
"""
from __future__ import annotations

import html

import gradio as gr

from webui.ui_common import error_html, user_error


def style_names(ctx) -> list[str]:
    return list(ctx.styles.styles)


def styles_status_html(ctx) -> str:
    """The styles files' warnings, readable, or nothing."""
    warnings = list(ctx.styles.warnings)
    if not warnings:
        return ""
    return ('<div class="sdneg-warnings"><b>Styles file</b><ul>'
            + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>")


class StyleHandlers:
    def __init__(self, ctx):
        self.ctx = ctx

    def known(self, selected) -> list[str]:
        return [name for name in (selected or []) if name in self.ctx.styles.styles]

    def apply(self, prompt: str, negative: str, selected):
        """The chosen styles written into the boxes (AUTOMATIC1111's "Apply all selected styles to prompts")."""
        db = self.ctx.styles
        selected = list(selected or [])
        missing = [name for name in selected if name not in db.styles]
        if missing:
            gr.Warning(f"Style not found: {', '.join(missing)}")
        names = self.known(selected)
        return (db.apply_styles_to_prompt(prompt or "", names), db.apply_negative_styles_to_prompt(negative or "", names),
                gr.update(value=[]))

    def save(self, name: str, prompt: str, negative: str, selected):
        """The boxes saved as a style; the choices updated (the new style is not selected: its text is in the boxes)."""
        try:
            saved, replaced = self.ctx.styles.save_style(name, prompt or "", negative or "")
        except (ValueError, OSError) as e:
            message = f"Style not saved: {e}"
            user_error("save style", message)
            return gr.update(), gr.update(), error_html(message)
        gr.Info(f"Style {saved!r} {'replaced' if replaced else 'saved'} in {self.ctx.styles.styles[saved].path}")
        return (gr.update(choices=style_names(self.ctx), value=self.known(selected)), "", styles_status_html(self.ctx))

    def refresh(self, selected):
        self.ctx.styles.reload()
        return gr.update(choices=style_names(self.ctx), value=self.known(selected)), styles_status_html(self.ctx)


def build_styles(ctx, kind: str, fields: dict, c: dict) -> None:
    """The Styles multi-select (a job field) and its buttons, wired to the tab's prompt boxes."""
    handlers = StyleHandlers(ctx)
    with gr.Row(elem_id=f"{kind}_styles_row"):
        fields["styles"] = gr.Dropdown(style_names(ctx), value=[], multiselect=True, label="Styles",
                                       elem_id=f"{kind}_styles", scale=4, min_width=120)
        c["styles_refresh"] = gr.Button("↻", elem_id=f"{kind}_styles_refresh", elem_classes="sdneg-tool", scale=0)
    with gr.Row():
        c["style_apply"] = gr.Button("Apply styles", elem_id=f"{kind}_style_apply", size="sm", min_width=60)
        c["style_create"] = gr.Button("Save style", elem_id=f"{kind}_style_create", size="sm", min_width=60)
    c["style_name"] = gr.Textbox(show_label=False, placeholder="Name of the style to save", lines=1, max_lines=1,
                                 elem_id=f"{kind}_style_name", container=False)
    c["styles_info"] = gr.HTML(lambda: styles_status_html(ctx), elem_id=f"{kind}_styles_info", padding=False)
    prompt, negative, styles = fields["prompt"], fields["negative_prompt"], fields["styles"]
    c["style_apply"].click(handlers.apply, [prompt, negative, styles], [prompt, negative, styles], queue=False,
                           show_progress="hidden")
    c["style_create"].click(handlers.save, [c["style_name"], prompt, negative, styles],
                            [styles, c["style_name"], c["styles_info"]], concurrency_limit=1, show_progress="hidden")
    c["styles_refresh"].click(handlers.refresh, [styles], [styles, c["styles_info"]], queue=False,
                              show_progress="hidden")
    # a page loaded later lists the styles of the files as they are then (saved from another page, edited)
    root = gr.context.Context.root_block
    if root is not None:
        root.load(handlers.refresh, [styles], [styles, c["styles_info"]], queue=False, show_progress="hidden")
