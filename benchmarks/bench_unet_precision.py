#!/usr/bin/env python
"""One UNet call in float32 and in bfloat16 on the CPU, for a model folder (default: the embedded model).

Why bfloat16 is not the CPU default: it halved SD 1.5's UNet time on a CPU with AVX512-BF16
(bench_txt2img.py) and is emulated, several times slower than float32, on a CPU without it (the
line printed says which this one is). bfloat16 runs as the engine runs it (sd_precision.cast_modules:
float32 in and out, channels-last convolutions).

    python benchmarks/bench_unet_precision.py [--model DIR] [--batch 2] [--calls 20] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def per_call_ms(unet, x, t, c, calls: int) -> float:
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=c)  # warm-up
        t0 = time.perf_counter()
        for _ in range(calls):
            unet(x, t, encoder_hidden_states=c)
    return (time.perf_counter() - t0) / calls * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "Stable-diffusion" / "tiny-shapes")
    ap.add_argument("--batch", type=int, default=2, help="2: one CFG step of one image")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from modules import sd_models, sd_precision

    unet = sd_models.load_model(args.model, device="cpu").unet
    cfg = unet.config
    x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    c = torch.randn(args.batch, 77, cfg.cross_attention_dim)
    t = torch.full((args.batch,), 500)
    f32 = per_call_ms(unet, x, t, c, args.calls)
    bf16_unet = sd_models.load_model(args.model, device="cpu",
                                     precision=sd_precision.PrecisionOptions(unet_dtype=torch.bfloat16)).unet
    bf16 = per_call_ms(bf16_unet, x, t, c, args.calls)
    print(f"{args.model.name}: UNet batch {args.batch}, {cfg.sample_size}x{cfg.sample_size} latents, "
          f"{args.threads} threads: float32 {f32:.1f} ms, bfloat16 {bf16:.1f} ms per call (bf16 / fp32 = {bf16 / f32:.2f}); "
          f"native bfloat16 on this CPU: {'yes' if sd_precision.cpu_supports_bf16() else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
