"""img2img's loop against diffusers' StableDiffusionImg2ImgPipeline, and the hires fix against two plain passes.

img2img: the same model, init picture (both encode it with the VAE), prompt, negative prompt,
steps, CFG and start (diffusers' strength is chosen so that it runs the same steps as
AUTOMATIC1111's rule: (int(strength * steps) + 1) / steps), DDIM; ours with an after_sample hook on
every step that copies the step's prediction to the CPU as float16 (what the page's previews do).
Runs are interleaved and medians compared, so load on the machine hits both alike.

Hires fix: one txt2img job with enable_hr (size -> 2 x size, latent upscale, hr_second_pass_steps =
steps) against a plain job at size plus a plain job at 2 x size with the same number of steps: the
second pass costs what a pass at the bigger size costs, and the upscale is nearly free.

    python benchmarks/bench_img2img.py [--model DIR] [--steps 20] [--strength 0.75] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from modules import processing, sd_models  # noqa: E402
from modules.sd_samplers_common import img2img_steps  # noqa: E402
from tests.tiny_sd import build_bench_sd  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="diffusers folder (default: a small random SD built on the fly)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.75)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    model_dir = args.model or build_bench_sd()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = sd_models.load_model(model_dir, device=device)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None,
                                                          requires_safety_checker=False, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    if device == "cuda":
        pipe = pipe.to(device, model.dtype)
    size = args.size or model.default_size
    prompt, negative = "a blue circle on a white background", "red"
    init = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(init).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    _, t_enc = img2img_steps(args.steps, args.strength)
    run_steps = t_enc + 1
    previews: list[torch.Tensor] = []

    def preview_hook(info) -> None:
        previews.append(info.pred_x0.detach().to("cpu", torch.float16))

    def ours() -> None:
        p = processing.StableDiffusionProcessingImg2Img(
            prompt=prompt, negative_prompt=negative, init_images=[init], denoising_strength=args.strength,
            steps=args.steps, cfg_scale=args.cfg, seed=1, width=size, height=size, do_not_save_samples=True)
        processing.process_images(model, p, hooks=[preview_hook])

    def theirs() -> None:
        pipe(prompt, negative_prompt=negative, image=init, strength=min(1.0, run_steps / args.steps + 1e-6),
             num_inference_steps=args.steps, guidance_scale=args.cfg, generator=torch.Generator("cpu").manual_seed(1),
             output_type="pil")

    def txt2img(width: int, steps: int, **hires) -> None:
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=args.cfg, seed=1, width=width,
            height=width, do_not_save_samples=True, **hires)
        processing.process_images(model, p, hooks=[preview_hook])

    def hires_job() -> None:
        txt2img(size, args.steps, enable_hr=True, hr_scale=2, denoising_strength=0.5, hr_second_pass_steps=args.steps)

    def two_passes() -> None:
        txt2img(size, args.steps)
        txt2img(2 * size, args.steps)

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in (ours, theirs, hires_job, two_passes):  # warm-up
        fn()
    previews.clear()
    t_ours, t_theirs, t_hires, t_two = [], [], [], []
    for _ in range(args.repeats):
        t_ours.append(timed(ours))
        t_theirs.append(timed(theirs))
        t_hires.append(timed(hires_job))
        t_two.append(timed(two_passes))
    assert len(previews) == args.repeats * (run_steps + 4 * args.steps), "the hook must run on every step"
    mo, md = statistics.median(t_ours), statistics.median(t_theirs)
    mh, m2 = statistics.median(t_hires), statistics.median(t_two)
    print(f"model {Path(model_dir).name}, {size}x{size}, strength {args.strength} ({run_steps} of {args.steps} "
          f"steps), CFG {args.cfg}, {device} {str(model.dtype).replace('torch.', '')}, {torch.get_num_threads()} "
          f"threads, {args.repeats} runs each")
    print(f"img2img process_images (DDIM + preview hook): median {mo * 1000:.1f} ms  ({mo / run_steps * 1000:.2f} ms/step)")
    print(f"diffusers StableDiffusionImg2ImgPipeline:     median {md * 1000:.1f} ms  ({md / run_steps * 1000:.2f} ms/step)")
    print(f"ratio ours/diffusers: {mo / md:.3f}")
    print(f"hires fix {size} -> {2 * size} ({args.steps} + {args.steps} steps): median {mh * 1000:.1f} ms; "
          f"plain {size} + plain {2 * size}: median {m2 * 1000:.1f} ms; ratio {mh / m2:.3f}")


if __name__ == "__main__":
    main()
