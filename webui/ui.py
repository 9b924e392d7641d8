"""The Gradio page: a txt2img tab in AUTOMATIC1111's layout and element ids."""
from __future__ import annotations

import gradio as gr

from modules.errors import UserError
from modules.job_state import JobState
from modules.processing import StableDiffusionProcessingTxt2Img
from modules.sd_samplers import all_samplers
from webui.context import WebUIContext


def create_ui(ctx: WebUIContext) -> gr.Blocks:
    size = ctx.model.default_size if ctx.model else 512

    def generate(prompt, negative_prompt, sampler_name, steps, cfg_scale, seed, width, height, batch_size, batch_count):
        p = StableDiffusionProcessingTxt2Img(
            prompt=prompt, negative_prompt=negative_prompt, sampler_name=sampler_name, steps=int(steps),
            cfg_scale=float(cfg_scale), seed=int(seed), width=int(width), height=int(height),
            batch_size=int(batch_size), n_iter=int(batch_count), outpath_samples=str(ctx.args.outdir_samples))
        try:
            processed = ctx.txt2img(p, JobState())
        except UserError as e:
            raise gr.Error(str(e))
        return processed.images, f"<pre>{processed.info}</pre>"

    with gr.Blocks(title="Stable Diffusion - negative prompts") as demo:
        with gr.Tab("txt2img"):
            prompt = gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=3)
            negative = gr.Textbox(label="Negative prompt", elem_id="txt2img_neg_prompt", lines=2)
            with gr.Row():
                sampler = gr.Dropdown([s.name for s in all_samplers], value=all_samplers[0].name,
                                      label="Sampling method", elem_id="txt2img_sampling")
                steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps")
            with gr.Row():
                width = gr.Slider(8, 2048, value=size, step=8, label="Width", elem_id="txt2img_width")
                height = gr.Slider(8, 2048, value=size, step=8, label="Height", elem_id="txt2img_height")
                batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id="txt2img_batch_count")
                batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="txt2img_batch_size")
            cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
            seed = gr.Number(value=-1, precision=0, label="Seed", elem_id="txt2img_seed")
            generate_button = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
            gallery = gr.Gallery(label="Output", elem_id="txt2img_gallery", columns=4)
            info = gr.HTML(elem_id="html_info_txt2img")
        generate_button.click(generate, [prompt, negative, sampler, steps, cfg, seed, width, height, batch_size,
                                         batch_count], [gallery, info])
    return demo
