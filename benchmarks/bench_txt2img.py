"""process_images (DDIM, after_sample hook on every step) against diffusers' StableDiffusionPipeline,
in float32 and with this engine's CPU speed options (modules/sd_precision.py).

Same model, prompt, negative prompt, initial latents, steps and CFG. The runs are interleaved
(diffusers, ours float32, ours option 1, ..., then again) and the median of each is compared, so
load from other processes on the machine hits all alike. Each option also prints the mean absolute
difference of its images from this engine's float32 eager images (8-bit pixel values).

    python benchmarks/build_sd15.py /tmp/sd15             # the SD 1.5-shaped model (random weights)
    python benchmarks/bench_txt2img.py --model /tmp/sd15 --size 256 --steps 10 [--repeats 2] [--compile]

diffusers' pipeline is built on the float32 model's own modules (the same weights, one copy in RAM).
The bfloat16 options share one bfloat16 model; channels-last is switched on its modules between runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modules import processing, sd_models, sd_precision  # noqa: E402
from tests.tiny_sd import build_bench_sd  # noqa: E402


def pipeline_on(model):
    """diffusers' StableDiffusionPipeline with DDIM on the very modules of `model`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.cond_stage.text_encoder,
                                   tokenizer=model.cond_stage.tokenizer, unet=model.unet,
                                   scheduler=DDIMScheduler.from_config(model.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_channels_last(model, on: bool) -> None:
    fmt = torch.channels_last if on else torch.contiguous_format
    model.unet.to(memory_format=fmt)
    model.vae.to(memory_format=fmt)


def to_uint8(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="diffusers folder (default: a small random SD built on the fly)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also bf16 + channels-last + torch.compile (its first "
                    "run, the compile, is reported apart and not timed)")
    ap.add_argument("--no-bf16", action="store_true", help="float32 only (a CPU without bfloat16)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = args.model or build_bench_sd()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp32 = sd_models.load_model(model_dir, device=device, dtype=None if device == "cuda" else torch.float32)
    pipe = pipeline_on(fp32)
    size = args.size or fp32.default_size
    prompt, negative = "a red circle on a white background", "blue"
    shape = (fp32.latent_channels, size // fp32.vae_scale_factor, size // fp32.vae_scale_factor)
    # the engine's own initial noise for seeds 1.. (ImageRNG, CPU generator), so both start alike
    latents = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(1 + i))
                           for i in range(args.batch)]).to(device, fp32.dtype)
    steps_seen = []

    def ours(model):
        def run():
            p = processing.StableDiffusionProcessingTxt2Img(
                prompt=prompt, negative_prompt=negative, steps=args.steps, cfg_scale=args.cfg, seed=1,
                width=size, height=size, batch_size=args.batch, do_not_save_samples=True)
            return processing.process_images(model, p, hooks=[lambda info: steps_seen.append(info.step)]).images
        return run

    def theirs():
        return pipe(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                    latents=latents, num_images_per_prompt=args.batch, output_type="pil").images

    runs = {"diffusers float32": (theirs, None), "ours float32": (ours(fp32), None)}
    bf16_ok = device == "cpu" and not args.no_bf16 and sd_precision.cpu_supports_bf16()
    if bf16_ok:
        bf16 = sd_models.load_model(model_dir, device=device, dtype=torch.float32, precision=sd_precision.PrecisionOptions(
            unet_dtype=torch.bfloat16, text_dtype=torch.bfloat16))
        runs["ours bf16"] = (ours(bf16), lambda: set_channels_last(bf16, False))
        runs["ours bf16 + channels-last"] = (ours(bf16), lambda: set_channels_last(bf16, True))
    compile_seconds = None
    if args.compile:
        base = bf16 if bf16_ok else fp32
        compiled = dataclasses.replace(base, compiled_unet=sd_precision.CompiledUNet(base.unet))
        name = "ours bf16 + channels-last + compile" if bf16_ok else "ours float32 + compile"
        runs[name] = (ours(compiled), lambda: set_channels_last(base, bf16_ok))

    def timed(fn, setup):
        if setup:
            setup()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        images = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, images

    times = {name: [] for name in runs}
    images = {}
    if args.compile:  # the compile happens in the first call of each shape; not part of the timing
        fn, setup = runs[name]
        compile_seconds, _ = timed(fn, setup)
    for r in range(args.repeats):  # A B C A B C ...: load hits every variant alike
        for name, (fn, setup) in runs.items():
            seconds, imgs = timed(fn, setup)
            times[name].append(seconds)
            images.setdefault(name, to_uint8(imgs))
            print(f"  run {r + 1} {name}: {seconds:.1f} s", flush=True)
    ours_runs = sum(1 for n in runs if n.startswith("ours")) * args.repeats + (1 if args.compile else 0)
    assert len(steps_seen) == args.steps * ours_runs, "the hook must run on every step"
    ref = statistics.median(times["diffusers float32"])
    base = images["ours float32"]
    print(f"model {Path(model_dir).name}, {size}x{size}, batch {args.batch}, {args.steps} DDIM steps, CFG {args.cfg}, "
          f"{device}, {torch.get_num_threads()} threads, {args.repeats} interleaved runs each, medians; "
          f"CPU bfloat16: {sd_precision.cpu_supports_bf16()}")
    print(f"{'variant':38s} {'s/step':>8s} {'x diffusers':>12s} {'|diff| vs ours fp32 (0-255)':>28s}")
    for name in runs:
        m = statistics.median(times[name]) / args.steps
        diff = np.abs(images[name] - base).mean()
        print(f"{name:38s} {m:8.3f} {m * args.steps / ref:12.3f} {diff:28.3f}")
    if compile_seconds is not None:
        print(f"torch.compile: first job (compile + run) {compile_seconds:.1f} s")
    fastest = min((n for n in runs if n.startswith("ours")), key=lambda n: statistics.median(times[n]))
    print(f"fastest: {fastest}, {statistics.median(times[fastest]) / ref:.3f}x diffusers float32")


if __name__ == "__main__":
    main()
