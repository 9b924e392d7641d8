"""Time per image of each negative-guidance setting against plain CFG, in one run.

    python benchmarks/bench_guidance.py [--model DIR] [--steps 20] [--batch 4] [--repeats 5] [--only NAME ...]

Runs are interleaved (CFG, rule, CFG, rule, ...) and medians compared, so machine load
hits all settings alike. Perp-Neg and Dynamic negative run three branches per image, the
others two or fewer; NAG adds a second attention per cross-attention layer for the prompt rows.
The last line is the negative verdict's cost per image (modules/negative_verdict.py: one
batched UNet call of 2 x levels x noises rows, plus the VAE encode).
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

from modules import negative_verdict, processing, sd_models  # noqa: E402
from tests.tiny_sd import build_bench_sd  # noqa: E402

SETTINGS = {
    "CFG": {},
    "Perp-Neg": {"guidance": "Perp-Neg"},
    "negative_weight 0.5": {"negative_weight": 0.5},
    "negative_start 0.3": {"negative_start": 0.3},
    "guidance_interval 0.2-0.8": {"guidance_interval": (0.2, 0.8)},
    "cfg_rescale 0.7": {"cfg_rescale": 0.7},
    "NGMS (s_min_uncond 1.0)": {"s_min_uncond": 1.0},
    "NAG 3 (CFG 7)": {"nag_scale": 3.0},
    "NAG 3, CFG 1": {"nag_scale": 3.0, "cfg_scale": 1.0},
    "CFG 1 (no guidance)": {"cfg_scale": 1.0},
    "Dynamic negative": {"guidance": "Dynamic negative"},
    "APG": {"guidance": "APG"},
    "Dynamic thresholding": {"guidance": "Dynamic thresholding", "dynthres_mimic_scale": 4.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", action="append", help="only these settings (CFG is always run)")
    args = ap.parse_args()
    settings = {k: v for k, v in SETTINGS.items() if not args.only or k == "CFG" or k in args.only}
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or build_bench_sd()
    model = sd_models.load_model(model_dir)
    size = model.default_size

    def job(fields: dict) -> float:
        p = processing.StableDiffusionProcessingTxt2Img(**{
            "prompt": "a red square on a white background", "negative_prompt": "a red circle", "steps": args.steps,
            "cfg_scale": 7, "seed": 1, "width": size, "height": size, "batch_size": args.batch,
            "do_not_save_samples": True, **fields})
        start = time.perf_counter()
        processing.process_images(model, p)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.batch

    images = processing.process_images(model, processing.StableDiffusionProcessingTxt2Img(
        prompt="a red square", steps=2, width=size, height=size, batch_size=args.batch, seed=1,
        do_not_save_samples=True)).images

    def verdict() -> float:
        start = time.perf_counter()
        negative_verdict.score_images(model, images, ["a red circle"] * len(images), 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(images)

    for fields in settings.values():
        job(fields)  # warm-up
    verdict()
    times = {name: [] for name in settings}
    verdict_times = []
    for _ in range(args.repeats):
        for name, fields in settings.items():
            times[name].append(job(fields))
        verdict_times.append(verdict())
    base = statistics.median(times["CFG"])
    print(f"model {Path(model_dir).name}, {size}x{size}, batch {args.batch}, {args.steps} steps DDIM, "
          f"{model.device} {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'setting':28} {'s/image':>9} {'vs CFG':>7}")
    for name in settings:
        t = statistics.median(times[name])
        print(f"{name:28} {t:9.3f} {t / base:7.2f}")
    rows = 2 * len(negative_verdict.DEFAULT_TIMESTEPS) * negative_verdict.DEFAULT_NOISE_PER_LEVEL
    t = statistics.median(verdict_times)
    print(f"{'negative verdict, per image':28} {t:9.3f} {t / base:7.2f}   ({rows} UNet rows in 1 call + VAE encode; "
          f"a CFG job: {2 * args.steps} rows)")


if __name__ == "__main__":
    main()
