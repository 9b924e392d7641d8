"""Did the negative prompt do its job? Removal and keep rates per guidance rule, judged from pixels.

For each case the same seeds run without and with the negative prompt, through the
project's own engine (`process_images`, DDIM 20 steps, CFG 7 by default). The *removal
rate* is how much the attribute the negative names dropped against no negative
(1 - rate_with / rate_without); the *keep rate* is how often the rest of the prompt
survived with the negative. Called by `training/evaluate.py negatives`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes as S  # noqa: E402

Judgement = dict


@dataclass(frozen=True)
class NegativeCase:
    prompt: str
    negative: str
    named: str  # what the negative prompt names, as judged
    is_named: Callable[[Judgement], bool]
    kept: str  # the rest of the prompt, which should survive
    is_kept: Callable[[Judgement], bool]


CASES = [
    NegativeCase("a circle on a white background", "red", "red", lambda j: j["color"] == "red",
                 "circle+white", lambda j: j["shape"] == "circle" and j["background"] == "white"),
    NegativeCase("a blue shape on a gray background", "circle", "circle", lambda j: j["shape"] == "circle",
                 "blue+gray", lambda j: j["color"] == "blue" and j["background"] == "gray"),
    # overlap: the negative shares "red" with the prompt; it should remove circles, not red
    NegativeCase("a red square on a white background", "a red circle", "circle", lambda j: j["shape"] == "circle",
                 "red", lambda j: j["color"] == "red"),
    # the seed notes' contradiction ("bearded man" / "beard"): how much of red survives
    NegativeCase("a red square on a white background", "red", "red", lambda j: j["color"] == "red",
                 "square", lambda j: j["shape"] == "square"),
    NegativeCase("a red circle", "red", "red", lambda j: j["color"] == "red",
                 "circle", lambda j: j["shape"] == "circle"),
]

# name -> processing fields; each runs every case with the negative prompt
SETTINGS: dict[str, dict] = {
    "CFG": {},
    "Perp-Neg": {"guidance": "Perp-Neg"},
    "Perp-Neg channel": {"guidance": "Perp-Neg channel"},
    "Perp-Neg pixel": {"guidance": "Perp-Neg pixel"},
    "CFG, negative from 0.3": {"negative_start": 0.3},
    "Perp-Neg, negative from 0.3": {"guidance": "Perp-Neg", "negative_start": 0.3},
    "Perp-Neg pixel, weight 2": {"guidance": "Perp-Neg pixel", "negative_weight": 2.0},
    "CFG, negative weight 0.5": {"negative_weight": 0.5},
    "CFG, negative weight 2": {"negative_weight": 2.0},
    "CFG, guidance interval 0-0.7": {"guidance_interval": (0.0, 0.7)},
    "CFG, rescale 0.7": {"cfg_rescale": 0.7},
    "CFG, NGMS 1": {"s_min_uncond": 1.0},
}


def generate(model, prompt: str, negative: str, n_seeds: int, seed0: int = 0, steps: int = 20, cfg: float = 7.0,
             **fields) -> list[np.ndarray]:
    """n_seeds images (seeds seed0 .. seed0 + n - 1) through the engine, as uint8 arrays."""
    from modules import processing

    batch = next(b for b in (8, 5, 4, 2, 1) if n_seeds % b == 0)
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=cfg, seed=seed0, sampler_name="DDIM",
        width=model.default_size, height=model.default_size, batch_size=batch, n_iter=n_seeds // batch,
        do_not_save_samples=True, **fields)
    return [np.asarray(im) for im in processing.process_images(model, p).images]


def generate_judged(model, prompt: str, negative: str, n_seeds: int, seed0: int = 0, **fields) -> list[Judgement]:
    """`generate`'s images, judged from pixels."""
    return [S.judge(im) for im in generate(model, prompt, negative, n_seeds, seed0, **fields)]


def rate(judged: list[Judgement], predicate) -> float:
    return float(np.mean([predicate(j) for j in judged]))


def report(model_dir: Path, n_seeds: int = 40, settings: list[str] | None = None, seed0: int = 0) -> dict:
    """{case: {"without": {...}, "<setting>": {named rate, removal, keep rate}}} for every case and setting."""
    from modules import sd_models

    model = sd_models.load_model(model_dir, device="cpu")
    out = {}
    for case in CASES:
        without = generate_judged(model, case.prompt, "", n_seeds, seed0)
        base_named = rate(without, case.is_named)
        row = {"without": {"named_rate": base_named, "keep_rate": rate(without, case.is_kept)}}
        for name in settings or SETTINGS:
            judged = generate_judged(model, case.prompt, case.negative, n_seeds, seed0, **SETTINGS[name])
            named = rate(judged, case.is_named)
            row[name] = {"named_rate": named, "removal": (1 - named / base_named) if base_named else None,
                         "keep_rate": rate(judged, case.is_kept)}
        out[f"{case.prompt} | negative: {case.negative}"] = {"named": case.named, "kept": case.kept, **row}
    return out


def format_tables(res: dict) -> str:
    """Markdown: one table per case, one row per setting."""
    lines = []
    for case, row in res.items():
        lines += [f"**{case}** (named: {row['named']}, kept: {row['kept']})", "",
                  f"| setting | {row['named']} rate | removal | {row['kept']} kept |", "|---|---|---|---|"]
        w = row["without"]
        lines.append(f"| no negative prompt | {w['named_rate']:.2f} | - | {w['keep_rate']:.2f} |")
        for name, v in row.items():
            if name in ("named", "kept", "without"):
                continue
            removal = "-" if v["removal"] is None else f"{v['removal']:.2f}"
            lines.append(f"| {name} | {v['named_rate']:.2f} | {removal} | {v['keep_rate']:.2f} |")
        lines.append("")
    return "\n".join(lines)
