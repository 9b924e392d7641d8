"""The img2img tab's image inputs and AUTOMATIC1111's "Send to img2img" / "Send to inpaint".

`build_image_inputs` lays out, above the img2img settings, AUTOMATIC1111's sub-tabs and ids:
img2img (`img2img_image`), Inpaint (`img2maskimg`: the picture with a mask drawn over it in the
browser) and Inpaint upload (`img_inpaint_base` + `img_inpaint_mask`), the resize mode and the
inpainting controls. The controls are keyed by AUTOMATIC1111's argument names (`init_img`,
`init_img_with_mask`, ...) and the selected sub-tab (`img2img_mode`); the job layer
(`jobs.page_images`) turns them into `init_images` and `mask`, decoded as the API's images are.

`wire_send_buttons` connects the send buttons of the result panels and of PNG Info: the image
goes to the target's image input, its infotext's values fill the target's controls, its size
the width and height (AUTOMATIC1111's `send_size`), and the page switches to the target tab.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from modules import processing, sd_samplers
from webui import jobs

# Send targets: the button's name -> (job tab, img2img sub-tab)
SEND_TARGETS = {"img2img": ("img2img", "img2img"), "inpaint": ("img2img", "inpaint")}
INPUT_FOR_MODE = {"img2img": "init_img", "inpaint": "init_img_with_mask", "inpaint_upload": "init_img_inpaint"}


def ImageUpload(**kwargs) -> gr.Image:  # noqa: N802  (used as a component class)
    """A gr.Image that hands the handler the uploaded file's path without opening it: the job layer
    decodes it with the API's checks (size, format, decompression bombs), so a file that is no
    image is a readable message on the page rather than an error inside Gradio.

    The instance's own `preprocess` replaces gr.Image's (a subclass would make Gradio write a
    .pyi stub beside this module at import time)."""
    image = gr.Image(**kwargs)
    image.preprocess = lambda payload: None if payload is None else payload.path
    return image


def build_image_inputs(ctx, kind: str, fields: dict, c: dict) -> None:
    """AUTOMATIC1111's img2img / Inpaint / Inpaint upload sub-tabs, resize mode, inpainting controls, strength."""
    fields[jobs.IMG2IMG_MODE] = gr.State("img2img")
    with gr.Tabs(elem_id=f"mode_{kind}") as c["mode_tabs"]:
        with gr.Tab("img2img", id="img2img", elem_id=f"{kind}_img2img_tab") as tab_img2img:
            fields["init_img"] = ImageUpload(label="Image for img2img", elem_id=f"{kind}_image", type="filepath",
                                             image_mode=None, sources=["upload", "clipboard"], height=360)
        with gr.Tab("Inpaint", id="inpaint", elem_id=f"{kind}_inpaint_tab") as tab_inpaint:
            fields["init_img_with_mask"] = gr.ImageMask(
                label="Image for inpainting with mask (draw over the part to repaint)", elem_id="img2maskimg",
                type="pil", image_mode="RGBA", format="png", sources=["upload", "clipboard"], height=360,
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=12), transforms=(), layers=False)
        with gr.Tab("Inpaint upload", id="inpaint_upload", elem_id=f"{kind}_inpaint_upload_tab") as tab_upload:
            fields["init_img_inpaint"] = ImageUpload(label="Image for img2img", elem_id="img_inpaint_base",
                                                     type="filepath", image_mode=None, sources=["upload"], height=300)
            fields["init_mask_inpaint"] = ImageUpload(label="Mask (white = repaint)", elem_id="img_inpaint_mask",
                                                      type="filepath", image_mode=None, sources=["upload"], height=300)
    fields["resize_mode"] = gr.Radio(list(jobs.PAGE_CHOICES["resize_mode"]), value="Just resize", label="Resize mode",
                                     elem_id="resize_mode")
    with gr.Group(visible=False, elem_id="inpaint_controls") as c["inpaint_controls"]:
        fields["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id=f"{kind}_mask_blur")
        fields["inpainting_mask_invert"] = gr.Radio(list(jobs.PAGE_CHOICES["inpainting_mask_invert"]),
                                                    value="Inpaint masked", label="Mask mode",
                                                    elem_id=f"{kind}_mask_mode")
        fields["inpainting_fill"] = gr.Radio(list(jobs.PAGE_CHOICES["inpainting_fill"]), value="original",
                                             label="Masked content", elem_id=f"{kind}_inpainting_fill")
        with gr.Row():
            fields["inpaint_full_res"] = gr.Radio(list(jobs.PAGE_CHOICES["inpaint_full_res"]), value="Whole picture",
                                                  label="Inpaint area", elem_id=f"{kind}_inpaint_full_res", scale=1)
            fields["inpaint_full_res_padding"] = gr.Slider(0, 256, value=32, step=4,
                                                           label="Only masked padding, pixels", scale=2,
                                                           elem_id=f"{kind}_inpaint_full_res_padding")
    fields["denoising_strength"] = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                             elem_id=f"{kind}_denoising_strength")
    for tab, mode in ((tab_img2img, "img2img"), (tab_inpaint, "inpaint"), (tab_upload, "inpaint_upload")):
        tab.select(lambda mode=mode: (mode, gr.Group(visible=mode != "img2img")), None,
                   [fields[jobs.IMG2IMG_MODE], c["inpaint_controls"]], queue=False, show_progress="hidden")


