#!/usr/bin/env python
"""Distil classifier-free guidance into a LoRA for the embedded model: a CFG-distilled model to sample at CFG 1.

Turbo, Lightning, Hyper and LCM models sample at CFG 1, where the negative prompt has no effect
(issue 20); NAG is the way a negative acts there. The shipped tiny-shapes model is not such a
model: at CFG 1 it draws what the prompt asks in about half the images. This trains one, the way
LCM-LoRA and Hyper-SD ship theirs, as a LoRA over the base model (guidance distillation, Meng et
al. 2023, with the guidance scale fixed): the student (the base UNet + LoRA) sees the prompt only and
learns the teacher's guided prediction

    e_teacher = e(x_t, "") + w (e(x_t, prompt) - e(x_t, ""))          (w = --cfg, 7)

on the training images of the base model (training/shapes.py, its caption mix), noised at uniform
timesteps. The teacher is the base model itself (the LoRA disabled), so nothing but the LoRA's
matrices learns. The result is written in diffusers' peft layout (`unet.<module>.lora_A.weight`),
which the LoRA loader reads like any LoRA: `<lora:tiny-shapes-cfg-distill:1>` in the prompt, CFG 1.

Deterministic by (seed, step); `--resume` continues from the state in `--work-dir`.

    python training/train_cfg_distill.py --steps 800
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "training"))

import shapes as S  # noqa: E402
from train_embedding import _step_generator, encode_latents  # noqa: E402

NAME = "tiny-shapes-cfg-distill"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "conv1", "conv2", "time_emb_proj"]


def latent_pool(model, n: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """n training images of the base model (training/shapes.py), as the UNet's latents, with their attributes."""
    examples = [S.render_example(seed * 1_000_003 + i) for i in range(n)]
    with torch.no_grad():
        latents = encode_latents(model, [im for im, _ in examples])
    return latents, [a for _, a in examples]


def train(model, steps: int, *, rank: int = 16, lr: float = 1e-3, batch: int = 16, cfg: float = 7.0,
          pool: int = 1024, seed: int = 0, work_dir: Path, resume: bool = False, save_every: int = 100,
          stop_after: int | None = None) -> dict:
    """Train the LoRA on `model`'s UNet (in place: it gets a peft adapter "distill"); returns the state."""
    from peft import LoraConfig

    unet, cond = model.unet, model.cond_stage
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # the LoRA's initial A matrices, from the seed
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=TARGET_MODULES), adapter_name="distill")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step, losses, seconds = 0, [], 0.0
    state_file = work_dir / "state.pt"
    if resume and state_file.is_file():
        st = torch.load(state_file, map_location="cpu", weights_only=True)
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(unet, st["lora"], adapter_name="distill")
        optimizer.load_state_dict(st["optimizer"])
        step, losses, seconds = int(st["step"]), [float(x) for x in st["losses"]], float(st["seconds"])
    latents, attrs = latent_pool(model, pool, seed)
    alphas = model.alphas_cumprod.float()
    empty = cond.encode("")
    cache: dict[str, torch.Tensor] = {}

    def encode(text: str) -> torch.Tensor:
        if text not in cache:
            with torch.no_grad():
                cache[text] = cond.encode(text)
        return cache[text]

    def save_state():
        from peft.utils import get_peft_model_state_dict

        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(".tmp")
        torch.save({"lora": get_peft_model_state_dict(unet, adapter_name="distill"), "optimizer": optimizer.state_dict(),
                    "step": step, "losses": torch.tensor(losses), "seconds": seconds}, tmp)
        os.replace(tmp, state_file)

    t0 = time.time() - seconds
    while step < steps and (stop_after is None or step < stop_after):
        rng, gen = _step_generator(seed, step, stream=11)
        for group in optimizer.param_groups:  # cosine to 10% of the rate
            group["lr"] = float(lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps))))
        idx = rng.integers(len(attrs), size=batch)
        captions = [S.make_caption(attrs[i], rng) for i in idx]
        c = torch.cat([encode(text) for text in captions])
        x0 = latents[torch.from_numpy(idx)]
        t = torch.randint(0, model.num_train_timesteps, (batch,), generator=gen)
        ab = alphas[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            unet.disable_adapters()
            e_u, e_c = model.apply_model(torch.cat([xt, xt]), torch.cat([t, t]),
                                         torch.cat([empty.expand(batch, -1, -1), c])).chunk(2)
            unet.enable_adapters()
            target = e_u + cfg * (e_c - e_u)
        loss = torch.nn.functional.mse_loss(model.apply_model(xt, t, c), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        seconds = time.time() - t0
        if step % 25 == 0:
            print(f"step {step}/{steps} loss {np.mean(losses[-25:]):.5f} ({seconds:.0f} s)", flush=True)
        if save_every and step % save_every == 0:
            save_state()
    save_state()
    return {"step": step, "losses": losses, "seconds": seconds}


def export(model, path: Path, info: dict) -> Path:
    """The adapter in diffusers' peft layout (`unet.<module>.lora_A/B.weight`), with the run in the metadata."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    sd = {f"unet.{k}": v.detach().float().contiguous()
          for k, v in get_peft_model_state_dict(model.unet, adapter_name="distill").items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"ss_sd_model_name": model.name, "ss_network_dim": str(info["rank"]),
                                      "ss_network_alpha": str(info["rank"]), "training": json.dumps(info)})
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "Stable-diffusion" / "tiny-shapes"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=7.0, help="the guidance scale distilled")
    ap.add_argument("--pool", type=int, default=1024, help="training images rendered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "Lora" / f"{NAME}.safetensors")
    ap.add_argument("--work-dir", type=Path, default=REPO / "cache" / "train-cfg-distill")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (resumably) after this step")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from modules import sd_models

    model = sd_models.load_model(args.model, device="cpu")
    res = train(model, args.steps, rank=args.rank, lr=args.lr, batch=args.batch, cfg=args.cfg, pool=args.pool,
                seed=args.seed, work_dir=args.work_dir, resume=args.resume, stop_after=args.stop_after)
    info = {"steps": res["step"], "rank": args.rank, "lr": args.lr, "batch": args.batch, "cfg": args.cfg,
            "pool": args.pool, "seed": args.seed, "seconds": round(res["seconds"], 1),
            "loss_last_50": float(np.mean(res["losses"][-50:]))}
    if res["step"] >= args.steps:
        print(export(model, args.out, info), info)
    else:
        print(f"stopped at step {res['step']} (--resume continues)", info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
