"""process_images (DDIM, after_sample hook on every step) against diffusers' StableDiffusionPipeline.

Same model, prompt, negative prompt, initial latents, steps and CFG; runs are interleaved
and the median of each is compared, so load on the machine hits both alike.

    python benchmarks/bench_txt2img.py [--model DIR] [--steps 20] [--repeats 7]
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

from modules import processing, sd_models  # noqa: E402
from tests.tiny_sd import build_bench_sd, diffusers_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="diffusers folder (default: a small random SD built on the fly)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = args.model or build_bench_sd()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = sd_models.load_model(model_dir, device=device)
    pipe = diffusers_pipeline(model_dir)
    if device == "cuda":
        pipe = pipe.to(device, model.dtype)
    size = args.size or model.default_size
    prompt, negative = "a red circle on a white background", "blue"
    shape = (model.latent_channels, size // model.vae_scale_factor, size // model.vae_scale_factor)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(1 + i))
                           for i in range(args.batch)]).to(device, model.dtype)
    steps_seen = []

    def ours() -> None:
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt=prompt, negative_prompt=negative, steps=args.steps, cfg_scale=args.cfg, seed=1,
            width=size, height=size, batch_size=args.batch, do_not_save_samples=True)
        processing.process_images(model, p, hooks=[lambda info: steps_seen.append(info.step)])

    def theirs() -> None:
        pipe(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
             latents=latents, num_images_per_prompt=args.batch, output_type="pil")

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    ours(), theirs()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(args.repeats):
        t_ours.append(timed(ours))
        t_theirs.append(timed(theirs))
    assert len(steps_seen) == args.steps * (args.repeats + 1), "the hook must run on every step"
    mo, md = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"model {Path(model_dir).name}, {size}x{size}, batch {args.batch}, {args.steps} steps, CFG {args.cfg}, "
          f"{device} {str(model.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, {args.repeats} runs each")
    print(f"process_images (DDIM + after_sample hook): median {mo * 1000:.1f} ms  ({mo / args.steps * 1000:.2f} ms/step)")
    print(f"diffusers StableDiffusionPipeline (DDIM):  median {md * 1000:.1f} ms  ({md / args.steps * 1000:.2f} ms/step)")
    print(f"ratio ours/diffusers: {mo / md:.3f}")


if __name__ == "__main__":
    main()
