#!/usr/bin/env python
"""Train the embedded ``tiny-shapes`` text-to-image model (issue 11) on CPU.

Phases (one checkpoint file, resumable with ``--resume``):
  1. vae     AutoencoderKL 64x64 -> 4x16x16 on fresh procedural images (MSE + L1 + tiny KL)
  2. encode  a latent pool encoded once in large no-grad batches, cached in the work dir;
             scaling_factor = 1 / std(latents)
  3. unet    UNet2DConditionModel + CLIPTextModel trained jointly from scratch: epsilon
             prediction, offset noise, min-SNR-5 weighting, AdamW warm-up + cosine, EMA
  4. export  EMA weights (fp16) as a diffusers StableDiffusionPipeline folder, latent_rgb.json,
             loss log (JSON + CSV) and loss-curve PNG

Every random draw of step k comes from a seed derived from (seed, phase, k), so a resumed
run reproduces the uninterrupted one bit for bit (same thread count).

    python training/train_tiny_shapes.py                 # full run (defaults below)
    python training/train_tiny_shapes.py --resume        # continue from the last checkpoint
    python training/train_tiny_shapes.py --bench 20      # seconds per step, then exit
    python training/train_tiny_shapes.py --export-only /tmp/x   # export the checkpoint's EMA weights
    python training/train_tiny_shapes.py --start-from models/Stable-diffusion/tiny-shapes --unet-steps N
        # more UNet steps for an exported model whose checkpoint is gone (fresh optimizer)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes as S  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "configs" / "clip-tokenizer"
DEFAULT_OUT = REPO / "models" / "Stable-diffusion" / "tiny-shapes"
DEFAULT_WORK = Path("/work/tiny-shapes-train")

CONFIGS = {
    "full": dict(
        seed=0, threads=2,
        vae_channels=[16, 32, 32], vae_groups=8, vae_steps=1800, vae_batch=16, vae_lr=1e-3,
        vae_warmup=50, vae_l1=0.5, vae_kl=1e-6,
        pool=16000, encode_batch=250,
        unet_channels=[64, 128, 128], unet_groups=32, unet_heads=8,
        text_hidden=64, text_layers=2, text_heads=2, text_ff=256,
        unet_steps=3600, batch=32, lr=1e-3, warmup=200, lr_min_frac=0.02, wd=0.01,
        ema=0.999, offset_noise=0.1, min_snr=5.0, grad_clip=1.0,
        latent_rgb_n=400, ckpt_minutes=8.0,
    ),
    # a seconds-long configuration for the resume test
    "tiny": dict(
        seed=0, threads=1,
        vae_channels=[8, 16, 16], vae_groups=8, vae_steps=4, vae_batch=4, vae_lr=1e-3,
        vae_warmup=2, vae_l1=0.5, vae_kl=1e-6,
        pool=24, encode_batch=8,
        unet_channels=[8, 16, 16], unet_groups=8, unet_heads=2,
        text_hidden=16, text_layers=1, text_heads=2, text_ff=32,
        unet_steps=6, batch=4, lr=1e-3, warmup=2, lr_min_frac=0.02, wd=0.01,
        ema=0.99, offset_noise=0.1, min_snr=5.0, grad_clip=1.0,
        latent_rgb_n=8, ckpt_minutes=8.0,
    ),
}

PHASES = ["vae", "encode", "unet", "export", "done"]
VAE_SEED_BASE = 50_000_000   # image seeds for VAE training (pool uses 0..pool-1)


# ----------------------------------------------------------------------------- models
def build_vae(cfg):
    from diffusers import AutoencoderKL
    ch = list(cfg["vae_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=["DownEncoderBlock2D"] * len(ch),
        up_block_types=["UpDecoderBlock2D"] * len(ch),
        block_out_channels=ch, layers_per_block=1, norm_num_groups=cfg["vae_groups"],
        act_fn="silu", scaling_factor=1.0,
    )


def build_unet(cfg):
    from diffusers import UNet2DConditionModel
    ch = list(cfg["unet_channels"])
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=ch,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=cfg["text_hidden"], attention_head_dim=cfg["unet_heads"],
        norm_num_groups=cfg["unet_groups"],
    )


def build_text_encoder(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel
    tc = CLIPTextConfig(
        vocab_size=49408, hidden_size=cfg["text_hidden"], intermediate_size=cfg["text_ff"],
        projection_dim=cfg["text_hidden"], num_hidden_layers=cfg["text_layers"],
        num_attention_heads=cfg["text_heads"], max_position_embeddings=77,
        hidden_act="quick_gelu", pad_token_id=49407, bos_token_id=49406, eos_token_id=49407,
    )
    return CLIPTextModel(tc)


def load_tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def noise_schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)   # alphas_cumprod (float64)


def scheduler_config():
    return dict(
        _class_name="DDIMScheduler", num_train_timesteps=1000, beta_schedule="scaled_linear",
        beta_start=0.00085, beta_end=0.012, trained_betas=None, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading", rescale_betas_zero_snr=False, thresholding=False,
    )


# ----------------------------------------------------------------------------- helpers
def lr_at(step, total, base, warmup, min_frac):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def step_seed(cfg, phase_id, k):
    return int(np.random.SeedSequence([cfg["seed"], phase_id, k]).generate_state(1)[0])


def to_tensor(imgs):
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class Tok:
    """Caching tokenizer: captions are few and short."""

    def __init__(self):
        self.tok = load_tokenizer()
        self.cache = {}

    def __call__(self, captions):
        out = []
        for c in captions:
            ids = self.cache.get(c)
            if ids is None:
                ids = self.tok(c, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids[0]
                self.cache[c] = ids
            out.append(ids)
        return torch.stack(out)


def atomic_save(obj, path):
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def vae_batch(cfg, k):
    b = cfg["vae_batch"]
    base = VAE_SEED_BASE + cfg["seed"] * 10_000_000
    return to_tensor([S.render_example(base + k * b + i)[0] for i in range(b)])


def vae_loss(vae, x, cfg, gen):
    post = vae.encode(x).latent_dist
    z = post.sample(generator=gen)
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec, x)
    l1 = (rec - x).abs().mean()
    kl = post.kl().mean() / (4 * z.shape[-1] * z.shape[-2])
    return mse + cfg["vae_l1"] * l1 + cfg["vae_kl"] * kl, mse


def unet_batch(cfg, k, pool, tok, alphas):
    rng = np.random.default_rng(step_seed(cfg, 2, k))
    n = pool["latents"].shape[0]
    idx = rng.integers(n, size=cfg["batch"])
    caps = [S.make_caption(dict(color=S.COLOR_NAMES[pool["color"][i]],
                                shape=S.SHAPES[pool["shape"][i]],
                                background=S.BACKGROUND_NAMES[pool["background"][i]]), rng,
                            cfg.get("caption_drop", (S.P_DROP,) * 3))
            for i in idx]
    x0 = pool["latents"][torch.from_numpy(idx)] * pool["scaling_factor"]
    g = torch.Generator().manual_seed(step_seed(cfg, 3, k))
    b = x0.shape[0]
    t = torch.randint(0, 1000, (b,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    noise = noise + cfg["offset_noise"] * torch.randn((b, x0.shape[1], 1, 1), generator=g)
    ab = alphas[t].float().view(b, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    snr = (ab / (1 - ab)).view(b)
    w = torch.clamp(snr, max=cfg["min_snr"]) / snr
    return xt, t, noise, w, tok(caps), caps


def unet_loss(unet, te, batch):
    xt, t, noise, w, ids, _ = batch
    emb = te(ids)[0]
    pred = unet(xt, t, encoder_hidden_states=emb).sample
    per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    return (w * per).mean(), per.mean()


def make_unet_optimizer(cfg, unet, te):
    named = dict(te.named_parameters())
    emb_params = [p for n, p in named.items()
                  if n.endswith("token_embedding.weight") or n.endswith("position_embedding.weight")]
    assert len(emb_params) == 2, list(named)[:4]
    emb_ids = {id(p) for p in emb_params}
    decay, no_decay = [], []
    for m in (unet, te):
        for name, p in m.named_parameters():
            if id(p) in emb_ids:
                continue
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg["wd"]),
              dict(params=no_decay + emb_params, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)


def ema_init(models):
    return [p.detach().clone() for m in models for p in m.parameters()]


@torch.no_grad()
def ema_update(ema, models, decay):
    params = [p.detach() for m in models for p in m.parameters()]
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, params, alpha=1 - decay)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg, work_dir: Path, out_dir: Path):
        self.cfg, self.work, self.out = cfg, Path(work_dir), Path(out_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.work / "ckpt.pt"
        self.pool_path = self.work / "pool.pt"
        torch.manual_seed(cfg["seed"])
        self.vae = build_vae(cfg)
        self.unet = build_unet(cfg)
        self.te = build_text_encoder(cfg)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg["vae_lr"], weight_decay=0.0)
        self.opt = make_unet_optimizer(cfg, self.unet, self.te)
        self.ema = ema_init([self.unet, self.te])
        self.phase, self.step = "vae", 0
        self.elapsed, self.cpu = 0.0, 0.0
        self.scaling_factor = None
        self.log = dict(vae=[], unet=[], vae_mse=[], events=[])
        self.pool = None
        self.alphas = noise_schedule()
        self._t0, self._c0 = time.time(), time.process_time()
        self._last_ckpt = time.time()

    # -- timing
    def wall(self):
        return self.elapsed + (time.time() - self._t0)

    def cputime(self):
        return self.cpu + (time.process_time() - self._c0)

    # -- checkpoints
    def state(self):
        return dict(
            cfg=self.cfg, phase=self.phase, step=self.step,
            elapsed=self.wall(), cpu=self.cputime(), scaling_factor=self.scaling_factor,
            vae=self.vae.state_dict(), vae_opt=self.vae_opt.state_dict(),
            unet=self.unet.state_dict(), te=self.te.state_dict(), opt=self.opt.state_dict(),
            ema=[e.clone() for e in self.ema], log=self.log,
            torch_rng=torch.get_rng_state(), np_rng=np.random.get_state(),
        )

    def save(self, why=""):
        atomic_save(self.state(), self.ckpt_path)
        self._last_ckpt = time.time()
        tqdm.write(f"[ckpt] {why} phase={self.phase} step={self.step} "
                   f"wall={self.wall() / 60:.1f}min cpu={self.cputime() / 60:.1f}min -> {self.ckpt_path}")

    def load(self):
        st = torch.load(self.ckpt_path, weights_only=False)
        self.cfg = st["cfg"]
        self.phase, self.step = st["phase"], st["step"]
        self.elapsed, self.cpu = st["elapsed"], st["cpu"]
        self.scaling_factor = st["scaling_factor"]
        self.vae.load_state_dict(st["vae"])
        self.vae_opt.load_state_dict(st["vae_opt"])
        self.unet.load_state_dict(st["unet"])
        self.te.load_state_dict(st["te"])
        self.opt.load_state_dict(st["opt"])
        with torch.no_grad():
            for e, s in zip(self.ema, st["ema"]):
                e.copy_(s)
        self.log = st["log"]
        torch.set_rng_state(st["torch_rng"])
        np.random.set_state(st["np_rng"])
        self._t0, self._c0 = time.time(), time.process_time()
        print(f"resumed: phase={self.phase} step={self.step} wall so far {self.elapsed / 60:.1f} min")

    def start_from_export(self, folder: Path, prior: dict):
        """Reopen the UNet phase of an exported model whose checkpoint is gone.

        ``prior`` is the folder's train_log.json. The exported (fp16, EMA) weights become both
        the weights and the EMA, the optimizer starts fresh, and the log is carried on: its time
        counts towards the training budget and its loss curve continues. The latent pool is
        re-encoded with the exported VAE, keeping the exported scaling factor, so the UNet sees
        what it saw.
        """
        from diffusers import StableDiffusionPipeline
        if prior["phase"] != "done":
            raise SystemExit(f"{folder}: its training did not finish (phase {prior['phase']})")
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True,
                                                       safety_checker=None, feature_extractor=None)
        for model, loaded in ((self.vae, pipe.vae), (self.unet, pipe.unet), (self.te, pipe.text_encoder)):
            model.load_state_dict(loaded.state_dict())
        self.ema = ema_init([self.unet, self.te])
        self.pool_path.unlink(missing_ok=True)   # a pool from another VAE must not be reused
        self.scaling_factor = float(prior["scaling_factor"])
        self.elapsed, self.cpu = prior["wall_minutes"] * 60, prior["cpu_minutes"] * 60
        self._t0, self._c0 = time.time(), time.process_time()
        self.log = dict(vae=prior["vae_loss"], vae_mse=prior["vae_mse"], unet=prior["unet_loss"],
                        events=prior["events"], recon_mse=prior["recon_mse"],
                        scaling_factor=self.scaling_factor)
        self.phase, self.step = "encode", len(prior["unet_loss"])
        self.log["events"].append(dict(event="started_from_export", folder=str(folder),
                                       at_step=self.step, unet_steps=self.cfg["unet_steps"],
                                       caption_drop=self.cfg.get("caption_drop"),
                                       threads=self.cfg["threads"]))
        print(f"started from {folder}: UNet step {self.step} of {self.cfg['unet_steps']}, "
              f"wall so far {self.elapsed / 60:.1f} min")

    def maybe_save(self):
        if time.time() - self._last_ckpt >= self.cfg["ckpt_minutes"] * 60:
            self.save("periodic")

    # -- phases
    def run(self, stop_after=None, export=True):
        """stop_after: stop (and checkpoint) once vae_steps_done + unet_steps_done reaches it."""
        cfg = self.cfg

        def total_done():
            if self.phase == "vae":
                return self.step
            if self.phase == "encode":
                return cfg["vae_steps"]
            if self.phase == "unet":
                return cfg["vae_steps"] + self.step
            return cfg["vae_steps"] + cfg["unet_steps"]

        def should_stop():
            return stop_after is not None and total_done() >= stop_after

        if self.phase == "vae":
            self.vae.train()
            bar = tqdm(total=cfg["vae_steps"], initial=self.step, desc="vae", mininterval=5,
                       dynamic_ncols=True)
            while self.step < cfg["vae_steps"]:
                if should_stop():
                    bar.close()
                    self.save("stop")
                    return False
                k = self.step
                for gr in self.vae_opt.param_groups:
                    gr["lr"] = lr_at(k, cfg["vae_steps"], cfg["vae_lr"], cfg["vae_warmup"], 0.02)
                x = vae_batch(cfg, k)
                gen = torch.Generator().manual_seed(step_seed(cfg, 1, k))
                loss, mse = vae_loss(self.vae, x, cfg, gen)
                self.vae_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
                self.vae_opt.step()
                self.log["vae"].append(loss.item())
                self.log["vae_mse"].append(mse.item())
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(self.log['vae'][-50:]):.5f}",
                                mse=f"{np.mean(self.log['vae_mse'][-50:]):.5f}", refresh=False)
                if self.step % 100 == 0:
                    tqdm.write(f"vae step {self.step} loss {np.mean(self.log['vae'][-100:]):.5f} "
                               f"mse {np.mean(self.log['vae_mse'][-100:]):.5f} wall {self.wall() / 60:.1f}min")
                self.maybe_save()
            bar.close()
            self.phase, self.step = "encode", 0
            self.log["events"].append(dict(event="vae_done", wall=self.wall(), cpu=self.cputime()))
            self.save("vae done")

        if self.phase == "encode":
            self.encode_pool()
            self.phase = "unet"   # from step 0, or where a model started from (--start-from) stopped
            self.log["events"].append(dict(event="encode_done", wall=self.wall(), cpu=self.cputime()))
            self.save("pool encoded")

        if self.phase == "unet":
            self.train_unet(should_stop)
            if self.phase == "unet":
                return False
            self.log["events"].append(dict(event="unet_done", wall=self.wall(), cpu=self.cputime()))
            self.save("unet done")

        if self.phase == "export":
            if not export:
                return True
            self.export(self.out)
            self.phase = "done"
            self.log["events"].append(dict(event="export_done", wall=self.wall(), cpu=self.cputime()))
            self.save("exported")
            self.write_logs(self.out)   # again, with the final wall time
        return True

    @torch.no_grad()
    def encode_pool(self):
        cfg = self.cfg
        if self.pool_path.exists():
            pool = torch.load(self.pool_path, weights_only=False)
            if pool.get("n") == cfg["pool"] and pool.get("vae_steps") == cfg["vae_steps"]:
                self.pool = pool
                self.scaling_factor = pool["scaling_factor"]
                print(f"latent pool loaded from {self.pool_path}")
                return
        self.vae.eval()
        n, b = cfg["pool"], cfg["encode_batch"]
        lat, col, shp, bgs, mses = [], [], [], [], []
        for s in tqdm(range(0, n, b), desc="encode", mininterval=5, dynamic_ncols=True):
            imgs, attrs = zip(*[S.render_example(i) for i in range(s, min(n, s + b))])
            x = to_tensor(imgs)
            z = self.vae.encode(x).latent_dist.mean
            lat.append(z)
            if s < 4 * b:   # reconstruction error on a few batches
                mses.append(float(F.mse_loss(self.vae.decode(z).sample.clamp(-1, 1), x)))
            col += [S.COLOR_NAMES.index(a["color"]) for a in attrs]
            shp += [S.SHAPES.index(a["shape"]) for a in attrs]
            bgs += [S.BACKGROUND_NAMES.index(a["background"]) for a in attrs]
        lat = torch.cat(lat)
        # set from the latents' spread, unless the UNet was trained with one already
        sf = self.scaling_factor or float(1.0 / lat.std())
        self.scaling_factor = sf
        self.pool = dict(latents=lat, color=np.array(col), shape=np.array(shp),
                         background=np.array(bgs), scaling_factor=sf, n=n,
                         vae_steps=cfg["vae_steps"], recon_mse=float(np.mean(mses)),
                         latent_mean=lat.mean(dim=(0, 2, 3)).tolist(),
                         latent_std=lat.std(dim=(0, 2, 3)).tolist())
        atomic_save(self.pool, self.pool_path)
        self.log["recon_mse"] = self.pool["recon_mse"]
        self.log["scaling_factor"] = sf
        print(f"latent pool: {tuple(lat.shape)}, std {lat.std():.4f} -> scaling_factor {sf:.4f}, "
              f"per-channel mean {self.pool['latent_mean']}, recon MSE ([-1,1]) {self.pool['recon_mse']:.5f}")

    def train_unet(self, should_stop):
        cfg = self.cfg
        if self.pool is None:
            self.pool = torch.load(self.pool_path, weights_only=False)
        tok = Tok()
        self.unet.train()
        self.te.train()
        params = [p for m in (self.unet, self.te) for p in m.parameters()]
        bar = tqdm(total=cfg["unet_steps"], initial=self.step, desc="unet", mininterval=5,
                   dynamic_ncols=True)
        while self.step < cfg["unet_steps"]:
            if should_stop():
                bar.close()
                self.save("stop")
                return
            k = self.step
            lr = lr_at(k, cfg["unet_steps"], cfg["lr"], cfg["warmup"], cfg["lr_min_frac"])
            for gr in self.opt.param_groups:
                gr["lr"] = lr
            batch = unet_batch(cfg, k, self.pool, tok, self.alphas)
            loss, raw = unet_loss(self.unet, self.te, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            self.opt.step()
            decay = min(cfg["ema"], (1 + k) / (10 + k))
            ema_update(self.ema, [self.unet, self.te], decay)
            self.log["unet"].append(raw.item())
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.log['unet'][-100:]):.5f}", lr=f"{lr:.2e}", refresh=False)
            if self.step % 100 == 0:
                tqdm.write(f"unet step {self.step} loss {np.mean(self.log['unet'][-100:]):.5f} "
                           f"lr {lr:.2e} wall {self.wall() / 60:.1f}min")
            self.maybe_save()
        bar.close()
        self.phase, self.step = "export", 0

    # -- export
    def ema_models(self):
        unet, te = build_unet(self.cfg), build_text_encoder(self.cfg)
        unet.load_state_dict(self.unet.state_dict())
        te.load_state_dict(self.te.state_dict())
        with torch.no_grad():
            for p, e in zip([p for m in (unet, te) for p in m.parameters()], self.ema):
                p.copy_(e)
        return unet, te

    @torch.no_grad()
    def export(self, out: Path, dtype=torch.float16, raw=False):
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if self.pool is None and self.pool_path.exists():
            self.pool = torch.load(self.pool_path, weights_only=False)
        unet, te = (self.unet, self.te) if raw else self.ema_models()
        vae = build_vae(self.cfg)
        vae.load_state_dict(self.vae.state_dict())
        vae.register_to_config(scaling_factor=float(self.scaling_factor))
        sched = DDIMScheduler.from_config(scheduler_config())
        tok = load_tokenizer()
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        fit = self.fit_latent_rgb(vae)
        pipe.to(dtype=dtype)
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.rmtree(out / sub, ignore_errors=True)
        pipe.save_pretrained(str(out), safe_serialization=True)
        # the tokenizer files as built from the real CLIP BPE (scripts/build_clip_tokenizer.py)
        for f in (out / "tokenizer").iterdir():
            f.unlink()
        for f in TOKENIZER_DIR.iterdir():
            shutil.copy(f, out / "tokenizer" / f.name)
        (out / "latent_rgb.json").write_text(json.dumps(fit, indent=1) + "\n")
        self.write_logs(out)
        print(f"exported {'raw (non-EMA)' if raw else 'EMA'} weights ({dtype}) to {out}")

    @torch.no_grad()
    def fit_latent_rgb(self, vae):
        """Least squares from scaled latents (what the UNet sees) to the decoded image at 16x16."""
        n = min(self.cfg["latent_rgb_n"], self.pool["latents"].shape[0])
        z = self.pool["latents"][:n]
        img = vae.decode(z).sample.clamp(-1, 1)
        img16 = F.avg_pool2d(img, img.shape[-1] // z.shape[-1])
        zs = (z * self.scaling_factor).permute(0, 2, 3, 1).reshape(-1, 4).double()
        y = img16.permute(0, 2, 3, 1).reshape(-1, 3).double()
        a = torch.cat([zs, torch.ones(zs.shape[0], 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, y).solution
        resid = float(((a @ sol - y) ** 2).mean())
        return dict(factors=sol[:4].tolist(), bias=sol[4].tolist(),
                    latents="scaled (multiplied by vae.config.scaling_factor, as the UNet sees them)",
                    output_range=[-1, 1], fit_mse=resid)

    def write_logs(self, out: Path):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        info = dict(config=self.cfg, wall_minutes=self.wall() / 60, cpu_minutes=self.cputime() / 60,
                    phase=self.phase, step=self.step, scaling_factor=self.scaling_factor,
                    recon_mse=self.log.get("recon_mse"), events=self.log["events"],
                    vae_loss=self.log["vae"], vae_mse=self.log["vae_mse"], unet_loss=self.log["unet"])
        (out / "train_log.json").write_text(json.dumps(info) + "\n")
        with open(out / "train_loss.csv", "w") as f:
            f.write("phase,step,loss,mse\n")
            for i, (l, m) in enumerate(zip(self.log["vae"], self.log["vae_mse"])):
                f.write(f"vae,{i},{l:.6f},{m:.6f}\n")
            for i, l in enumerate(self.log["unet"]):
                f.write(f"unet,{i},{l:.6f},\n")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            def smooth(v, w=50):
                v = np.asarray(v, dtype=np.float64)
                if len(v) < w:
                    return v
                return np.convolve(v, np.ones(w) / w, mode="valid")

            fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
            ax[0].semilogy(smooth(self.log["vae_mse"]), label="recon MSE")
            ax[0].semilogy(smooth(self.log["vae"]), label="loss (MSE+L1+KL)", alpha=0.7)
            ax[0].set_title("VAE")
            ax[0].set_xlabel("step")
            ax[0].legend()
            ax[1].semilogy(self.log["unet"], alpha=0.25, lw=0.5, label="per step")
            ax[1].semilogy(np.arange(len(smooth(self.log["unet"], 100))) + 50,
                           smooth(self.log["unet"], 100), label="mean of 100")
            ax[1].set_title("UNet + text encoder (epsilon MSE)")
            ax[1].set_xlabel("step")
            ax[1].legend()
            fig.tight_layout()
            fig.savefig(out / "loss_curve.png", dpi=80)
            plt.close(fig)
        except Exception as e:  # pragma: no cover
            print("loss curve not written:", e)


# ----------------------------------------------------------------------------- bench
def bench(cfg, n):
    torch.manual_seed(0)
    vae, unet, te = build_vae(cfg), build_unet(cfg), build_text_encoder(cfg)
    print("params: vae %.2fM unet %.2fM text %.2fM" % tuple(
        sum(p.numel() for p in m.parameters()) / 1e6 for m in (vae, unet, te)))
    t = time.time()
    imgs = [S.render_example(i)[0] for i in range(256)]
    print(f"render: {(time.time() - t) / 256 * 1e3:.2f} ms/image")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for k in range(n + 2):
        if k == 2:
            t = time.time()
        loss, mse = vae_loss(vae, vae_batch(cfg, k), cfg, torch.Generator().manual_seed(k))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"vae step (batch {cfg['vae_batch']}): {(time.time() - t) / n:.3f} s")
    with torch.no_grad():
        t = time.time()
        z = vae.encode(to_tensor(imgs)).latent_dist.mean
        print(f"encode: {(time.time() - t) / 256 * 1e3:.2f} ms/image")
    pool = dict(latents=z, color=np.zeros(256, int), shape=np.zeros(256, int),
                background=np.zeros(256, int), scaling_factor=1.0)
    tok, alphas = Tok(), noise_schedule()
    opt = make_unet_optimizer(cfg, unet, te)
    ema = ema_init([unet, te])
    for bs in (cfg["batch"], 2 * cfg["batch"]):
        c = dict(cfg, batch=bs)
        for k in range(n + 2):
            if k == 2:
                t = time.time()
            loss, raw = unet_loss(unet, te, unet_batch(c, k, pool, tok, alphas))
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema_update(ema, [unet, te], 0.99)
        print(f"unet+te step (batch {bs}): {(time.time() - t) / n:.3f} s")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="full", choices=sorted(CONFIGS))
    ap.add_argument("--work-dir", default=str(DEFAULT_WORK))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--resume", action="store_true", help="continue from WORK_DIR/ckpt.pt")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="checkpoint and exit after this many VAE+UNet steps in total")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--export-only", default=None, metavar="DIR",
                    help="export the checkpoint's current EMA weights to DIR and exit")
    ap.add_argument("--export-raw", action="store_true",
                    help="with --export-only: the raw weights instead of the EMA (for comparison)")
    ap.add_argument("--start-from", default=None, metavar="DIR",
                    help="reopen the UNet phase of the model exported to DIR (its checkpoint gone) "
                         "up to --unet-steps, from its weights with a fresh optimizer")
    ap.add_argument("--bench", type=int, default=0, metavar="N", help="time N steps per phase, exit")
    ap.add_argument("--vae-channels", default=None, help="e.g. 16,32,32")
    ap.add_argument("--caption-drop", default=None, metavar="C,S,B",
                    help="chance of dropping colour, shape, background from a caption (default 0.25 each)")
    for key in ("vae_steps", "unet_steps", "pool", "batch", "threads", "seed", "vae_groups"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    for key in ("lr", "offset_noise", "ema", "ckpt_minutes"):
        ap.add_argument("--" + key.replace("_", "-"), type=float, default=None)
    args = ap.parse_args(argv)

    cfg = dict(CONFIGS[args.config])
    if args.config != "full" and Path(args.out).resolve() == DEFAULT_OUT.resolve() and not args.bench:
        ap.error(f"--config {args.config} needs --out: it would overwrite the shipped model")
    prior_log = None
    if args.start_from:
        # the exported model's own configuration, changed only by the flags given
        prior_log = json.loads((Path(args.start_from) / "train_log.json").read_text())
        cfg.update(prior_log["config"])
        if args.resume or args.unet_steps is None or args.unet_steps <= cfg["unet_steps"]:
            ap.error(f"--start-from needs --unet-steps above the model's {cfg['unet_steps']} "
                     "(and no --resume: resume the new run's own checkpoint instead)")
    if args.vae_channels:
        cfg["vae_channels"] = [int(c) for c in args.vae_channels.split(",")]
    if args.caption_drop:
        try:
            args.caption_drop = [float(p) for p in args.caption_drop.split(",")]
        except ValueError:
            args.caption_drop = []
        if len(args.caption_drop) != 3 or not all(0 <= p <= 1 for p in args.caption_drop):
            ap.error("--caption-drop takes three probabilities in 0..1: colour,shape,background")
        cfg["caption_drop"] = args.caption_drop
    for key in ("vae_steps", "unet_steps", "pool", "batch", "threads", "seed", "lr",
                "offset_noise", "ema", "ckpt_minutes", "vae_groups"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    torch.set_num_threads(cfg["threads"])
    torch.use_deterministic_algorithms(True, warn_only=True)

    if args.bench:
        bench(cfg, args.bench)
        return 0
    tr = Trainer(cfg, Path(args.work_dir), Path(args.out))
    if args.export_only:
        tr.load()
        tr.export(Path(args.export_only), raw=args.export_raw)
        return 0
    if args.resume:
        if tr.ckpt_path.exists():
            tr.load()
            # a shorter/longer phase (changes the LR schedule from here on), another caption mix or
            # thread count: recorded in the log, and reproducible by resuming with the same flags at
            # the same step. More UNet steps than a finished run had reopen its UNet phase (a warm
            # restart: the cosine continues from where the longer schedule would be).
            finished_unet = tr.cfg["unet_steps"] if tr.phase in ("export", "done") else None
            for key in ("vae_steps", "unet_steps", "caption_drop", "threads"):
                val = getattr(args, key)
                if val is not None and val != tr.cfg.get(key):
                    tr.log["events"].append(dict(event=f"{key}_changed", at_phase=tr.phase,
                                                 at_step=tr.step, old=tr.cfg.get(key), new=val))
                    tr.cfg[key] = val
                    print(f"{key} changed to {val} at phase {tr.phase} step {tr.step}")
            if finished_unet is not None and tr.cfg["unet_steps"] > finished_unet:
                tr.phase, tr.step = "unet", finished_unet
                print(f"UNet phase reopened at step {finished_unet} of {tr.cfg['unet_steps']}")
            torch.set_num_threads(tr.cfg["threads"])
        else:
            print(f"no checkpoint in {tr.work}; starting fresh")
    elif tr.ckpt_path.exists():
        print(f"{tr.ckpt_path} exists: use --resume, or remove it to start over", file=sys.stderr)
        return 2
    elif args.start_from:
        tr.start_from_export(Path(args.start_from), prior_log)
    print("config:", json.dumps(tr.cfg))
    done = tr.run(stop_after=args.stop_after, export=not args.no_export)
    print(f"{'finished' if done else 'stopped'}: phase={tr.phase} step={tr.step} "
          f"wall {tr.wall() / 60:.1f} min, cpu {tr.cputime() / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
