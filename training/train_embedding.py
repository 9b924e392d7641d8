#!/usr/bin/env python
"""Train a textual-inversion embedding for a loaded model, on the CPU (AUTOMATIC1111's "Train" tab, simplified).

The model stays frozen; only the N vectors of the embedding learn. Each step takes a batch of
training images (as latents), noises them at random timesteps and asks the UNet to predict the
noise from a caption in which the embedding's name stands for what the images have in common
(`[name]` in the template; `[filewords]` is the image's own caption). The loss is the plain
epsilon MSE, as AUTOMATIC1111's; its gradient reaches the vectors through the text encoder.

Data: a folder of images with caption `.txt` files beside them (`cat1.png` + `cat1.txt`), or,
for the embedded model, the procedural shapes of `training/shapes.py` (`--shapes circle`: one
shape in every colour on every background; the captions name the colour and the background and
let `[name]` stand for the shape).

Deterministic: step k's images, timesteps and noise come from a generator seeded by (seed, k),
so a run that was stopped and resumed (`--resume`) ends with the same vectors as one that was
not. The state (vectors, optimiser, step) is saved under `--work-dir` every `--save-every` steps
and when stopped. The result is written in AUTOMATIC1111's `.safetensors` form (`emb_params`, with
name, step, sd_checkpoint and sd_checkpoint_name as metadata) to `--out`.

    python training/train_embedding.py --name circleness --shapes circle --vectors 4 --steps 400
    python training/train_embedding.py --name mycat --data photos/ --template "a photo of [name], [filewords]"

`train_embedding(model, name, data, steps, ...)` is the same as a function, for the job queue
(AUTOMATIC1111's POST /sdapi/v1/train/embedding): it reports each step to `progress_callback`
and stops, saving what it has, when `should_stop()` says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "training"))

from modules import textual_inversion as ti  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_TEMPLATE = "[name], [filewords]"


# -- data ---------------------------------------------------------------------------------------
@dataclass
class ShapesData:
    """The embedded model's procedural training images of one shape (or several: "square,triangle"),
    every colour on every background equally often (training/shapes.py).

    Captions follow the model's own caption styles with `[name]` in the shape's place; the
    colour and background words are kept (or dropped, as in the model's training), so the
    vectors learn the shape and nothing else.
    """

    shape: str = "circle"
    pool: int = 480
    seed: int = 0
    templates: tuple[str, ...] = ("[name]", "a [name]", "a [color] [name]", "a [name] on a [background] background",
                                  "a [color] [name] on a [background] background", "[color], [name]",
                                  "[name], [background] background", "[color], [name], [background] background")

    def examples(self) -> list[tuple[np.ndarray, dict]]:
        import shapes as S

        out, k = [], 0
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 17]))
        while len(out) < self.pool:
            a = S.sample_attrs(rng)
            # every colour x background equally often
            a["color"] = S.COLOR_NAMES[k % len(S.COLOR_NAMES)]
            a["background"] = S.BACKGROUND_NAMES[(k // len(S.COLOR_NAMES)) % len(S.BACKGROUND_NAMES)]
            shapes = self.shape.split(",")
            a["shape"] = shapes[(k // (len(S.COLOR_NAMES) * len(S.BACKGROUND_NAMES))) % len(shapes)]
            out.append((S.render(a["color"], a["shape"], a["background"], a["side"], a["x"], a["y"]), a))
            k += 1
        return out


# Prompts for the images a negative embedding must leave (the `keep_data` of train_embedding): they say what
# the image shows except its shape, in the model's caption styles.
KEEP_TEMPLATES = ("a [color] shape on a [background] background", "a shape on a [background] background",
                  "a [color] shape", "[color], [background] background", "[color] shape, [background] background")


# (prompt, the same prompt naming a shape) pairs of the contrast objective; [shape] is filled in.
CONTRAST_TEMPLATES = (("a [color] shape on a [background] background", "a [color] [shape] on a [background] background"),
                      ("a shape on a [background] background", "a [shape] on a [background] background"),
                      ("a [color] shape", "a [color] [shape]"),
                      ("[color], [background] background", "[color], [shape], [background] background"))


@dataclass
class Contrast:
    """The contrast objective of train_embedding (this project's, for negative embeddings): at timesteps in
    `t_range`, the embedding's prediction is trained towards the prompt's prediction moved `strength` times
    the model's own difference between naming `concept` and naming one of `others` in the same prompt,
    `e(prompt) + strength (e(prompt with concept) - e(prompt with other))`. Guidance away from it then
    pushes from `concept` to the others and leaves the rest of the prompt alone. The targets are the
    model's predictions, not noise, so the gradient is steady and a few hundred steps suffice."""

    concept: str = "circle"
    others: tuple[str, ...] = ("square", "triangle")
    strength: float = 1.0
    t_range: tuple[int, int] = (400, 1000)
    templates: tuple[tuple[str, str], ...] = CONTRAST_TEMPLATES
    # "prompt": the target is e(prompt) + strength d; "empty": e("") + strength d, so the vectors need not
    # carry the prompt's colour and background (a negative embedding is used with any prompt)
    base: str = "prompt"


def _caption_for(template: str, name: str, words: dict | str) -> str:
    if isinstance(words, dict):
        text = template
        for key in ("color", "background"):
            text = text.replace(f"[{key}]", str(words.get(key, "")))
        return text.replace("[name]", name).replace("[filewords]", "")
    return template.replace("[name]", name).replace("[filewords]", words).strip(" ,")


def load_folder(folder: Path, size: int, height: int | None = None) -> list[tuple[np.ndarray, str]]:
    """Images of a folder (center-cropped to the aspect of `size` x `height`, default square, and resized to it),
    each with the text of its `.txt` caption."""
    from PIL import Image

    width, height = size, height or size
    items = []
    for p in sorted(Path(folder).rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        im = Image.open(p).convert("RGB")
        cw = min(im.size[0], round(im.size[1] * width / height))
        ch = min(im.size[1], round(cw * height / width))
        left, top = (im.size[0] - cw) // 2, (im.size[1] - ch) // 2
        im = im.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)
        caption_file = p.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        items.append((np.asarray(im, dtype=np.uint8), caption))
    if not items:
        raise ValueError(f"no training images in {folder}")
    return items


@torch.no_grad()
def encode_latents(model, images: list[np.ndarray], batch: int = 64) -> torch.Tensor:
    """uint8 HxWx3 images -> latents as the UNet sees them (VAE posterior mean x scaling factor), float32 CPU."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = x.to(model.device, model.vae.dtype)
        out.append(model.vae.encode(x).latent_dist.mean.float().cpu() * model.scaling_factor)
    return torch.cat(out)


# -- learning rate ------------------------------------------------------------------------------
def parse_learn_rate(spec: float | str, steps: int) -> list[tuple[float, int]]:
    """AUTOMATIC1111's learn-rate syntax: `0.005`, or `0.005:100, 1e-3:1000, 1e-5` (rate until step; the last
    one holds to the end)."""
    if isinstance(spec, (int, float)):
        return [(float(spec), steps)]
    pairs = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        rate, _, until = part.partition(":")
        pairs.append((float(rate), int(until) if until.strip() else steps))
    if not pairs:
        raise ValueError(f"no learning rate in {spec!r}")
    return pairs


def learn_rate_at(schedule: list[tuple[float, int]], step: int) -> float:
    for rate, until in schedule:
        if step < until:
            return rate
    return schedule[-1][0]


# -- training -----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    embedding: ti.Embedding
    path: Path
    steps_done: int
    loss: float
    interrupted: bool
    seconds: float
    losses: list[float] = field(default_factory=list)


def _step_generator(seed: int, step: int, stream: int = 3) -> tuple[np.random.Generator, torch.Generator]:
    """Step `step`'s (numpy, torch) generators, from (seed, stream, step) only: a resumed run draws what a straight
    one does. `stream` keeps one trainer's draws apart from another's (train_cfg_distill uses 11)."""
    ss = np.random.SeedSequence([seed, stream, step])
    a, b = ss.generate_state(2)
    return np.random.default_rng(int(a)), torch.Generator().manual_seed(int(b))


def train_embedding(model, name: str, data, steps: int, *, num_vectors: int = 1, init_text: str = "*",
                    learn_rate: float | str = 5e-3, batch_size: int = 16, seed: int = 0,
                    template: str | list[str] = DEFAULT_TEMPLATE, embeddings_dir: str | Path | None = None,
                    work_dir: str | Path | None = None, resume: bool = False, save_every: int = 50,
                    progress_callback: Callable[[int, int, float], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, show_progress: bool = True,
                    keep_data=None, keep_templates: tuple[str, ...] = KEEP_TEMPLATES, negative_template: str = "[name]",
                    cfg_scale: float = 7.0, ti_weight: float = 1.0, keep_weight: float = 1.0,
                    contrast: Contrast | None = None, contrast_data=None, contrast_weight: float = 1.0,
                    initial_vectors: torch.Tensor | None = None, initial_step: int = 0) -> TrainResult:
    """Learn `num_vectors` vectors for `name` on `model` (SD 1.x/2.x) from `data` and save them.

    With `keep_data` the embedding is also trained for use as a negative prompt (this project's
    addition to AUTOMATIC1111's objective): for images *without* the concept, captioned by
    `keep_templates` (the prompt), the classifier-free-guided prediction with `negative_template`
    (`[name]`) as the negative prompt, `e_neg + cfg_scale (e_prompt - e_neg)`, is trained to predict
    their noise, so that guidance away from the embedding leads to those images. The loss is
    `ti_weight * textual-inversion loss + keep_weight * that guided loss`; `ti_weight=0` skips
    the first (and `data` may then be None).

    `data`: a folder (images + caption .txt files), a ShapesData, or a list of (uint8 image, caption)
    pairs. `template`: caption template(s) with `[name]` and `[filewords]` (one drawn per image
    per step). `resume`: continue from the state in `work_dir` (default cache/train-embedding/<name>).
    `progress_callback(step, steps, loss)` after every step; `should_stop()` before every step.
    `initial_vectors` / `initial_step`: start from an existing embedding's vectors and step (AUTOMATIC1111's
    training of an embedding made by create/embedding) instead of `init_text` at step 0.
    Returns a TrainResult; the embedding is at `result.path` (`<embeddings_dir>/<name>.safetensors`),
    and the model's embedding folder is re-read when that is where it was written.
    """
    cond = model.cond_stage
    if hasattr(cond, "clip_l"):
        raise ValueError("embedding training supports SD 1.x/2.x models (one text encoder)")
    name = ti.sanitize_name(name)
    if not name:
        raise ValueError("an embedding needs a name of letters, digits or ._-")
    if steps < 1 or batch_size < 1 or num_vectors < 1:
        raise ValueError("steps, batch_size and num_vectors must be positive")
    embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else (
        getattr(model.embedding_db, "embeddings_dir", None) or REPO / "embeddings")
    work_dir = Path(work_dir) if work_dir is not None else REPO / "cache" / "train-embedding" / name
    templates = [template] if isinstance(template, str) else list(template)
    schedule = parse_learn_rate(learn_rate, steps)
    t_start = time.time()

    # the images, as latents, and what each caption says besides [name]
    def read(data):
        if data is None:
            return [], []
        if isinstance(data, ShapesData):
            examples = data.examples()
            return examples, [a for _, a in examples]
        if isinstance(data, (str, Path)):
            examples = load_folder(Path(data), model.default_size)
        else:
            examples = list(data)
        return examples, [c for _, c in examples]

    examples, words = read(data if ti_weight else None)
    if isinstance(data, ShapesData) and isinstance(template, str) and template == DEFAULT_TEMPLATE:
        templates = list(data.templates)
    keep_examples, keep_words = read(keep_data)
    contrast_examples, contrast_words = read(contrast_data) if contrast is not None else ([], [])
    if not examples and not keep_examples and not contrast_examples:
        raise ValueError("no training data")
    contrast_latents = encode_latents(model, [im for im, _ in contrast_examples]) if contrast_examples else None
    latents = encode_latents(model, [im for im, _ in examples]) if examples else None
    keep_latents = encode_latents(model, [im for im, _ in keep_examples]) if keep_examples else None
    alphas = model.alphas_cumprod.float()

    # the vectors, the optimiser, and where to resume from
    vec = (initial_vectors.detach().float().clone() if initial_vectors is not None
           else ti.init_vectors(cond, init_text, num_vectors)).to(model.device)
    vec.requires_grad_(True)
    optimizer = torch.optim.AdamW([vec], lr=learn_rate_at(schedule, initial_step), weight_decay=0.0)
    state_file = work_dir / "state.pt"
    step, losses = int(initial_step), []
    if resume and state_file.is_file():
        st = torch.load(state_file, map_location="cpu", weights_only=True)
        if tuple(st["vec"].shape) != tuple(vec.shape):
            raise ValueError(f"{state_file} holds {tuple(st['vec'].shape)} vectors, not {tuple(vec.shape)}")
        with torch.no_grad():
            vec.copy_(st["vec"].to(vec.device))
        optimizer.load_state_dict(st["optimizer"])
        step, losses = int(st["step"]), [float(x) for x in st["losses"]]
    elif resume:
        print(f"--resume: no state in {work_dir}, starting at step 0")

    embedding = ti.Embedding(name, vec, step=step, sd_checkpoint=model.shorthash, sd_checkpoint_name=model.name)
    db = ti.EmbeddingDatabase()
    ids = cond.tokenize([name])[0]
    db.ids_lookup[ids[0]] = [(ids, embedding)]
    db.loaded[name] = embedding

    def save_state():
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(".tmp")
        torch.save({"vec": vec.detach().cpu(), "optimizer": optimizer.state_dict(), "step": step,
                    "losses": torch.tensor(losses), "name": name, "seed": seed}, tmp)
        os.replace(tmp, state_file)

    pbar = None
    if show_progress:
        from tqdm import tqdm

        pbar = tqdm(total=steps, initial=step, desc=f"embedding {name}", dynamic_ncols=True, mininterval=2)
    interrupted = False
    chunk_cache: dict = {}
    previous_db = cond.embedding_db
    cond.embedding_db = db  # the captions' [name] is matched like any embedding in a prompt
    try:
        while step < steps:
            if should_stop is not None and should_stop():
                interrupted = True
                break
            rng, gen = _step_generator(seed, step)
            for group in optimizer.param_groups:
                group["lr"] = learn_rate_at(schedule, step)
            loss = torch.zeros((), device=model.device)
            if examples:  # textual inversion: the captions with [name] explain the images
                idx = rng.integers(len(examples), size=batch_size)
                captions = [_caption_for(templates[rng.integers(len(templates))], name, words[i]) for i in idx]
                xt, t, target = _noised(model, latents[torch.from_numpy(idx)], alphas, gen)
                conds = _encode_batch(cond, captions, chunk_cache)
                pred = model.apply_model(xt.to(model.device, model.dtype), t.to(model.device), conds.to(model.dtype))
                loss = loss + ti_weight * torch.nn.functional.mse_loss(pred.float(), target.to(pred.device))
            if keep_examples:  # as a negative prompt: guidance away from [name] leads to the images without it
                idx = rng.integers(len(keep_examples), size=batch_size)
                prompts = [_caption_for(keep_templates[rng.integers(len(keep_templates))], name, keep_words[i])
                           for i in idx]
                xt, t, target = _noised(model, keep_latents[torch.from_numpy(idx)], alphas, gen)
                c_neg = _encode_batch(cond, [_caption_for(negative_template, name, "")] * batch_size, chunk_cache)
                with torch.no_grad():
                    c_pos = _encode_batch(cond, prompts, chunk_cache)
                c_pos, c_neg = _same_length(cond, c_pos, c_neg)
                xt, t = xt.to(model.device, model.dtype), t.to(model.device)
                pred = model.apply_model(torch.cat([xt, xt]), torch.cat([t, t]),
                                         torch.cat([c_neg, c_pos]).to(model.dtype)).float()
                e_neg, e_pos = pred.chunk(2)
                guided = e_neg + cfg_scale * (e_pos.detach() - e_neg)
                loss = loss + keep_weight * torch.nn.functional.mse_loss(guided, target.to(guided.device))
            if contrast_examples:  # as a negative prompt: the prompt's prediction, moved towards the concept
                idx = rng.integers(len(contrast_examples), size=batch_size)
                pairs = [contrast.templates[rng.integers(len(contrast.templates))] for _ in idx]
                others = [contrast.others[rng.integers(len(contrast.others))] for _ in idx]
                words_i = [contrast_words[i] for i in idx]
                prompts = [_caption_for(a, name, w) for (a, _), w in zip(pairs, words_i)]
                with_c = [_caption_for(b.replace("[shape]", contrast.concept), name, w) for (_, b), w in zip(pairs, words_i)]
                with_o = [_caption_for(b.replace("[shape]", o), name, w) for (_, b), o, w in zip(pairs, others, words_i)]
                x0 = contrast_latents[torch.from_numpy(idx)]
                t = torch.randint(contrast.t_range[0], contrast.t_range[1], (batch_size,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                ab = alphas[t].view(-1, 1, 1, 1)
                xt = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).to(model.device, model.dtype)
                td = t.to(model.device)
                with torch.no_grad():
                    if contrast.base == "empty":
                        prompts = [""] * batch_size
                    cs = [_encode_batch(cond, texts, chunk_cache) for texts in (prompts, with_c, with_o)]
                    n = max(c.shape[1] for c in cs)
                    if any(c.shape[1] != n for c in cs):
                        from modules.conditioning import pad_to_length

                        cs = [pad_to_length(c, n, cond.encode("")) for c in cs]
                    e = model.apply_model(torch.cat([xt] * 3), torch.cat([td] * 3), torch.cat(cs).to(model.dtype))
                    e_pos, e_c, e_o = e.float().chunk(3)
                    target = e_pos + contrast.strength * (e_c - e_o)
                c_neg = _encode_batch(cond, [_caption_for(negative_template, name, "")] * batch_size, chunk_cache)
                e_neg = model.apply_model(xt, td, c_neg.to(model.dtype)).float()
                loss = loss + contrast_weight * torch.nn.functional.mse_loss(e_neg, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            embedding.step = step
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{np.mean(losses[-32:]):.5f}")
            if progress_callback is not None:
                progress_callback(step, steps, float(np.mean(losses[-32:])))
            if save_every and step % save_every == 0 and step < steps:
                save_state()
    finally:
        cond.embedding_db = previous_db
        if pbar is not None:
            pbar.close()
    save_state()
    final = ti.Embedding(name, vec.detach().float().cpu().clone(), step=step, sd_checkpoint=model.shorthash,
                         sd_checkpoint_name=model.name)
    path = ti.save_embedding(final, embeddings_dir / f"{name}.safetensors")
    (work_dir / "losses.json").write_text(json.dumps({"step": step, "losses": losses}))
    db_now = getattr(model, "embedding_db", None)
    if db_now is not None and db_now.embeddings_dir is not None and \
            Path(db_now.embeddings_dir).resolve() == embeddings_dir.resolve():
        db_now.load(None, model)
    return TrainResult(final, path, step, float(np.mean(losses[-32:])) if losses else math.nan, interrupted,
                       time.time() - t_start, losses)


def _noised(model, x0: torch.Tensor, alphas: torch.Tensor, gen: torch.Generator):
    """x_t at uniform random timesteps, and the model's training target (epsilon, or v)."""
    t = torch.randint(0, model.num_train_timesteps, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ab = alphas[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = ab.sqrt() * noise - (1 - ab).sqrt() * x0 if model.prediction_type == "v_prediction" else noise
    return xt, t, target


def _same_length(cond, a: torch.Tensor, b: torch.Tensor):
    if a.shape[1] == b.shape[1]:
        return a, b
    from modules.conditioning import pad_to_length

    empty = cond.encode("")
    n = max(a.shape[1], b.shape[1])
    return pad_to_length(a, n, empty), pad_to_length(b, n, empty)


def _encode_batch(cond, captions: list[str], cache: dict) -> torch.Tensor:
    """(B, 77 * k, C) for the captions, with gradients to the embedding's vectors; one encoder call when every
    caption fits one chunk (the usual case), else one per caption."""
    chunk_lists = []
    for c in captions:
        if c not in cache:
            cache[c] = cond.tokenize_line(c)[0]
        chunk_lists.append(cache[c])
    if all(len(ch) == 1 for ch in chunk_lists):
        z = cond.encode_chunks_with_grad([ch[0] for ch in chunk_lists])
        return z.view(len(captions), -1, z.shape[-1])
    from modules.conditioning import stack_padded

    return stack_padded([cond.encode_chunks_with_grad(ch) for ch in chunk_lists], cond.encode(""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "Stable-diffusion" / "tiny-shapes"))
    ap.add_argument("--name", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder of images with caption .txt files")
    src.add_argument("--shapes", choices=["circle", "square", "triangle"], help="the shapes generator, one shape")
    ap.add_argument("--pool", type=int, default=480, help="--shapes: images rendered (every colour x background)")
    ap.add_argument("--keep-shapes", default=None,
                    help="train it as a negative prompt too: shapes (e.g. square,triangle) that guidance away from "
                         "it must lead to, prompted without their shape")
    ap.add_argument("--ti-weight", type=float, default=1.0, help="weight of the textual-inversion loss (0: only "
                                                                 "the negative-prompt loss)")
    ap.add_argument("--keep-weight", type=float, default=1.0, help="weight of the negative-prompt loss")
    ap.add_argument("--cfg", type=float, default=7.0, help="CFG scale of the negative-prompt loss")
    ap.add_argument("--contrast", default=None, metavar="CONCEPT:OTHERS",
                    help="train it as a negative prompt by contrast: e.g. circle:square,triangle (see Contrast)")
    ap.add_argument("--contrast-strength", type=float, default=1.0)
    ap.add_argument("--contrast-t", type=int, nargs=2, default=[400, 1000], metavar=("LO", "HI"))
    ap.add_argument("--contrast-base", choices=["prompt", "empty"], default="prompt",
                    help="the contrast target starts from the prompt's prediction or the empty prompt's")
    ap.add_argument("--template", action="append", default=None,
                    help=f"caption template with [name] / [filewords] (repeatable; default {DEFAULT_TEMPLATE!r}, "
                         "or the shape captions with --shapes)")
    ap.add_argument("--vectors", type=int, default=1, help="vectors per token")
    ap.add_argument("--init-text", default="*")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", default="5e-3", help="learning rate, or AUTOMATIC1111's `rate:step, rate` schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "embeddings", help="embeddings folder to write to")
    ap.add_argument("--work-dir", type=Path, default=None, help="resume state (default cache/train-embedding/NAME)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--stop-after", type=int, default=None, help="stop (resumably) after this step")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from modules import sd_models

    model = sd_models.load_model(args.model, device="cpu")
    data = ShapesData(args.shapes, pool=args.pool, seed=args.seed) if args.shapes else args.data
    keep = ShapesData(args.keep_shapes, pool=args.pool, seed=args.seed + 1) if args.keep_shapes else None
    contrast = contrast_data = None
    if args.contrast:
        concept, _, others = args.contrast.partition(":")
        contrast = Contrast(concept, tuple(others.split(",")), args.contrast_strength, tuple(args.contrast_t),
                            base=args.contrast_base)
        contrast_data = ShapesData(",".join([concept, *contrast.others]), pool=args.pool, seed=args.seed + 3)
    try:
        lr = float(args.lr)
    except ValueError:
        lr = args.lr
    done = {"step": 0}

    def progress(step, steps, loss):
        done["step"] = step

    def stop():  # --stop-after N: stop (resumably) once step N is done
        return args.stop_after is not None and done["step"] >= args.stop_after

    if args.resume and args.stop_after is not None:  # the count goes on from the saved state
        sf = (args.work_dir or REPO / "cache" / "train-embedding" / ti.sanitize_name(args.name)) / "state.pt"
        if sf.is_file():
            done["step"] = int(torch.load(sf, map_location="cpu", weights_only=True)["step"])
    res = train_embedding(model, args.name, data, args.steps, num_vectors=args.vectors, init_text=args.init_text,
                          learn_rate=lr, batch_size=args.batch, seed=args.seed,
                          template=args.template if args.template else DEFAULT_TEMPLATE, embeddings_dir=args.out,
                          work_dir=args.work_dir, resume=args.resume, save_every=args.save_every,
                          progress_callback=progress, should_stop=stop, keep_data=keep, ti_weight=args.ti_weight,
                          keep_weight=args.keep_weight, cfg_scale=args.cfg, contrast=contrast,
                          contrast_data=contrast_data)
    print(f"{res.path}: {res.steps_done} steps, loss {res.loss:.5f} (mean of the last 32), {res.seconds:.0f} s"
          f"{' (stopped; --resume continues)' if res.interrupted else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
