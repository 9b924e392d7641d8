"""Cheap previews: latent -> RGB without the VAE.

A sampling step's pred_x0 is a latent; decoding it with the VAE costs about as much as a
UNet step at full size, so AUTOMATIC1111's "Approx cheap" preview projects each latent
pixel to RGB with a fixed linear map instead (`rgb = F^T latent + bias`). The map comes
from the model (`SDModel.latent_rgb`: SD 1.x factors by default, or a fitted
`latent_rgb.json` shipped with a checkpoint), so this module knows nothing about any
particular checkpoint. The result has the latent's resolution (1/8 of the image for
SD 1.x); `to_pil` scales it up for display.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


def cheap_approximation(latents: torch.Tensor, factors: Sequence[Sequence[float]] | torch.Tensor,
                        bias: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """(…, C, h, w) latents -> (…, 3, h, w) RGB in [-1, 1], float32 on the CPU.

    `factors` has one row per latent channel and one column per colour (R, G, B), as in
    AUTOMATIC1111's `sd_vae_approx.cheap_approximation`; `bias` is added per colour.
    Values outside [-1, 1] are clamped, as the preview's 8-bit conversion would.
    """
    x = latents.detach().to("cpu", torch.float32)
    f = torch.as_tensor(factors, dtype=torch.float32)
    if f.shape != (x.shape[-3], 3):
        raise ValueError(f"latent_rgb factors of shape {tuple(f.shape)} do not fit {x.shape[-3]} latent channels")
    rgb = torch.einsum("...lxy,lr->...rxy", x, f)
    if bias is not None:
        rgb = rgb + torch.as_tensor(bias, dtype=torch.float32).view(3, 1, 1)
    return rgb.clamp(-1, 1)


def to_pil(images: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """(N, 3, h, w) images in [-1, 1] -> 8-bit RGB PIL images, resized to `size` (w, h) if given.

    Upscaling is bilinear: a cheap preview of an 8x8 latent is a blur of the right colours,
    which reads better than blocks.
    """
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = []
    for a in arr.permute(0, 2, 3, 1).numpy():
        im = Image.fromarray(np.ascontiguousarray(a), "RGB")
        if size is not None and im.size != tuple(size):
            im = im.resize(tuple(size), Image.BILINEAR)
        out.append(im)
    return out


def latents_to_rgb(model, latents: torch.Tensor, method: str = "cheap") -> torch.Tensor:
    """Preview of latents (as the sampler sees them) as (N, 3, h', w') RGB in [-1, 1] on the CPU.

    method "cheap": the linear projection (latent resolution); "full": the model's VAE
    (image resolution, as slow as the final decode).
    """
    if method == "full":
        return model.decode_first_stage(latents).clamp(-1, 1)
    factors, bias = model.latent_rgb
    return cheap_approximation(latents, factors, bias)
