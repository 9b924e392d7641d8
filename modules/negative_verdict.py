"""The model's own verdict: how strongly a finished image still shows what its negative prompt names.

The diffusion model itself is the judge, as a zero-shot classifier (Li et al. 2023, "Your
diffusion model is secretly a zero-shot classifier"): an image is VAE-encoded, noised at a few
fixed noise levels with fixed noise, and the UNet predicts that noise once conditioned on the
negative prompt and once on the empty prompt. A text that describes the image lets the model
predict the noise better, so

    score = mean over (level, noise) of  mse(eps_pred(empty) - eps) - mse(eps_pred(negative) - eps)

is positive (and larger) when the image contains what the negative names. `probability` is the
two-way softmax of Li et al. over {negative, empty}: sigmoid of the same difference summed over the
latent's elements (so it saturates quickly; the score is the finer measure).

Every image is scored in its own UNet call with noise drawn from fixed seeds, so a score does not
depend on the batch, the order of images or earlier calls. The cost per image is
2 x len(timesteps) x noise_per_level UNet evaluations (rows), in one batched call.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from modules import prompt_parser

# Noise levels (training timesteps of a 1000-step schedule) and noise draws per level. Chosen on the embedded
# model with seeds 1000-1031 (disjoint from the evaluation's): colour is read at every level, shape mostly at 600-800.
DEFAULT_TIMESTEPS = (100, 300, 500, 700, 800)
DEFAULT_NOISE_PER_LEVEL = 2
DEFAULT_SEED = 20230516


def final_text(negative_prompt: str) -> str:
    """The negative prompt's text at the end of sampling (prompt editing resolved), which the final image answers to."""
    return prompt_parser.get_learned_conditioning_prompt_schedules([negative_prompt], 1000)[0][-1][1]


@torch.no_grad()
def encode_images(model, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> the latents the UNet sees (posterior mean times the VAE's scaling factor)."""
    vae = model.vae
    device = model.execution_device or next(vae.parameters()).device
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device, vae.dtype)
    latents = vae.encode(x).latent_dist.mean
    return (latents * model.scaling_factor).to(model.device, model.dtype)


def fixed_noise(shape: tuple[int, ...], count: int, seed: int) -> torch.Tensor:
    """`count` noise tensors of `shape`, the j-th from CPU generator seed `seed + j` (independent of the image)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + j)) for j in range(count)])


@torch.no_grad()
def score_latent(model, latent: torch.Tensor, negative_cond, empty_cond, timesteps=DEFAULT_TIMESTEPS,
                 noise_per_level: int = DEFAULT_NOISE_PER_LEVEL, seed: int = DEFAULT_SEED) -> dict:
    """One image's verdict from its latent (C, h, w) and the two conditionings (1, T, C) (SDXL: CondDicts)."""
    from modules.conditioning import stack_padded
    from modules.sd_samplers_common import to_eps

    levels = [int(t) for t in timesteps for _ in range(noise_per_level)]
    k = len(levels)
    noise = fixed_noise(tuple(latent.shape), k, seed).to(latent.device, torch.float32)
    alphas = model.alphas_cumprod[torch.tensor(levels)].to(latent.device, torch.float32).view(-1, 1, 1, 1)
    x0 = latent.float()[None].expand(k, -1, -1, -1)
    x_t = alphas.sqrt() * x0 + (1 - alphas).sqrt() * noise
    x_in = torch.cat([x_t, x_t]).to(model.dtype)
    t_in = torch.tensor(levels + levels, device=latent.device)
    cond = stack_padded([negative_cond, empty_cond], empty_cond)
    cond = cond.repeat_interleave(k, dim=0) if not isinstance(cond, dict) else type(cond)(
        {key: value.repeat_interleave(k, dim=0) for key, value in cond.items()})
    out = model.apply_model(x_in, t_in, cond.to(model.device, model.dtype)).float()
    eps = to_eps(out, torch.cat([x_t, x_t]), torch.cat([alphas, alphas]), model.prediction_type)
    err = ((eps - torch.cat([noise, noise])) ** 2).flatten(1)
    err_neg, err_empty = err[:k], err[k:]
    diff = (err_empty - err_neg).mean(1)  # per (level, noise): how much better the negative explains the image
    per_level = {int(t): float(diff[i * noise_per_level:(i + 1) * noise_per_level].mean())
                 for i, t in enumerate(timesteps)}
    summed = float((err_empty - err_neg).sum(1).mean())
    return {"score": float(diff.mean()), "probability": float(torch.sigmoid(torch.tensor(summed))),
            "error_negative": float(err_neg.mean()), "error_empty": float(err_empty.mean()),
            "per_level": per_level, "unet_evaluations": 2 * k, "unet_calls": 1}


def score_images(model, images: list[Image.Image], negative_prompts: list[str], clip_skip: int = 1, *,
                 timesteps=DEFAULT_TIMESTEPS, noise_per_level: int = DEFAULT_NOISE_PER_LEVEL,
                 seed: int = DEFAULT_SEED) -> list[dict]:
    """Per image: how strongly it contains what its negative prompt names, by the model's own judgement.

    Returns one dict per image: `negative` (the text judged), `score` (mean noise-prediction error
    with the empty prompt minus with the negative; > 0: the negative explains the image better, higher
    = more strongly present; None for an empty negative), `probability` (Li et al.'s softmax over
    {negative, empty}), the two mean errors, `per_level` scores, and the cost: `unet_evaluations`
    (UNet rows) and `unet_calls` (batched forward passes). Deterministic and batch-independent.
    """
    if len(images) != len(negative_prompts):
        raise ValueError("one negative prompt per image")
    encode_cache: dict[str, torch.Tensor] = {}

    def encode(text: str):
        if text not in encode_cache:
            encode_cache[text] = model.get_learned_conditioning(text, clip_skip)
        return encode_cache[text]

    results = []
    for image, negative in zip(images, negative_prompts):
        text = final_text(negative or "").strip()
        if not text:
            results.append({"negative": text, "score": None, "probability": None, "error_negative": None,
                            "error_empty": None, "per_level": {}, "unet_evaluations": 0, "unet_calls": 0})
            continue
        latent = encode_images(model, [image])[0]
        verdict = score_latent(model, latent, encode(text), encode(""), timesteps, noise_per_level, seed)
        results.append({"negative": text, **verdict})
    return results


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve (probability that a positive scores above a negative; ties count half)."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return None
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (len(pos) * len(neg)))
