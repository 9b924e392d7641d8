"""Per sampler: time per sampling step of process_images against diffusers' pipeline with the same scheduler.

Same model, prompt, negative prompt, initial latents, steps and CFG; for each sampler the two
are run interleaved and the medians compared, so load on the machine hits both alike. The
pipeline gets the scheduler the registry builds for that sampler and schedule type (the
tests check that the two give the same images); DPM++ 2S a has no diffusers scheduler.
process_images runs with an after_sample hook on every step.

    python benchmarks/bench_samplers.py [--model DIR] [--steps 20] [--repeats 3] [--threads N] [--sampler NAME ...]
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
from diffusers import DDIMScheduler  # noqa: E402

from modules import processing, sd_models, sd_samplers  # noqa: E402
from modules.sd_samplers_diffusers import DiffusersSampler, build_scheduler  # noqa: E402
from tests.tiny_sd import build_bench_sd, diffusers_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="diffusers folder (default: a small random SD built on the fly)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sampler", action="append", help="only these samplers (repeatable; default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model or build_bench_sd()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = sd_models.load_model(model_dir, device=device)
    pipe = diffusers_pipeline(model_dir)
    if device == "cuda":
        pipe = pipe.to(device, model.dtype)
    size = args.size or model.default_size
    prompt, negative = "a red circle on a white background", "blue"
    seeds = [1 + i for i in range(args.batch)]
    shape = (model.latent_channels, size // model.vae_scale_factor, size // model.vae_scale_factor)
    names = args.sampler or [s.name for s in sd_samplers.all_samplers]

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    print(f"model {Path(model_dir).name}, {size}x{size}, batch {args.batch}, {args.steps} steps, CFG {args.cfg}, "
          f"{device} {str(model.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, "
          f"{args.repeats} runs each (medians)")
    print(f"{'sampler':<14} {'schedule':<12} {'UNet calls':>10} {'ours ms/step':>13} {'diffusers ms/step':>18} "
          f"{'ratio':>6}")
    for name in names:
        data = sd_samplers.find_sampler_config(name)
        sampler = sd_samplers.create_sampler(name, model)
        schedule = getattr(sampler, "schedule", "-")
        steps_seen, unet_calls = [], []
        hook = model.unet.register_forward_pre_hook(lambda *a: unet_calls.append(1))

        def ours() -> None:
            p = processing.StableDiffusionProcessingTxt2Img(
                prompt=prompt, negative_prompt=negative, steps=args.steps, cfg_scale=args.cfg, seed=seeds[0],
                width=size, height=size, batch_size=args.batch, sampler_name=data.name, do_not_save_samples=True)
            processing.process_images(model, p, hooks=[lambda info: steps_seen.append(info.step)])

        theirs = None
        if isinstance(sampler, DiffusersSampler) or data.name == "DDIM":
            def theirs() -> None:
                if data.name == "DDIM":
                    pipe.scheduler = DDIMScheduler.from_config(model.scheduler_config)
                else:
                    extra = {"noise_sampler_seed": seeds} if sampler.recipe.cls_name == "DPMSolverSDEScheduler" else {}
                    pipe.scheduler = build_scheduler(model, sampler.recipe, sampler.schedule, **extra)
                generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, model.dtype)
                pipe(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                     latents=latents, generator=generators, num_images_per_prompt=args.batch, output_type="pil")

        ours()  # warm-up
        calls_per_run = len(unet_calls)
        hook.remove()
        if theirs:
            theirs()
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(ours))
            if theirs:
                t_theirs.append(timed(theirs))
        assert len(steps_seen) == args.steps * (args.repeats + 1), f"{name}: the hook must run once per step"
        mo = statistics.median(t_ours) / args.steps * 1000
        md = statistics.median(t_theirs) / args.steps * 1000 if theirs else None
        print(f"{data.name:<14} {schedule:<12} {calls_per_run:>10} {mo:>13.2f} "
              f"{(f'{md:.2f}' if md else '-'):>18} {(f'{mo / md:.3f}' if md else '-'):>6}")


if __name__ == "__main__":
    main()
