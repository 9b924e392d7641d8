#!/usr/bin/env python
"""Does a negative embedding remove what it learnt? Removal and keep rates with and without it, judged from pixels.

The embedded model draws a circle when unsure: `a blue shape on a gray background` gives circles in
most seeds, and the word `circle` as the negative prompt removes only part of them. This runs the
same prompt and seeds (0 .. N-1, DDIM 20 steps, CFG 7, through the engine) with no negative
prompt, with the word(s) given by `--negative`, and with each embedding given by `--embedding`
(loaded from `--embeddings-dir` like any embedding), and judges each image with
`training/shapes.judge` (training/negatives.py's judge and generator): the *removal* is
1 - circles_with / circles_without, the *keep rate* how often the image is still blue on gray.

    python training/eval_embedding.py --embedding circleness [--negative circle] [--seeds 40] [--json out.json]
    python training/eval_embedding.py --embedding circleness --guidance Perp-Neg
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))

import negatives as N  # noqa: E402  (puts the repository on sys.path)

PROMPT = "a blue shape on a gray background"


def is_named(j: dict) -> bool:
    return j["shape"] == "circle"


def is_kept(j: dict) -> bool:
    return j["color"] == "blue" and j["background"] == "gray"


def measure(model, negatives: list[str], n_seeds: int = 40, prompt: str = PROMPT, seed0: int = 0,
            steps: int = 20, cfg: float = 7.0, known: dict | None = None, **fields) -> dict:
    """{negative: {"circle_rate", "removal", "keep_rate", "shapes"}} with "" (no negative) first.
    `known`: results of an earlier run (same model, prompt and seeds) for plain-text negatives, not run again."""
    out = {}
    base = None
    for negative in [""] + [n for n in negatives if n != ""]:
        if known and negative in known:
            out[negative] = known[negative]
            base = known[negative]["circle_rate"] if negative == "" else base
            continue
        judged = N.generate_judged(model, prompt, negative, n_seeds, seed0, steps=steps, cfg=cfg, **fields)
        rate = N.rate(judged, is_named)
        if negative == "":
            base = rate
        shapes = {s: sum(j["shape"] == s for j in judged) for s in ("circle", "square", "triangle", None)}
        out[negative] = {"circle_rate": rate, "removal": (1 - rate / base) if base else None,
                         "keep_rate": N.rate(judged, is_kept), "shapes": {str(k): v for k, v in shapes.items()}}
    return out


def format_table(res: dict, n_seeds: int) -> str:
    lines = [f"`{PROMPT}`, seeds 0-{n_seeds - 1}, DDIM 20, CFG 7", "",
             "| negative prompt | circles | removal | blue+gray kept |", "|---|---|---|---|"]
    for negative, r in res.items():
        removal = "-" if negative == "" or r["removal"] is None else f"{r['removal']:.0%}"
        lines.append(f"| {negative or '(none)'} | {r['circle_rate']:.1%} | {removal} | {r['keep_rate']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "Stable-diffusion" / "tiny-shapes"))
    ap.add_argument("--embeddings-dir", type=Path, default=REPO / "embeddings")
    ap.add_argument("--embedding", action="append", default=[], help="embedding name to use as the negative prompt")
    ap.add_argument("--negative", action="append", default=None, help="plain negative prompt(s) to compare "
                                                                      "(default: circle)")
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--guidance", default="CFG", help="the guidance rule of the runs with a negative (CFG, Perp-Neg, ...)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a --json of an earlier run (same model and seeds): its no-negative and plain-word rows "
                         "are taken from there instead of run again")
    args = ap.parse_args(argv)
    import torch

    from modules import sd_models

    if args.threads:
        torch.set_num_threads(args.threads)
    model = sd_models.load_model(args.model, device="cpu", embeddings_dir=args.embeddings_dir)
    for name in args.embedding:
        if name not in model.embedding_db.loaded:
            skipped = {k: v.reason for k, v in model.embedding_db.skipped.items()}
            raise SystemExit(f"embedding {name!r} not loaded from {args.embeddings_dir} (skipped: {skipped})")
    t0 = time.time()
    known = None
    if args.reuse:
        earlier = json.loads(args.reuse.read_text())
        if earlier.get("seeds") == args.seeds and earlier.get("prompt") == PROMPT:
            same_rule = earlier.get("guidance", "CFG") == args.guidance
            # the run without a negative is plain CFG under every rule; the others only under the same rule
            known = {k: v for k, v in earlier["results"].items()
                     if k not in args.embedding and (same_rule or k == "")}
    res = measure(model, (args.negative if args.negative is not None else ["circle"]) + args.embedding, args.seeds,
                  known=known, guidance=args.guidance)
    print(format_table(res, args.seeds) + ("" if args.guidance == "CFG" else f" (guidance {args.guidance})"))
    print(f"\n({time.time() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"prompt": PROMPT, "seeds": args.seeds, "guidance": args.guidance,
                                         "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
