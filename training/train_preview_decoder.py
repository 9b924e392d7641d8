#!/usr/bin/env python
"""Train a model's own preview decoder (what "Approx cheap" uses): latents -> RGB, against its VAE.

    python training/train_preview_decoder.py [--model models/Stable-diffusion/tiny-shapes] [--threads 1]

The linear latent->RGB map (AUTOMATIC1111's "Approx cheap") is only as good as the VAE is
linear; the embedded model's VAE is not (a red circle on white previews as grey-blue and tan
blobs, about 50 levels per 8-bit channel from the VAE's decode). This trains a
`modules.sd_vae_approx.PreviewDecoder` (a few 3x3 convolutions at latent resolution and a pixel
shuffle, ~0.18 M parameters, ~360 KB in float16) to imitate the VAE decoder on the latents a
preview shows:

1. Sampler trajectories: `--jobs` jobs of batch 8 through the engine (`process_images`) with
   random captions from training/shapes.py's vocabulary (sentences, tags, dropped attributes,
   empty), random negative prompts, CFG scales, step counts and samplers; every step's guided
   pred_x0 and the prompt and negative branches' pred_x0 (early steps: blurry, off the data
   manifold, which is exactly what early previews show).
2. Encoded shapes: `--images` procedural images (training/shapes.py) through the VAE encoder
   (the posterior mean, and one sample), scaled as the UNet sees them.
   Targets: the VAE's decode of each latent (clamped to [-1, 1], kept as 8-bit).
3. Training: L1 loss (the preview's error in 8-bit levels is 127.5 x it), AdamW with warm-up and
   cosine decay, batch 32, `--steps` steps; 5% of the latents held out for the figures.
4. Export: `preview_decoder.safetensors` in the model folder (float16, its shape and how it was
   trained in the metadata); `SDModel.preview_decoder` loads it.

Everything is seeded: the same flags at the same thread count give the same file. The data is
cached in `--work-dir` (keyed by the data flags), so a retraining with other training flags
skips phases 1-2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import shapes as S  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "Stable-diffusion" / "tiny-shapes"
SAMPLERS = ("DDIM", "DDIM", "Euler a", "DPM++ 2M", "Euler", "UniPC")
STEP_COUNTS = (8, 10, 12, 15, 20)
JOB_SEED0 = 1_000_000  # image seeds of the trajectories: far from the evaluation's 0..N
IMAGE_SEED0 = 2_000_000  # procedural images: far from the UNet training pool's seeds


def random_negative(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.5:
        return ""
    if r < 0.75:
        words = list(S.COLOR_NAMES) + list(S.SHAPES) + [f"{b} background" for b in S.BACKGROUND_NAMES]
        return str(words[rng.integers(len(words))])
    return S.make_caption(S.sample_attrs(rng), rng)


def trajectory_latents(model, jobs: int, seed: int, log=print) -> torch.Tensor:
    """pred_x0 of every step (guided, prompt branch, negative branch) of `jobs` random batch-8 jobs."""
    from modules import processing

    out = []
    for j in range(jobs):
        rng = np.random.default_rng([seed, 1, j])
        attrs = S.sample_attrs(rng)
        prompt = S.make_caption(attrs, rng)
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt=prompt, negative_prompt=random_negative(rng), steps=int(rng.choice(STEP_COUNTS)),
            cfg_scale=float(np.round(rng.uniform(1.5, 11.0), 1)), sampler_name=str(rng.choice(SAMPLERS)),
            seed=JOB_SEED0 + 8 * (seed * 10_000 + j), width=model.default_size, height=model.default_size,
            batch_size=8, do_not_save_samples=True)

        def hook(info):
            out.append(info.pred_x0.detach().float().cpu())
            for name in ("prompt", "negative"):
                if info.branches.get(name) is not None:
                    out.append(info.branches[name].detach().float().cpu())

        t0 = time.time()
        processing.process_images(model, p, hooks=[hook])
        log(f"  job {j + 1}/{jobs}: {p.sampler_name}, {p.steps} steps, CFG {p.cfg_scale}, {prompt!r} / "
            f"{p.negative_prompt!r}: {time.time() - t0:.1f} s")
    return torch.cat(out)


@torch.no_grad()
def image_latents(model, n: int, seed: int, batch: int = 64) -> torch.Tensor:
    """Procedural shapes through the VAE encoder: posterior mean and one posterior sample, scaled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i0 in range(0, n, batch):
        imgs = np.stack([S.render_example(IMAGE_SEED0 + seed * 100_000 + i)[0] for i in range(i0, min(n, i0 + batch))])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        dist = model.vae.encode(x.to(model.vae.device, model.vae.dtype)).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        out += [mean, mean + std * torch.randn(mean.shape, generator=g)]
    return torch.cat(out) * model.scaling_factor


