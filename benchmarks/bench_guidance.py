"""Time per image of each negative-guidance setting against plain CFG, in one run.

    python benchmarks/bench_guidance.py [--model DIR] [--steps 20] [--batch 4] [--repeats 5]

Runs are interleaved (CFG, rule, CFG, rule, ...) and medians compared, so machine load
hits all settings alike. Perp-Neg runs three branches per image, the others two or fewer.
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
from tests.tiny_sd import build_bench_sd  # noqa: E402

SETTINGS = {
    "CFG": {},
    "Perp-Neg": {"guidance": "Perp-Neg"},
    "negative_weight 0.5": {"negative_weight": 0.5},
    "negative_start 0.3": {"negative_start": 0.3},
    "guidance_interval 0.2-0.8": {"guidance_interval": (0.2, 0.8)},
    "cfg_rescale 0.7": {"cfg_rescale": 0.7},
    "NGMS (s_min_uncond 1.0)": {"s_min_uncond": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or build_bench_sd()
    model = sd_models.load_model(model_dir)
    size = model.default_size

    def job(fields: dict) -> float:
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt="a red square on a white background", negative_prompt="a red circle", steps=args.steps,
            cfg_scale=7, seed=1, width=size, height=size, batch_size=args.batch, do_not_save_samples=True, **fields)
        start = time.perf_counter()
        processing.process_images(model, p)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.batch

    for fields in SETTINGS.values():
        job(fields)  # warm-up
    times = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, fields in SETTINGS.items():
            times[name].append(job(fields))
    base = statistics.median(times["CFG"])
    print(f"model {Path(model_dir).name}, {size}x{size}, batch {args.batch}, {args.steps} steps DDIM, "
          f"{model.device} {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'setting':28} {'s/image':>9} {'vs CFG':>7}")
    for name in SETTINGS:
        t = statistics.median(times[name])
        print(f"{name:28} {t:9.3f} {t / base:7.2f}")


if __name__ == "__main__":
    main()
