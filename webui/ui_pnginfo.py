"""The PNG Info tab: read an image's generation parameters and send them to a job tab."""
from __future__ import annotations

import html

import gradio as gr

from modules import images as images_module
from modules.errors import UserError
from webui.ui_common import error_html, infotext_html


def read_png_info(path):
    """The image's text chunks as the tab shows them, and its `parameters` (read without decoding pixels)."""
    if not path:
        return "", ""
    try:
        with open(path, "rb") as fh:
            items = read_text(fh.read())
    except (OSError, UserError) as e:
        return error_html(f"Cannot read the image: {e}"), ""
    parameters = items.pop("parameters", None)
    if parameters is None and not items:
        return "<div>Nothing found in the image.</div>", ""
    parts = []
    if parameters:
        parts.append(f"<p><b>parameters</b></p>{infotext_html(parameters)}")
    for k, v in items.items():
        if isinstance(v, (str, int, float)):
            parts.append(f"<p><b>{html.escape(str(k))}</b></p><div class='sdneg-infotext'>{html.escape(str(v))}</div>")
    return "".join(parts), parameters or ""


def read_text(data: bytes) -> dict:
    """The text chunks of PNG / JPEG / WebP data (modules/images.py reads them without decoding pixels)."""
    reader = getattr(images_module, "read_image_text", None)
    if reader is not None:
        return dict(reader(data))
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return {k: v for k, v in im.info.items() if isinstance(v, str)}


def parameters_to_updates(text: str, fields: dict) -> dict:
    """An infotext -> updates of a job tab's controls (unknown samplers left unchanged, with a warning)."""
    from webui.ui_img2img import control_updates

    return control_updates(text, fields)


def build_pnginfo_tab(tabs, job_tabs: dict) -> None:
    """The tab's layout and its send buttons (AUTOMATIC1111's "Send to txt2img", "Send to img2img", "Send to inpaint")."""
    from webui import ui_img2img

    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Source", type="filepath", image_mode=None, sources=["upload"],
                             elem_id="pnginfo_image", height=360)
        with gr.Column():
            info = gr.HTML(elem_id="pnginfo_html")
            parameters = gr.State("")
            with gr.Row():
                buttons = {kind: gr.Button(f"Send to {kind}", elem_id=f"pnginfo_send_to_{kind}")
                           for kind in job_tabs if kind not in ui_img2img.SEND_TARGETS}
                image_buttons = {target: gr.Button(f"Send to {target}", elem_id=f"pnginfo_send_to_{target}")
                                 for target, (kind, _) in ui_img2img.SEND_TARGETS.items() if kind in job_tabs}
    image.change(read_png_info, image, [info, parameters])
    for kind, button in buttons.items():
        fields = job_tabs[kind].fields

        def send(text: str, kind=kind, fields=fields):
            if not text:
                gr.Warning("No generation parameters to send")
                return {}
            return {tabs: gr.Tabs(selected=kind), **parameters_to_updates(text, fields)}

        button.click(send, parameters, [tabs, *fields.values()])
    ui_img2img.wire_pnginfo_buttons(tabs, job_tabs, image_buttons, image, parameters)