def build_send_buttons(kind: str) -> dict[str, gr.Button]:
    """AUTOMATIC1111's buttons under a result: `<kind>_send_to_img2img`, `<kind>_send_to_inpaint`."""
    with gr.Row(elem_id=f"{kind}_send_row"):
        return {target: gr.Button(f"Send to {target}", elem_id=f"{kind}_send_to_{target}", size="sm")
                for target in SEND_TARGETS}


def control_updates(text: str, fields: dict) -> dict:
    """An infotext -> updates of a job tab's controls: its values shown as the controls show them (radio
    labels, "Use same sampler"), the hires fix turned on by its keys; an unknown sampler is left as it is."""
    updates: dict = {}
    for name, value in processing.infotext_fields(text).items():
        if isinstance(value, (tuple, list)):  # a tuple field shown as one control per element
            updates.update({fields[f"{name}[{i}]"]: v for i, v in enumerate(value) if f"{name}[{i}]" in fields})
            continue
        component = fields.get(name)
        if component is None:
            continue
        if name in ("sampler_name", "hr_sampler_name"):
            data = sd_samplers.find_sampler_config(value)
            if data is None:
                gr.Warning(f"Unknown sampler {value!r}: not changed")
                continue
            value = data.name
        updates[component] = jobs.page_value(name, value)
    return updates


def image_size(path: str) -> tuple[int, int] | None:
    """The picture's width and height from its header (Pillow opens lazily: nothing is decoded), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # no image, or a bomb Pillow refuses: the job layer will say why when it runs
        return None


def send_updates(image: str | None, text: str, target: str, tabs, job_tabs: dict) -> dict:
    """Everything a send button changes: the tab, the sub-tab, the image input, the controls."""
    if not image:
        gr.Warning("No image to send: generate or open one first")
        return {}
    kind, mode = SEND_TARGETS[target]
    tab = job_tabs[kind]
    fields = tab.fields
    updates = control_updates(text, fields) if text else {}
    size = image_size(image)
    if size is not None:  # AUTOMATIC1111's send_size: the target works at the picture's size
        updates[fields["width"]], updates[fields["height"]] = size
    value: Any = image
    if INPUT_FOR_MODE[mode] == "init_img_with_mask":
        value = {"background": image, "layers": [], "composite": image}
    updates[fields[INPUT_FOR_MODE[mode]]] = value
    updates[fields[jobs.IMG2IMG_MODE]] = mode
    updates[tab.mode_tabs] = gr.Tabs(selected=mode)
    updates[tab.inpaint_controls] = gr.Group(visible=mode != "img2img")
    updates[tabs] = gr.Tabs(selected=kind)
    return updates


def send_outputs(tabs, job_tabs: dict, target: str) -> list:
    kind = SEND_TARGETS[target][0]
    tab = job_tabs[kind]
    return [tabs, tab.mode_tabs, tab.inpaint_controls, *tab.fields.values()]


def wire_result_buttons(tabs, job_tabs: dict) -> None:
    """The send buttons under each tab's result: the selected image and its infotext."""
    if "img2img" not in job_tabs:
        return
    for source in job_tabs.values():
        for target, button in source.send_buttons.items():

            def send(job, index, target=target):
                images, texts = job.get("images") or [], job.get("infotexts") or []
                i = index if isinstance(index, int) and 0 <= index < len(images) else 0
                if not images:
                    gr.Warning("No image generated yet: nothing to send")
                    return {}
                return send_updates(images[i], texts[i] if i < len(texts) else "", target, tabs, job_tabs)

            button.click(send, [source.last_job, source.selected], send_outputs(tabs, job_tabs, target),
                         show_progress="hidden")


def wire_pnginfo_buttons(tabs, job_tabs: dict, buttons: dict, image, parameters) -> None:
    """PNG Info's "Send to img2img" / "Send to inpaint": its image and the parameters read from it."""
    for target, button in buttons.items():
        def send(path, text, target=target):
            return send_updates(str(path) if path else None, text or "", target, tabs, job_tabs)

        button.click(send, [image, parameters], send_outputs(tabs, job_tabs, target), show_progress="hidden")


__all__ = ["ImageUpload", "build_image_inputs", "build_send_buttons", "control_updates", "wire_pnginfo_buttons",
           "wire_result_buttons"]
