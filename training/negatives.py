"""Did the negative prompt do its job? Removal and keep rates per guidance rule, judged from pixels.

For each case the same seeds run without and with the negative prompt, through the
project's own engine (`process_images`, DDIM 20 steps, CFG 7 unless the setting says
otherwise). The *removal rate* is how much the attribute the negative names dropped against
no negative (1 - rate_with / rate_without); the *keep rate* is how often the rest of the
prompt survived with the negative; *kept of kept* is, among the seeds whose image had the rest
of the prompt right without the negative, how many still have it with the negative (the same
seed, so the same starting noise). "Without" is plain CFG at the setting's CFG scale with an
empty negative prompt (for NAG at CFG 1: CFG 1, which is also NAG with an empty negative).

Cases come in two groups: negatives that name something the prompt leaves open or also names
(the first block), and *unrelated* negatives, which name something the prompt does not ask for
(`a red circle on a white background` / `blue`): there the negative should change nothing.
Called by `training/evaluate.py rules` (and `verdict`, for the images it scores).
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


def _all_of(color: str, shape: str, background: str) -> Callable[[Judgement], bool]:
    return lambda j: (j["color"], j["shape"], j["background"]) == (color, shape, background)


# unrelated negatives: what the negative names is not asked for; the prompt should be kept as it is without it
UNRELATED = [
    NegativeCase("a red circle on a white background", "blue", "blue", lambda j: j["color"] == "blue",
                 "red+circle+white", _all_of("red", "circle", "white")),
    NegativeCase("a green square on a black background", "circle", "circle", lambda j: j["shape"] == "circle",
                 "green+square+black", _all_of("green", "square", "black")),
    NegativeCase("a blue circle on a gray background", "triangle", "triangle", lambda j: j["shape"] == "triangle",
                 "blue+circle+gray", _all_of("blue", "circle", "gray")),
    NegativeCase("a purple square on a gray background", "black background", "black background",
                 lambda j: j["background"] == "black", "purple+square+gray", _all_of("purple", "square", "gray")),
]
ALL_CASES = CASES + UNRELATED


def case_key(case: NegativeCase) -> str:
    return f"{case.prompt} | negative: {case.negative}"

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
    # the second set of rules; their hyperparameters were tuned on seeds 1000-1015, disjoint from the
    # evaluation's 0-39 (NAG's on the red case at CFG 1 and the circle case at CFG 7, Dynamic negative's
    # on the red and circle cases)
    "NAG, CFG 1": {"cfg_scale": 1.0, "nag_scale": 5.0},
    "CFG + NAG": {"nag_scale": 3.0, "nag_tau": 4.0, "nag_alpha": 0.75},
    "Perp-Neg + NAG": {"guidance": "Perp-Neg", "nag_scale": 3.0, "nag_tau": 4.0, "nag_alpha": 0.75},
    "Dynamic negative": {"guidance": "Dynamic negative", "dng_prior": 0.5, "dng_temperature": 1.0, "dng_offset": 0.0,
                         "dng_scale": 6.0},
    "Dynamic negative + NAG": {"guidance": "Dynamic negative", "dng_prior": 0.5, "dng_temperature": 1.0,
                               "dng_offset": 0.0, "dng_scale": 6.0, "nag_scale": 3.0, "nag_tau": 4.0,
                               "nag_alpha": 0.75},
    # issue 20's second round, tuned on seeds 1000-1011 (disjoint from the evaluation's 0-39): NAG's scale follows
    # the Dynamic negative posterior (nag_follows_dng), so an unrelated negative, whose posterior falls at once,
    # loses its attention-space push too; p max 0.5 (the prior) stops the posterior's spikes above its start
    "Dynamic negative + NAG following its posterior": {
        "guidance": "Dynamic negative", "dng_prior": 0.5, "dng_temperature": 1.0, "dng_offset": 0.0, "dng_scale": 6.0,
        "dng_p_max": 0.5, "nag_scale": 3.0, "nag_tau": 4.0, "nag_alpha": 0.75, "nag_follows_dng": True},
    # NAG at CFG 1 with the paper's alpha for distilled models (0.25) instead of 0.5
    "NAG, CFG 1, alpha 0.25": {"cfg_scale": 1.0, "nag_scale": 5.0, "nag_alpha": 0.25},
    # issue 20's third round: a CFG-distilled model (the embedded model + the LoRA of training/train_cfg_distill.py,
    # which samples at CFG 1 what the base model samples at CFG 7), where NAG is the negative's only way in; NAG's
    # settings tuned on seeds 1000-1015 (the red and triangle cases), disjoint from the evaluation's 0-39
    "NAG, CFG 1, CFG-distilled LoRA": {"cfg_scale": 1.0, "lora": "tiny-shapes-cfg-distill:1", "nag_scale": 3.0,
                                       "nag_tau": 1.5, "nag_alpha": 0.35},
    "APG": {"guidance": "APG"},
    "Dynamic thresholding, mimic 4": {"guidance": "Dynamic thresholding", "dynthres_mimic_scale": 4.0},
}
NEW_SETTINGS = ["NAG, CFG 1", "CFG + NAG", "Perp-Neg + NAG", "Dynamic negative", "Dynamic negative + NAG", "APG",
                "Dynamic thresholding, mimic 4", "Dynamic negative + NAG following its posterior",
                "NAG, CFG 1, alpha 0.25", "NAG, CFG 1, CFG-distilled LoRA"]


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


def compare(case: NegativeCase, without: list[Judgement], judged: list[Judgement]) -> dict:
    """One row of a table: named rate, removal against `without`, keep rate, kept of kept (paired by seed)."""
    base_named = rate(without, case.is_named)
    named = rate(judged, case.is_named)
    kept_before = [case.is_kept(j) for j in without]
    pairs = [case.is_kept(j) for j, before in zip(judged, kept_before) if before]
    return {"named_rate": named, "removal": (1 - named / base_named) if base_named else None,
            "keep_rate": rate(judged, case.is_kept), "kept_of_kept": float(np.mean(pairs)) if pairs else None,
            "named_per_seed": [bool(case.is_named(j)) for j in judged],
            "kept_per_seed": [bool(case.is_kept(j)) for j in judged]}


def report(model_dir: Path, n_seeds: int = 40, settings: list[str] | None = None, seed0: int = 0,
           cases: list[str] | None = None, on_case: Callable[[str, dict], None] | None = None) -> dict:
    """{case: {"named", "kept", "group", "without" (CFG 7), "without, CFG c" (other scales), "<setting>": row}}.

    `cases`: case keys or prompts to run (default: all); `on_case(key, row)` is called after each
    case (the evaluation writes its JSON there, so an interrupted run keeps what it measured)."""
    from modules import sd_models

    model = sd_models.load_model(model_dir, device="cpu")
    out = {}
    for case in ALL_CASES:
        key = case_key(case)
        if cases and key not in cases and case.prompt not in cases:
            continue
        baselines: dict[tuple[float, str | None], list[Judgement]] = {}
        row = {"named": case.named, "kept": case.kept, "group": "unrelated" if case in UNRELATED else "named"}
        for name in settings or SETTINGS:
            fields = dict(SETTINGS[name])
            cfg = float(fields.pop("cfg_scale", 7.0))
            lora = fields.pop("lora", None)  # "name:weight": a LoRA for the prompt, with and without the negative
            prompt = case.prompt + (f" <lora:{lora}>" if lora else "")
            if (cfg, lora) not in baselines:
                baselines[cfg, lora] = w = generate_judged(model, prompt, "", n_seeds, seed0, cfg=cfg)
                label = "without" if cfg == 7.0 else f"without, CFG {cfg:g}"
                row[label + (f", <lora:{lora}>" if lora else "")] = {
                    "cfg_scale": cfg, "named_rate": rate(w, case.is_named), "keep_rate": rate(w, case.is_kept),
                    "named_per_seed": [bool(case.is_named(j)) for j in w],
                    "kept_per_seed": [bool(case.is_kept(j)) for j in w]}
            judged = generate_judged(model, prompt, case.negative, n_seeds, seed0, cfg=cfg, **fields)
            row[name] = {"cfg_scale": cfg, **compare(case, baselines[cfg, lora], judged)}
        out[key] = row
        if on_case:
            on_case(key, row)
    return out


def merge(old: dict, new: dict) -> dict:
    """Rows of a new run replace the same (case, setting) rows of an earlier one; the others stay."""
    merged = {case: dict(rows) for case, rows in old.items()}
    for case, rows in new.items():
        merged.setdefault(case, {}).update(rows)
    return merged


def is_row(name: str, value) -> bool:
    return isinstance(value, dict) and not name.startswith("without")


def format_tables(res: dict) -> str:
    """Markdown: one table per case, one row per setting (and one per baseline CFG scale)."""
    lines = []
    for group, title in (("named", None), ("unrelated", "Unrelated negatives (the negative names what the prompt does "
                                                         "not ask for; *kept of kept*: of the seeds whose image has "
                                                         "what the prompt asks without the negative, the share that "
                                                         "still has it with it)")):
        cases = [(c, r) for c, r in res.items() if r.get("group", "named") == group]
        if cases and title:
            lines += [f"*{title}*", ""]
        for case, row in cases:
            lines += [f"**{case}** (named: {row['named']}, kept: {row['kept']})", "",
                      f"| setting | {row['named']} rate | removal | {row['kept']} kept | kept of kept |",
                      "|---|---|---|---|---|"]
            for name, v in row.items():
                if isinstance(v, dict) and name.startswith("without"):
                    label = "no negative prompt" + ("" if name == "without" else name[len("without"):])
                    lines.append(f"| {label} | {v['named_rate']:.2f} | - | {v['keep_rate']:.2f} | - |")
            for name, v in row.items():
                if not is_row(name, v):
                    continue
                removal = "-" if v["removal"] is None else f"{v['removal']:.2f}"
                kk = "-" if v.get("kept_of_kept") is None else f"{v['kept_of_kept']:.2f}"
                lines.append(f"| {name} | {v['named_rate']:.2f} | {removal} | {v['keep_rate']:.2f} | {kk} |")
            lines.append("")
    return "\n".join(lines)


def targets(res: dict) -> dict:
    """The issue's targets, per setting, from a rules report (None where a case was not run).

    red: `a circle on a white background` / `red`: removal >= 0.9 and circle+white kept >= 0.9;
    circle: `a blue shape on a gray background` / `circle`: removal >= 0.9 and blue+gray kept >= 0.9;
    unrelated: kept of kept >= 0.95 in every unrelated case."""
    red = res.get("a circle on a white background | negative: red", {})
    circle = res.get("a blue shape on a gray background | negative: circle", {})
    unrelated = [r for r in res.values() if r.get("group") == "unrelated"]
    names = dict.fromkeys(n for r in res.values() for n, v in r.items() if is_row(n, v))
    out = {}
    for name in names:
        def met(row, removal=0.9, keep=0.9):
            v = row.get(name)
            if v is None or v.get("removal") is None:
                return None
            return bool(v["removal"] >= removal and v["keep_rate"] >= keep)
        kk = [r[name].get("kept_of_kept") for r in unrelated if name in r]
        out[name] = {"red": met(red), "circle": met(circle),
                     "unrelated": (bool(all(k is not None and k >= 0.95 for k in kk)) if kk else None),
                     "unrelated_min_kept_of_kept": min((k for k in kk if k is not None), default=None)}
    return out
