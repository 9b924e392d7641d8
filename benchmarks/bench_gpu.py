"""The GPU path: it/s of the SD 1.5-shaped UNet at 512x512, batch 1, CFG 7, 20 DDIM steps, fp16, with a cheap
preview every step, this engine (eager; channels-last; torch.compile; both) against diffusers' pipeline, in
one run, and the achieved fraction of the GPU's fp16 peak.

    python benchmarks/bench_gpu.py [--model DIR] [--repeats 3] [--peak-tflops 989]

it/s as AUTOMATIC1111's progress bar counts it: sampling steps per second, from the first step's end to the
last's (text encoding and VAE decode left out), both sides timed by their per-step callback (ours: the
after_sample hook; diffusers: callback_on_step_end), which also makes the preview (latents -> RGB with
the linear "Approx cheap" map, copied to the host, so each step is synchronised). FLOPs per step are
counted, not assumed: torch.utils.flop_counter over one UNet call at batch 2 (CFG), on the meta device
(no memory, no GPU needed). Without CUDA it prints the FLOP count and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# dense fp16 tensor-core peaks (TFLOPS, no sparsity) from the vendors' data sheets; --peak-tflops for others
PEAK_FP16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def unet_flops(size: int = 512, batch: int = 2, context: int = 77) -> int:
    """FLOPs of one SD 1.5 UNet call (`batch` rows: CFG's uncond + cond), counted by torch's FlopCounterMode."""
    import accelerate
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads((REPO / "configs" / "sd15" / "unet" / "config.json").read_text())
    with accelerate.init_empty_weights(include_buffers=True):
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to("meta", torch.float16)
    x = torch.zeros(batch, 4, size // 8, size // 8, device="meta", dtype=torch.float16)
    cond = torch.zeros(batch, context, config["cross_attention_dim"], device="meta", dtype=torch.float16)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, torch.tensor(500, device="meta"), encoder_hidden_states=cond)
    return int(counter.get_total_flops())


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_FP16_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="SD 1.5-shaped diffusers folder (default: built "
                    "with benchmarks/build_sd15.py in a temp folder)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense fp16 peak (default: a table)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    args = ap.parse_args()

    flops = unet_flops(args.size)
    print(f"SD 1.5 UNet at {args.size}x{args.size}, batch 2 (CFG): {flops / 1e12:.3f} TFLOP per step "
          "(torch.utils.flop_counter)")
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here; the it/s figures need a GPU (the FLOP count above is all a CPU "
              "machine can check). README: 'GPU figures: not measured yet'.")
        return 2

    from benchmarks.bench_txt2img import pipeline_on
    from benchmarks.build_sd15 import build_sd15_folder
    from modules import processing, sd_models, sd_precision

    model_dir = args.model or build_sd15_folder(Path(tempfile.mkdtemp()) / "sd15")
    gpu = torch.cuda.get_device_name()
    peak = peak_tflops(gpu, args.peak_tflops)
    base = sd_models.load_model(model_dir, device="cuda", dtype=torch.float16)
    factors = torch.tensor(base.latent_rgb[0], device="cuda", dtype=torch.float16)

    def preview(latents: torch.Tensor) -> torch.Tensor:  # "Approx cheap": one 4x3 map, to the host
        return (torch.einsum("bchw,cr->brhw", latents[:1].to(factors.dtype), factors) * 127.5 + 127.5).clamp(
            0, 255).byte().cpu()

    def ours(model):
        def run():
            stamps = []

            def hook(info):
                preview(info.x)
                stamps.append(time.perf_counter())
            p = processing.StableDiffusionProcessingTxt2Img(
                prompt="a red circle on a white background", negative_prompt="blue", steps=args.steps,
                cfg_scale=args.cfg, seed=1, width=args.size, height=args.size, do_not_save_samples=True)
            processing.process_images(model, p, hooks=[hook])
            return stamps
        return run

    pipe = pipeline_on(base)

    def theirs():
        stamps = []

        def callback(pipe_, i, t, kw):
            preview(kw["latents"])
            stamps.append(time.perf_counter())
            return kw
        g = torch.Generator("cpu").manual_seed(1)
        latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).to("cuda", torch.float16)
        pipe("a red circle on a white background", negative_prompt="blue", num_inference_steps=args.steps,
             guidance_scale=args.cfg, latents=latents, callback_on_step_end=callback,
             callback_on_step_end_tensor_inputs=["latents"], output_type="latent")
        return stamps

    variants = {"diffusers fp16": theirs, "ours fp16": ours(base)}
    options = {"ours fp16 + channels-last": sd_precision.PrecisionOptions(channels_last=True)}
    if not args.no_compile:
        options["ours fp16 + compile"] = sd_precision.PrecisionOptions(compile=True)
        options["ours fp16 + channels-last + compile"] = sd_precision.PrecisionOptions(channels_last=True,
                                                                                        compile=True)
    for name, opts in options.items():
        variants[name] = ours(sd_models.load_model(model_dir, device="cuda", dtype=torch.float16, precision=opts))
    first = {}
    for name, fn in variants.items():  # warm-up; compiles happen here
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    rates = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            stamps = fn()
            rates[name].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    ref = statistics.median(rates["diffusers fp16"])
    print(f"{gpu}, {args.size}x{args.size}, batch 1, CFG {args.cfg}, {args.steps} DDIM steps, fp16, preview every "
          f"step, {args.repeats} interleaved runs each, medians; peak {peak or '?'} TFLOPS fp16")
    print(f"{'variant':38s} {'it/s':>8s} {'x diffusers':>12s} {'of peak':>8s} {'first run s':>12s}")
    for name in variants:
        r = statistics.median(rates[name])
        frac = f"{flops * r / (peak * 1e12):.1%}" if peak else "?"
        print(f"{name:38s} {r:8.2f} {r / ref:12.3f} {frac:>8s} {first[name]:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
