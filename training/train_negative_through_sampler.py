#!/usr/bin/env python
"""How far can a negative conditioning push plain CFG on the embedded model? Trained through the whole sampler.

Issue 17 asks a negative embedding to remove >= 90% of the circles of `a blue shape on a gray
background` under CFG 7, where the word `circle` removes 68%. The single-step losses of
training/train_embedding.py stop at the word's figure. This trains through all 20 DDIM steps with
CFG 7 instead (DRaFT-style: the finished latents are differentiated back to the negative
conditioning): each training seed's target is what the same seed gives with the word as the
negative, except that a circle is replaced by the model's own drawing of the seed with `square`
in the prompt (`--target model`) or by a square rendered in the circle's box (`--target render`).

`--objective distill` does not backpropagate through the sampler: it distils CFG 7 + NAG (with the
word as NAG's negative, training/negatives.py's "CFG + NAG" settings), which removes the circles,
into the negative branch of plain CFG. At each state of the first `--first` steps of the teacher's
trajectories, the negative branch's noise prediction is regressed onto (CFG e_pos - g) / (CFG - 1),
the prediction that would make plain CFG take the teacher's step g (`--refresh N`: every N steps
the states of the conditioning's own trajectories are added, with the teacher's step at them).

`--per-seed 0-39` asks the question the other way round: for each seed that the word leaves a circle,
a 77 x 64 context of its own is trained through the sampler (objective `latents`), and the seeds that
no context of their own turns into a blue-on-gray non-circle within `--iters` steps are counted. One
negative shared by all seeds cannot do better on a seed than the best context for that seed alone,
so those seeds bound from below the circles of any embedding under plain CFG 7 (as far as the
optimiser finds that best context).

`--mode free` trains the 77 x 64 negative *context* itself, bypassing the text encoder: an
upper bound for any embedding, whose context is one the text encoder can produce. `--mode emb`
trains `--vectors` embedding vectors through the text encoder. A seed's noise is evaluate.py's
(torch.randn((4, 16, 16)) per seed), so seeds 0-39 are the evaluation's: the word leaves the same
9 circles of 40 here as there. It reports training seeds (1000 on, `--train-start`) and validation
seeds (2000 on), the latter with no negative and with the word as well.

    python training/train_negative_through_sampler.py --mode free --iters 50 --batch 8 --lr 1e-2
    python training/train_negative_through_sampler.py --mode emb --vectors 8 --iters 100 --batch 8 --lr 1e-2
    python training/train_negative_through_sampler.py --objective distill --mode free --iters 300 --batch 32 --lr 5e-2
    python training/train_negative_through_sampler.py --per-seed 0-39 --iters 150 --lr 5e-2
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "training")]

from modules import images, sd_attention_guidance as AG, sd_models, textual_inversion as ti  # noqa: E402
from modules.sd_samplers_ddim import DDIMSampler  # noqa: E402
import shapes as S  # noqa: E402
import train_embedding as TE  # noqa: E402

STEPS, CFG = 20, 7.0
NAG = dict(scale=3.0, tau=4.0, alpha=0.75)  # training/negatives.py's "CFG + NAG"


def ddim_cfg(model, x: torch.Tensor, c_pos: torch.Tensor, c_neg: torch.Tensor, stop_after: int = STEPS) -> torch.Tensor:
    """The engine's DDIM step (eta 0, its schedule) with CFG, differentiable, which the sampler is not; after
    `stop_after` steps the guided pred_x0 of the last one, else the finished latents."""
    schedule = DDIMSampler(model)
    schedule.make_schedule(STEPS)
    ts, a, a_prev = schedule.ddim_timesteps, schedule.ddim_alphas, schedule.ddim_alphas_prev
    b = x.shape[0]
    for n, i in enumerate(reversed(range(STEPS))):
        t = torch.full((b,), ts[i])
        e_neg, e_pos = model.apply_model(torch.cat([x, x]), torch.cat([t, t]),
                                         torch.cat([c_neg.expand(b, -1, -1), c_pos])).chunk(2)
        g = e_neg + CFG * (e_pos - e_neg)
        x0 = (x - (1 - a[i]) ** 0.5 * g) / a[i] ** 0.5
        if n + 1 == stop_after:
            return x0
        x = a_prev[i] ** 0.5 * x0 + (1 - a_prev[i]) ** 0.5 * g
    return x


def nag_states(model, x: torch.Tensor, c_pos: torch.Tensor, c_word: torch.Tensor, c_neg: torch.Tensor | None,
               first: int, blend: float = 1.0) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """([(x, t, target)], latents after them) for the first `first` steps of DDIM + CFG 7 with negative `c_neg`
    (None: the teacher, CFG 7 + NAG with `c_word` as both negatives), where target is the negative-branch
    prediction with which plain CFG takes the teacher's step at x. `blend` < 1 walks the teacher's trajectories
    with only that fraction of its departure from plain CFG with the word (how much of NAG's push a conditioning
    would have to give). Needs the NAG processors installed (AG.nag_processors)."""
    schedule = DDIMSampler(model)
    schedule.make_schedule(STEPS)
    ts, a, a_prev = schedule.ddim_timesteps, schedule.ddim_alphas, schedule.ddim_alphas_prev
    state, b, out = AG.active_state(model.unet), x.shape[0], []
    for i in list(reversed(range(STEPS)))[:first]:
        t = torch.full((b,), ts[i])
        e_word, e_pos = model.apply_model(torch.cat([x, x]), torch.cat([t, t]),
                                          torch.cat([c_word.expand(b, -1, -1), c_pos])).chunk(2)
        with state.inputs(AG.NAGCall(torch.arange(b), c_word.expand(b, -1, -1), NAG["scale"], NAG["tau"],
                                     NAG["alpha"])):
            e_pos_nag = model.apply_model(x, t, c_pos)
        teacher = e_word + CFG * (e_pos_nag - e_word)
        out.append((x, t, (CFG * e_pos - teacher) / (CFG - 1)))
        if c_neg is None:
            cfg = e_word + CFG * (e_pos - e_word)
            g = teacher if blend == 1 else cfg + blend * (teacher - cfg)
        else:
            e_neg = model.apply_model(x, t, c_neg.expand(b, -1, -1))
            g = e_neg + CFG * (e_pos - e_neg)
        x0 = (x - (1 - a[i]) ** 0.5 * g) / a[i] ** 0.5
        x = a_prev[i] ** 0.5 * x0 + (1 - a_prev[i]) ** 0.5 * g
    return out, x


def to_images(model, latents: torch.Tensor) -> list[np.ndarray]:
    """uint8 HxWx3 pictures, converted as the engine converts its samples."""
    return [np.asarray(im) for im in images.latents_to_pil(model.decode_first_stage(latents))]


def noise(seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in seeds])


def object_box(im: np.ndarray) -> tuple[int, int, int]:
    """(x0, y0, side) of the object, as shapes.judge masks it."""
    ys, xs = np.nonzero(S.object_mask(im)[0])
    return int(xs.min()), int(ys.min()), int(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)


def latent_targets(model, seeds: list[int], c_pos: torch.Tensor, c_word: torch.Tensor, color: str,
                   background: str, target: str) -> torch.Tensor:
    """Each seed's finished latents with the word as the negative, except that a circle is replaced by the model's
    drawing of the seed with `square` in the prompt (`model`) or by a square rendered in its box (`render`)."""
    with torch.no_grad():
        base = ddim_cfg(model, noise(seeds), c_pos.expand(len(seeds), -1, -1), c_word)
        targets = []
        for seed, lat, im in zip(seeds, base, to_images(model, base)):
            if S.judge(im)["shape"] != "circle":
                targets.append(lat)
            elif target == "model":
                prompt = model.cond_stage.encode(f"a {color} square on a {background} background")
                targets.append(ddim_cfg(model, noise([seed]), prompt, c_word)[0])
            else:
                x0, y0, side = object_box(im)
                square = S.render(color, "square", background, float(side), float(x0), float(y0))
                pixels = torch.from_numpy(square.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
                targets.append(model.encode_first_stage(pixels)[0].float())
        return torch.stack(targets)


def per_seed_bound(model, circles: list[int], c_pos: torch.Tensor, c_word: torch.Tensor, color: str,
                   background: str, iters: int, lr: float, target: str) -> dict[int, int | None]:
    """{seed: the first step at which its own context made it a non-circle, still `color` on `background`
    (None: never)} for `circles`, seeds that the word leaves a circle. Each seed has its own context, so one
    Adam run trains them all at once without them influencing each other."""
    if not circles:
        return {}
    targets = latent_targets(model, circles, c_pos, c_word, color, background, target)
    contexts = c_word.expand(len(circles), -1, -1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([contexts], lr=lr)
    flipped: dict[int, int | None] = dict.fromkeys(circles)
    x, c = noise(circles), c_pos.expand(len(circles), -1, -1)
    for it in range(iters + 1):
        lat = ddim_cfg(model, x, c, contexts)
        for seed, im in zip(circles, to_images(model, lat.detach())):
            j = S.judge(im)
            if flipped[seed] is None and j["shape"] != "circle" and (j["color"], j["background"]) == (color, background):
                flipped[seed] = it
        if it == iters or all(v is not None for v in flipped.values()):
            break
        loss = ((lat - targets) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if it % 10 == 0:
            done = sum(v is not None for v in flipped.values())
            print(f"step {it}: loss {loss.item():.4f}, {done}/{len(circles)} seeds turned", flush=True)
    return flipped


def seed_range(text: str) -> list[int]:
    a, _, b = text.partition("-")
    return list(range(int(a), int(b or a) + 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "Stable-diffusion" / "tiny-shapes"))
    ap.add_argument("--mode", choices=["free", "emb"], default="free")
    ap.add_argument("--vectors", type=int, default=4)
    ap.add_argument("--init", default="circle", help="the word the conditioning starts from")
    ap.add_argument("--color", default="blue")
    ap.add_argument("--background", default="gray")
    ap.add_argument("--objective", choices=["latents", "distill"], default="latents")
    ap.add_argument("--target", choices=["model", "render"], default="model", help="--objective latents")
    ap.add_argument("--first", type=int, default=8, help="--objective distill: the steps whose states are used")
    ap.add_argument("--teacher-blend", type=lambda v: [float(b) for b in v.split(",")], default=[],
                    help="--objective distill: also report the teacher with only these fractions of its push")
    ap.add_argument("--refresh", type=int, default=0, help="--objective distill: add the own trajectories' states "
                                                           "every N steps")
    ap.add_argument("--per-seed", type=seed_range, default=None, metavar="A-B",
                    help="the per-seed bound on seeds A..B (the engine's seeds: evaluate.py's noise)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--stop-after", type=int, default=STEPS,
                    help="backpropagate only the first N steps, the loss on their guided pred_x0")
    ap.add_argument("--train-start", type=int, default=1000,
                    help="the first training seed (0 with --train-seeds 40: fitted to the evaluation's own seeds, "
                         "a bound, not an embedding to ship)")
    ap.add_argument("--train-seeds", type=int, default=64)
    ap.add_argument("--val-seeds", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="save the trained conditioning (torch file) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = sd_models.load_model(args.model, device="cpu")
    for module in model.modules():
        module.requires_grad_(False)
    cs = model.cond_stage
    color, background = args.color, args.background
    with torch.no_grad():
        c_pos = cs.encode(f"a {color} shape on a {background} background")
        c_word = cs.encode(args.init)

    def judged(seeds, c_neg) -> list[dict]:
        out = []
        for i in range(0, len(seeds), 32):
            with torch.no_grad():
                lat = ddim_cfg(model, noise(seeds[i:i + 32]), c_pos.expand(len(seeds[i:i + 32]), -1, -1), c_neg)
            out += [S.judge(im) for im in to_images(model, lat)]
        return out

    def rates(js) -> str:
        circles = sum(j["shape"] == "circle" for j in js) / len(js)
        kept = sum((j["color"], j["background"]) == (color, background) for j in js) / len(js)
        return f"circles {circles:.1%} kept {kept:.1%}"

    if args.per_seed:
        t0 = time.time()
        none = sum(j["shape"] == "circle" for j in judged(args.per_seed, cs.encode("")))
        circles = [s for s, j in zip(args.per_seed, judged(args.per_seed, c_word)) if j["shape"] == "circle"]
        flipped = per_seed_bound(model, circles, c_pos, c_word, color, background, args.iters, args.lr, args.target)
        stuck = [s for s, v in flipped.items() if v is None]
        print(f"seeds {args.per_seed[0]}-{args.per_seed[-1]}: no negative {none} circles, `{args.init}` "
              f"{len(circles)}; turned by a context of their own: "
              + ", ".join(f"{s} (step {v})" for s, v in flipped.items() if v is not None))
        print(f"never turned in {args.iters} steps: {stuck or 'none'} -> any single negative leaves >= {len(stuck)} "
              f"circles, removal <= {1 - len(stuck) / max(none, 1):.0%} ({time.time() - t0:.0f} s)")
        return 0
    if args.mode == "free":
        param = c_word.clone().requires_grad_(True)
        context = lambda: param  # noqa: E731
    else:
        param = ti.init_vectors(cs, args.init, args.vectors).requires_grad_(True)
        name, db, cache = "negx", ti.EmbeddingDatabase(), {}
        db.register_embedding(ti.Embedding(name, param), cs)
        cs.embedding_db = db
        context = lambda: TE._encode_batch(cs, [name], cache)  # noqa: E731

    t0 = time.time()
    train = list(range(args.train_start, args.train_start + args.train_seeds))
    val = list(range(2000, 2000 + args.val_seeds))
    print(f"validation seeds: no negative {rates(judged(val, cs.encode('')))}; `{args.init}` {rates(judged(val, c_word))}")

    def report(it: int) -> None:
        with torch.no_grad():
            c = context().detach()
        print(f"step {it}: training seeds {rates(judged(train, c))} | validation {rates(judged(val, c))} "
              f"({time.time() - t0:.0f} s)", flush=True)

    def states(c_neg: torch.Tensor | None) -> list[torch.Tensor]:
        """The distillation's pool, (x, t, target) stacked, from the training seeds' trajectories."""
        with torch.no_grad():
            found, _ = nag_states(model, noise(train), c_pos.expand(len(train), -1, -1), c_word, c_neg, args.first)
        return [torch.cat(column) for column in zip(*found)]

    def judged_teacher(seeds, blend: float = 1.0) -> list[dict]:
        with torch.no_grad():
            _, lat = nag_states(model, noise(seeds), c_pos.expand(len(seeds), -1, -1), c_word, None, STEPS, blend)
        return [S.judge(im) for im in to_images(model, lat)]

    with contextlib.ExitStack() as stack:
        if args.objective == "distill":
            stack.enter_context(AG.nag_processors(model.unet))
            pool = states(None)
            print(f"teacher (CFG {CFG:g} + NAG): validation {rates(judged_teacher(val))}")
            for blend in args.teacher_blend:
                print(f"  {blend:g} of its push: validation {rates(judged_teacher(val, blend))}", flush=True)
        else:
            targets = latent_targets(model, train, c_pos, c_word, color, background, args.target)
        report(0)
        optimizer = torch.optim.Adam([param], lr=args.lr)
        rng = np.random.default_rng(0)
        for it in range(1, args.iters + 1):
            if args.objective == "distill":
                idx = torch.from_numpy(rng.choice(len(pool[0]), size=args.batch, replace=False))
                e_neg = model.apply_model(pool[0][idx], pool[1][idx], context().expand(args.batch, -1, -1))
                loss = ((e_neg - pool[2][idx]) ** 2).mean()
            else:
                idx = rng.choice(len(train), size=args.batch, replace=False)
                lat = ddim_cfg(model, noise([train[i] for i in idx]), c_pos.expand(args.batch, -1, -1), context(),
                               stop_after=args.stop_after)
                loss = ((lat - targets[torch.from_numpy(idx)]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if it % args.eval_every == 0 or it == args.iters:
                report(it)
            if args.objective == "distill" and args.refresh and it % args.refresh == 0 and it < args.iters:
                pool = [torch.cat(pair) for pair in zip(pool, states(context().detach()))]
    if args.out:
        torch.save({"mode": args.mode, "conditioning": param.detach(), "args": vars(args)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