@torch.no_grad()
def vae_targets(model, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The VAE's decode of each latent, as 8-bit (N, 3, H, W)."""
    out = []
    for i in range(0, len(latents), batch):
        img = model.decode_first_stage(latents[i:i + batch]).clamp(-1, 1)
        out.append(((img + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def build_data(model, args, log=print) -> dict:
    key = hashlib.sha256(json.dumps([str(Path(args.model).resolve()), args.jobs, args.images, args.seed,
                                     model.sha256 if model.path.is_file() else ""]).encode()).hexdigest()[:12]
    cache = Path(args.work_dir) / f"preview-data-{key}.pt"
    if cache.is_file():
        log(f"data: cached {cache}")
        return torch.load(cache, weights_only=True)
    t0 = time.time()
    log(f"data: {args.jobs} sampler jobs of batch 8")
    traj = trajectory_latents(model, args.jobs, args.seed, log)
    t_traj = time.time() - t0
    log(f"data: {len(traj)} trajectory latents in {t_traj:.0f} s; encoding {args.images} shapes images")
    imgs = image_latents(model, args.images, args.seed)
    latents = torch.cat([traj, imgs])
    log(f"data: VAE decode of {len(latents)} latents")
    targets = vae_targets(model, latents)
    data = dict(latents=latents.half(), targets=targets, n_trajectory=len(traj), n_images=len(imgs),
                seconds=time.time() - t0)
    log(f"data: {len(latents)} pairs in {data['seconds']:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def mean_abs_levels(pred: torch.Tensor, target_u8: torch.Tensor) -> float:
    """Mean |preview - VAE| per 8-bit channel; the preview upscaled bilinearly to the target's size."""
    if pred.shape[-2:] != target_u8.shape[-2:]:
        pred = torch.nn.functional.interpolate(pred, size=target_u8.shape[-2:], mode="bilinear", align_corners=False)
    return float((((pred.clamp(-1, 1) + 1) * 127.5).round() - target_u8.float()).abs().mean())


def train(model, data: dict, args, log=print):
    from modules.sd_vae_approx import PreviewDecoder, cheap_approximation

    torch.manual_seed(args.seed)
    n = len(data["latents"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    n_val = max(1, n // 20)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    lat = data["latents"].float()
    tgt = data["targets"]
    dilations = [int(d) for d in args.dilations.split(",")] if args.dilations else None
    dec = PreviewDecoder(latent_channels=lat.shape[1], channels=args.channels, depth=args.depth,
                         upscale=tgt.shape[-1] // lat.shape[-1], dilations=dilations,
                         global_context=args.global_context)
    params = sum(p.numel() for p in dec.parameters())
    log(f"train: PreviewDecoder {dec.config}, {params:,} parameters, {len(train_idx)} train / {n_val} held-out pairs")
    opt = torch.optim.AdamW(dec.parameters(), lr=args.lr, weight_decay=1e-4)
    warm = min(100, args.steps // 10)

    def lr_at(k):
        if k < warm:
            return args.lr * (k + 1) / warm
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, args.steps - warm))))

    g = torch.Generator().manual_seed(args.seed + 1)
    t0, losses = time.time(), []
    for k in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(k)
        idx = train_idx[torch.randint(len(train_idx), (args.batch_size,), generator=g)]
        x = lat[idx]
        y = tgt[idx].float() / 127.5 - 1
        loss = (dec(x) - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (k + 1) % 250 == 0 or k + 1 == args.steps:
            log(f"  step {k + 1}/{args.steps}: L1 {np.mean(losses[-250:]):.4f} "
                f"({127.5 * np.mean(losses[-250:]):.2f} levels), lr {lr_at(k):.2e}, {time.time() - t0:.0f} s")
    dec.eval()
    with torch.no_grad():
        x_val, y_val = lat[val_idx], tgt[val_idx]
        new = mean_abs_levels(dec(x_val), y_val)
        factors, bias = model.latent_rgb
        old = mean_abs_levels(cheap_approximation(x_val, factors, bias), y_val)
    log(f"held-out {n_val} latents: preview decoder {new:.2f} levels, linear map {old:.2f} levels")
    return dec, dict(train_seconds=round(time.time() - t0, 1), parameters=params, held_out=n_val,
                     held_out_levels=round(new, 3), held_out_levels_linear=round(old, 3),
                     final_l1=round(float(np.mean(losses[-250:])), 5))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--out", default=None, help="default: <model>/preview_decoder.safetensors")
    ap.add_argument("--work-dir", default="/tmp/preview-decoder-train", help="cache of the generated pairs")
    ap.add_argument("--jobs", type=int, default=24, help="sampler jobs of batch 8 (trajectory latents)")
    ap.add_argument("--images", type=int, default=1500, help="procedural images encoded by the VAE")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--dilations", default="1,2,4,1", help="one per layer ('' = all 1)")
    ap.add_argument("--global-context", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from modules import sd_models, sd_vae_approx

    start, cpu0 = time.time(), time.process_time()
    model = sd_models.load_model(args.model, device="cpu", dtype=torch.float32)
    model.__dict__["preview_decoder"] = None  # the linear map is the baseline, whatever the folder has
    data = build_data(model, args)
    dec, facts = train(model, data, args)
    out = Path(args.out) if args.out else Path(args.model) / sd_vae_approx.PREVIEW_DECODER_FILE
    command = "python training/train_preview_decoder.py " + " ".join(argv if argv is not None else sys.argv[1:])
    wall = time.time() - start
    meta = dict(command=command.strip(), seed=args.seed, threads=args.threads, jobs=args.jobs, images=args.images,
                steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                pairs=len(data["latents"]), trajectory_latents=data["n_trajectory"], image_latents=data["n_images"],
                data_seconds=round(float(data["seconds"]), 1), wall_seconds=round(wall, 1),
                cpu_seconds=round(time.process_time() - cpu0, 1), torch=torch.__version__, **facts)
    sd_vae_approx.save_preview_decoder(dec, out, {"training": meta})
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB); wall {wall / 60:.1f} min "
          f"(data {data['seconds'] / 60:.1f} min, cached runs skip it), training {facts['train_seconds'] / 60:.1f} min")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
