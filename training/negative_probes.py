#!/usr/bin/env python
"""The side measurements that the model card's reading of the negative `circle` quotes.

Why the negative `circle` removes fewer circles than `square` removes squares: what the model
draws for the empty prompt and for `a blue shape on a gray background` with the negatives
`circle`, `square` and `triangle`, and whether the circles that survive `circle` differ in size
from those it removes. DDIM 20 steps, CFG 7, seeds 0..N-1, through the engine, judged from pixels.

    python training/negative_probes.py [--model DIR] [--seeds 40] [--threads 2]
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

import negatives as N  # training/negatives.py (puts the repo on sys.path)

REPO = Path(__file__).resolve().parent.parent
SHAPE_PROMPT = "a blue shape on a gray background"


def size(j: dict) -> float:
    """Square root of the object's area, as a fraction of the image side."""
    return float(np.sqrt(j["pixels"]) / 64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "Stable-diffusion" / "tiny-shapes"))
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    import torch
    from modules import sd_models

    if args.threads:
        torch.set_num_threads(args.threads)
    model = sd_models.load_model(args.model, device="cpu")
    n = args.seeds
    runs = {}
    for prompt, negative in [("", ""), (SHAPE_PROMPT, ""), (SHAPE_PROMPT, "circle"), (SHAPE_PROMPT, "square"),
                             (SHAPE_PROMPT, "triangle"), ("a blue circle on a gray background", "")]:
        runs[prompt, negative] = judged = N.generate_judged(model, prompt, negative, n)
        print(f"{prompt!r:40} negative {negative!r:10} shapes {dict(Counter(j['shape'] for j in judged))}")
    without, with_ = runs[SHAPE_PROMPT, ""], runs[SHAPE_PROMPT, "circle"]
    stayed = [size(a) for a, b in zip(without, with_) if a["shape"] == "circle" and b["shape"] == "circle"]
    removed = [size(a) for a, b in zip(without, with_) if a["shape"] == "circle" and b["shape"] != "circle"]
    drawn = [size(j) for j in runs["a blue circle on a gray background", ""] if j["shape"] == "circle"]
    print(f"size of the circles (sqrt of area / side, median): {len(stayed)} that survive `circle` "
          f"{np.median(stayed):.2f}, {len(removed)} that it removes {np.median(removed):.2f}, "
          f"circles of the full prompt {np.median(drawn):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
