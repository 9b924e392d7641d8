"""The PNG Info tab: read an image's generation parameters and send them to a job tab."""
from __future__ import annotations

import html

import gradio as gr

from modules import images as images_module, sd_samplers
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
    values = images_module.infotext_to_fields(images_module.parse_generation_parameters(text))
    updates: dict = {}
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


def build_pnginfo_tab(tabs, job_tabs: dict) -> None:
    """The tab's layout and its send buttons, one per job tab (AUTOMATIC1111's "Send to txt2img", ...)."""
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Source", type="filepath", image_mode=None, sources=["upload"],
                             elem_id="pnginfo_image", height=360)
        with gr.Column():
            info = gr.HTML(elem_id="pnginfo_html")
            parameters = gr.State("")
            buttons = {kind: gr.Button(f"Send to {kind}", elem_id=f"pnginfo_send_to_{kind}") for kind in job_tabs}
    image.change(read_png_info, image, [info, parameters])
    for kind, button in buttons.items():
        fields = job_tabs[kind].fields

        def send(text: str, kind=kind, fields=fields):
            if not text:
                gr.Warning("No generation parameters to send")
                return {}
            return {tabs: gr.Tabs(selected=kind), **parameters_to_updates(text, fields)}

        button.click(send, parameters, [tabs, *fields.values()])
