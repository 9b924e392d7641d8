#!/usr/bin/env python
"""Evaluate a tiny-shapes model from pixels (issue 11).

    python training/evaluate.py all --model models/Stable-diffusion/tiny-shapes
    python training/evaluate.py prompts --model DIR --seeds 4
    python training/evaluate.py negatives --model DIR --neg-seeds 40
    python training/evaluate.py schedule --model DIR --neg-seeds 40
    python training/evaluate.py samplers --model DIR --seeds 1 [--sampler "Euler a" ...]
    python training/evaluate.py rules --model DIR --neg-seeds 40 [--setting Perp-Neg ...] [--case PROMPT ...]
    python training/evaluate.py verdict --model DIR --verdict-seeds 20

Every image is made by ``generate()`` (DDIM, 20 steps, CFG 7, initial latents
``torch.randn((4,16,16), generator=torch.Generator('cpu').manual_seed(seed))``) and judged
by ``shapes.judge`` (background from the border, object mask, colour from the mask's
median, shape from how the object fills its bounding box).

Reports:
  prompts    the 45 fully specified prompts ``a {color} {shape} on a {background} background``,
             N seeds each: colour / shape / background accuracy; contact sheet PNG (seed 0)
  negatives  ``a circle on a white background`` without / with negative ``red``;
             ``a blue shape on a gray background`` without / with negative ``circle``
  schedule   ``a [red:blue:0.1] square on a black background`` (prompt editing, A1111 syntax)
  rules      removal / keep rates of the negative prompt per guidance rule (training/negatives.py);
             with --setting / --case only those rows run, merged into the existing eval_rules.json
  verdict    the model's own verdict (modules/negative_verdict.py) against the pixel judge: ROC AUC of
             the verdict's score for "the image shows what the negative names", colour and shape
  samplers   every sampler of the registry through the engine (process_images), 20 steps, on the
             45 prompts: colour / shape accuracy per sampler (issue 6: >= 90%); not part of ``all``
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes as S  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "Stable-diffusion" / "tiny-shapes"

# ----------------------------------------------------------------------------- generation
_PIPES: dict = {}


PRECISION = {"name": "float32"}  # --precision: "bf16" runs the UNet and text encoder in bfloat16 (issue 21)


def load_pipeline(model_dir):
    """diffusers StableDiffusionPipeline from the folder (local files only), DDIM, float32; with
    `--precision bf16` its UNet and text encoder compute in bfloat16, the sampler stays float32
    (modules/sd_precision.cast_modules, what the engine does)."""
    key = str(Path(model_dir).resolve())
    if key not in _PIPES:
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(
            key, torch_dtype=torch.float32, local_files_only=True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if PRECISION["name"] == "bf16":
            sys.path.insert(0, str(REPO))
            from modules import sd_precision
            bf16 = sd_precision.PrecisionOptions(unet_dtype=torch.bfloat16, text_dtype=torch.bfloat16)
            sd_precision.cast_modules(pipe.unet, pipe.vae, [pipe.text_encoder], bf16, "cpu")
        _PIPES[key] = pipe
    return _PIPES[key]


_SCHED = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):\s*([0-9]*\.?[0-9]+)\s*\]")


def prompt_at_steps(prompt: str, steps: int) -> list[str]:
    """The text in force at each sampling step for ``[from:to:when]`` prompt editing.

    ``when`` < 1 is a fraction of the steps, otherwise a step number (as in A1111): the
    ``to`` text is used from step int(when * steps) on.
    """
    out = []
    for i in range(steps):
        def sub(m):
            when = float(m.group(3))
            at = int(when * steps) if when < 1 else int(when)
            return m.group(2) if i >= at else m.group(1)
        out.append(re.sub(r"\s+", " ", _SCHED.sub(sub, prompt)).strip())
    return out


def initial_latents(seeds):
    return torch.stack([torch.randn((4, 16, 16), generator=torch.Generator("cpu").manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def generate(model_dir, prompts, negative_prompts=None, seeds=None, steps=20, cfg=7.0,
             batch_size=48) -> list[np.ndarray]:
    """Generate one 64x64 image per (prompt, negative prompt, seed); uint8 HxWx3 arrays.

    The single entry point for every report (a later change routes it through the
    project's engine).  Prompt editing ``[a:b:when]`` is applied by switching the prompt
    embeddings between steps.
    """
    n = len(prompts)
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * n
    negative_prompts = [p or "" for p in negative_prompts]
    seeds = list(seeds) if seeds is not None else list(range(n))
    assert len(negative_prompts) == n and len(seeds) == n
    pipe = load_pipeline(model_dir)
    images = []
    for s0 in range(0, n, batch_size):
        sl = slice(s0, min(n, s0 + batch_size))
        ps, ns, ss = prompts[sl], negative_prompts[sl], seeds[sl]
        per_step = [prompt_at_steps(p, steps) for p in ps]      # [B][steps]
        texts = {t for row in per_step for t in row}
        emb = {}
        for t in texts:
            e, _ = pipe.encode_prompt(t, "cpu", 1, False)
            emb[t] = e[0].float()
        neg = {}
        for t in set(ns):
            e, _ = pipe.encode_prompt(t, "cpu", 1, False)
            neg[t] = e[0].float()
        neg_e = torch.stack([neg[t] for t in ns])

        def pos_at(i):
            return torch.stack([emb[row[i]] for row in per_step])

        scheduled = any(len(set(row)) > 1 for row in per_step)

        def on_step_end(p, i, t, kw):
            if i + 1 < steps and any(row[i + 1] != row[i] for row in per_step):
                kw["prompt_embeds"] = torch.cat([neg_e, pos_at(i + 1)])
            return kw

        out = pipe(prompt_embeds=pos_at(0), negative_prompt_embeds=neg_e,
                   latents=initial_latents(ss), num_inference_steps=steps, guidance_scale=cfg,
                   height=64, width=64, output_type="np",
                   callback_on_step_end=on_step_end if scheduled else None,
                   callback_on_step_end_tensor_inputs=["prompt_embeds"])
        imgs = np.clip(np.round(out.images * 255), 0, 255).astype(np.uint8)
        images.extend(list(imgs))
    return images


# ----------------------------------------------------------------------------- reports
def report_prompts(model, n_seeds=4, sheet=None, seed0=0):
    combos = [(c, s, b) for c in S.COLOR_NAMES for s in S.SHAPES for b in S.BACKGROUND_NAMES]
    prompts, seeds, truth = [], [], []
    for c, s, b in combos:
        for k in range(n_seeds):
            prompts.append(S.full_prompt(c, s, b))
            seeds.append(seed0 + k)
            truth.append((c, s, b))
    imgs = generate(model, prompts, None, seeds)
    judged = [S.judge(im) for im in imgs]
    acc = {}
    for key, idx in (("color", 0), ("shape", 1), ("background", 2)):
        acc[key] = float(np.mean([j[key] == t[idx] for j, t in zip(judged, truth)]))
    acc["all_three"] = float(np.mean([(j["color"], j["shape"], j["background"]) == t
                                      for j, t in zip(judged, truth)]))
    conf = {}
    for j, t in zip(judged, truth):
        if j["background"] != t[2]:
            k = f"{t[2]}->{j['background']}"
            conf[k] = conf.get(k, 0) + 1
    per_shape = {s: float(np.mean([j["shape"] == t[1] for j, t in zip(judged, truth) if t[1] == s]))
                 for s in S.SHAPES}
    res = dict(prompts=len(combos), seeds_per_prompt=n_seeds, images=len(imgs), accuracy=acc,
               shape_accuracy_by_shape=per_shape, background_confusions=conf)
    if sheet:
        first = [imgs[i * n_seeds] for i in range(len(combos))]
        contact_sheet(first, combos, sheet)
        res["contact_sheet"] = str(sheet)
    return res


def contact_sheet(imgs, combos, path, scale=2):
    """Rows: colours; columns: shape x background (seed 0)."""
    cols = [(s, b) for s in S.SHAPES for b in S.BACKGROUND_NAMES]
    tile, pad, head, left = 64 * scale, 4, 28, 52
    w = left + len(cols) * (tile + pad)
    h = head + len(S.COLOR_NAMES) * (tile + pad)
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for ci, (s, b) in enumerate(cols):
        d.text((left + ci * (tile + pad) + 2, 2), s, fill=(0, 0, 0))
        d.text((left + ci * (tile + pad) + 2, 14), b, fill=(90, 90, 90))
    for ri, c in enumerate(S.COLOR_NAMES):
        d.text((2, head + ri * (tile + pad) + tile // 2 - 6), c, fill=(0, 0, 0))
    for im, (c, s, b) in zip(imgs, combos):
        ri, ci = S.COLOR_NAMES.index(c), cols.index((s, b))
        t = Image.fromarray(im).resize((tile, tile), Image.NEAREST)
        sheet.paste(t, (left + ci * (tile + pad), head + ri * (tile + pad)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _rates(imgs, pred):
    return float(np.mean([pred(S.judge(im)) for im in imgs]))


def report_negatives(model, n_seeds=40, seed0=0):
    seeds = [seed0 + k for k in range(n_seeds)]
    res = {}
    cases = [
        ("a circle on a white background", "red",
         lambda j: j["color"] == "red" and j["shape"] == "circle",
         lambda j: j["shape"] == "circle" and j["background"] == "white", "red circle", "circle+white"),
        ("a blue shape on a gray background", "circle",
         lambda j: j["shape"] == "circle",
         lambda j: j["color"] == "blue" and j["background"] == "gray", "circle", "blue+gray"),
    ]
    for prompt, negative, named, keep, named_desc, keep_desc in cases:
        imgs = generate(model, [prompt] * (2 * n_seeds), [""] * n_seeds + [negative] * n_seeds,
                        seeds + seeds)
        without, with_ = imgs[:n_seeds], imgs[n_seeds:]
        r0, r1 = _rates(without, named), _rates(with_, named)
        red0 = _rates(without, lambda j: j["color"] == "red") if negative == "red" else None
        red1 = _rates(with_, lambda j: j["color"] == "red") if negative == "red" else None
        res[f"{prompt} | -{negative}"] = dict(
            seeds=n_seeds, named=named_desc, rate_without_negative=r0, rate_with_negative=r1,
            removal=(1 - r1 / r0) if r0 > 0 else None, kept=keep_desc,
            keep_rate_with_negative=_rates(with_, keep), keep_rate_without_negative=_rates(without, keep),
            **({"red_rate_without": red0, "red_rate_with": red1} if red0 is not None else {}))
    return res


def report_schedule(model, n_seeds=40, seed0=0):
    prompt = "a [red:blue:0.1] square on a black background"
    seeds = [seed0 + k for k in range(n_seeds)]
    imgs = generate(model, [prompt] * n_seeds, None, seeds)
    ref = generate(model, ["a red square on a black background"] * n_seeds, None, seeds)
    return {prompt: dict(
        seeds=n_seeds, switch="red for steps 0-1, blue from step 2 of 20",
        blue_rate=_rates(imgs, lambda j: j["color"] == "blue"),
        red_rate=_rates(imgs, lambda j: j["color"] == "red"),
        square_rate=_rates(imgs, lambda j: j["shape"] == "square"),
        black_rate=_rates(imgs, lambda j: j["background"] == "black"),
        blue_rate_plain_red_prompt=_rates(ref, lambda j: j["color"] == "blue"))}


def report_samplers(model, n_seeds=1, seed0=0, steps=20, names=None):
    """Issue 6: each sampler of the registry (Automatic schedule type), through the project's engine
    (process_images, CFG 7, `steps` steps), on the 45 fully specified prompts: colour / shape accuracy.
    Rows are keyed by sampler name, with the step count when it is not 20."""
    sys.path.insert(0, str(REPO))
    from modules import processing, sd_models, sd_samplers
    sd = sd_models.load_model(model, device="cpu")
    combos = [(c, s, b) for c in S.COLOR_NAMES for s in S.SHAPES for b in S.BACKGROUND_NAMES]
    res = {}
    for name in names or [d.name for d in sd_samplers.all_samplers]:
        t0, judged = time.time(), []
        for c, s, b in combos:
            p = processing.StableDiffusionProcessingTxt2Img(
                prompt=S.full_prompt(c, s, b), steps=steps, cfg_scale=7.0, seed=seed0, batch_size=n_seeds,
                width=sd.default_size, height=sd.default_size, sampler_name=name, do_not_save_samples=True)
            judged += [(S.judge(np.asarray(im)), (c, s)) for im in processing.process_images(sd, p).images]
        res[name if steps == 20 else f"{name}, {steps} steps"] = dict(
            sampler=name, steps=steps, seeds_per_prompt=n_seeds,
            color=float(np.mean([j["color"] == t[0] for j, t in judged])),
            shape=float(np.mean([j["shape"] == t[1] for j, t in judged])),
            color_and_shape=float(np.mean([(j["color"], j["shape"]) == t for j, t in judged])),
            images=len(judged), seconds=round(time.time() - t0, 1))
    return dict(per_sampler=res)


def merge_sampler_rows(old: dict, new: dict, command: str) -> dict:
    """Runs of the samplers report add rows (a sampler at another step count) to one file.
    `passed`: every sampler reaches 90% colour-and-shape at some step count in 20-30."""
    rows = dict(old.get("per_sampler", {}))
    for key, row in new["per_sampler"].items():
        rows[key] = dict(row, command=command)
    usual = [row for row in rows.values() if 20 <= row["steps"] <= 30]
    return dict(per_sampler=rows, passed=all(
        any(r["color_and_shape"] >= 0.9 for r in usual if r["sampler"] == name) for name in {r["sampler"] for r in usual}))


VERDICT_SETS = {  # prompts (seeds 100..) whose images are judged, and the negatives that name the attribute
    "colour": (["a circle on a white background", "a red shape on a gray background", "a green square",
                "a blue shape on a white background", "a yellow circle on a black background", "a purple triangle"],
               list(S.COLOR_NAMES), "color"),
    "shape": (["a blue shape on a gray background", "a red circle", "a green square on a gray background",
               "a blue triangle on a white background", "a yellow shape on a black background"], list(S.SHAPES), "shape"),
}


def report_verdict(model_dir, n_seeds=20, seed0=100):
    """The verdict against the pixel judge. Images of the prompts of VERDICT_SETS (some leave the colour or
    the shape open, as the rules table's cases do; the others name each value, so that every word has
    images that show it), `n_seeds` seeds each (DDIM 20, CFG 7, no negative), are judged from pixels and
    scored by the verdict for each colour (shape) word as the negative: ROC AUC of the score for "the
    image has that colour (shape)", per word and pooled over the words. Seeds 100.. (the verdict's noise
    levels were chosen on seeds 1000..)."""
    sys.path.insert(0, str(REPO))
    import negatives as N
    from modules import negative_verdict as V
    from modules import sd_models
    sd = sd_models.load_model(model_dir, device="cpu")
    out = dict(seeds=n_seeds, seed0=seed0, timesteps=list(V.DEFAULT_TIMESTEPS),
               noise_per_level=V.DEFAULT_NOISE_PER_LEVEL)
    for kind, (prompts, words, attribute) in VERDICT_SETS.items():
        images, judged = [], []
        for prompt in prompts:
            arrays = N.generate(sd, prompt, "", n_seeds, seed0)
            images += [Image.fromarray(a) for a in arrays]
            judged += [S.judge(a) for a in arrays]
        t0, per_word, pooled_s, pooled_l, cost = time.time(), {}, [], [], 0
        for word in words:
            verdicts = V.score_images(sd, images, [word] * len(images), 1)
            scores = [v["score"] for v in verdicts]
            labels = [j[attribute] == word for j in judged]
            cost += sum(v["unet_evaluations"] for v in verdicts)
            per_word[word] = dict(auc=V.roc_auc(scores, labels), positives=int(sum(labels)), images=len(labels))
            pooled_s += scores
            pooled_l += labels
        aucs = [w["auc"] for w in per_word.values() if w["auc"] is not None]
        out[kind] = dict(prompts=prompts, images=len(images), per_word=per_word, auc_pooled=V.roc_auc(pooled_s, pooled_l),
                         auc_mean_over_words=float(np.mean(aucs)) if aucs else None,
                         unet_evaluations_per_image=cost // (len(images) * len(words)),
                         seconds_per_verdict=round((time.time() - t0) / (len(images) * len(words)), 3))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", choices=["prompts", "negatives", "schedule", "samplers", "rules", "verdict", "all"])
    ap.add_argument("--setting", action="append", help="rules report: only these settings of training/negatives.py")
    ap.add_argument("--case", action="append", help="rules report: only these cases (prompt, or 'prompt | negative: x')")
    ap.add_argument("--verdict-seeds", type=int, default=20, help="verdict report: seeds per prompt")
    ap.add_argument("--sampler", action="append", help="samplers report: only these (default: all)")
    ap.add_argument("--steps", type=int, default=20, help="samplers report: sampling steps")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--seeds", type=int, default=4, help="seeds per fully specified prompt")
    ap.add_argument("--neg-seeds", type=int, default=40, help="seeds per negative / schedule case")
    ap.add_argument("--sheet", default=None, help="contact sheet PNG (default MODEL/contact_sheet.png)")
    ap.add_argument("--json", default=None, help="write the figures here (default MODEL/eval.json)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                    help="bf16: bfloat16 UNet and text encoder, float32 sampler (modules/sd_precision.py)")
    args = ap.parse_args(argv)
    PRECISION["name"] = args.precision
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Path(args.model)
    t0 = time.time()
    res = dict(model=str(model), sampler="DDIM 20 steps, CFG 7", judge="training/shapes.py:judge")
    if args.report in ("prompts", "all"):
        res["prompts"] = report_prompts(model, args.seeds, args.sheet or model / "contact_sheet.png")
    if args.report in ("negatives", "all"):
        res["negatives"] = report_negatives(model, args.neg_seeds)
    if args.report in ("schedule", "all"):
        res["schedule"] = report_schedule(model, args.neg_seeds)
    if args.report == "samplers":  # not part of "all": 13 samplers x 45 prompts is long on a CPU
        res["samplers"] = report_samplers(model, args.seeds, steps=args.steps, names=args.sampler)
    res["command"] = "python training/evaluate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.json) if args.json else model / {"samplers": "eval_samplers.json", "rules": "eval_rules.json",
                                                     "verdict": "eval_verdict.json"}.get(args.report, "eval.json")
    if args.report == "rules":  # issue 9: removal / keep rates of each negative-guidance setting, via the engine
        import negatives
        partial = bool(args.setting or args.case)
        old = json.loads(out.read_text()) if partial and out.exists() else {}
        commands = [*old.get("commands", [old["command"]] if "command" in old else []), res["command"]]

        def write(rules):  # after each case, so an interrupted run keeps what it measured
            merged = negatives.merge(old.get("rules", {}), rules)
            out.write_text(json.dumps(dict(res, rules=merged, targets=negatives.targets(merged), commands=commands,
                                           seconds=round(time.time() - t0, 1)), indent=1) + "\n")
            return merged

        done = {}
        negatives.report(model, args.neg_seeds, settings=args.setting, cases=args.case,
                         on_case=lambda key, row: write({**done, key: done.setdefault(key, row)}))
        res["rules"] = write(done)
        res["targets"] = negatives.targets(res["rules"])
        res["commands"] = commands
        print(negatives.format_tables(res["rules"]))
    if args.report == "verdict":
        res["verdict"] = report_verdict(model, args.verdict_seeds)
    res["seconds"] = round(time.time() - t0, 1)
    if args.report == "samplers":
        old = json.loads(out.read_text()).get("samplers", {}) if out.exists() else {}
        res["samplers"] = merge_sampler_rows(old, res["samplers"], res["command"])
    print(json.dumps(res, indent=1))
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
