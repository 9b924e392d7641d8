"""What a job will cost before it runs: an estimate in seconds from the model's own measured speed.

The UNet is nearly all of a job's time, and one UNet call on `rows` images of `P` latent
pixels costs about `rows * (a * P + b * P^2)`: convolutions grow with the pixels, attention
with their square, which is why a 1024x1024 image on a 64-pixel model is not 256 but
thousands of times slower. `measure` fits `a` and `b` from two timed calls at the model's
own latent size and twice its side; `estimate_seconds` counts the calls a job makes. It is
an estimate (the VAE, the samplers' own arithmetic and a busy machine are left out), good
for refusing a job that would hold a shared server for an hour, and for telling a user on a
slow device what a click will cost.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

SECOND_ORDER = {"Heun", "DPM2", "DPM2 a", "DPM++ SDE", "DPM++ 2S a", "DPM++ 2M SDE Heun", "Restart"}


@dataclass(frozen=True)
class UnetSpeed:
    """Seconds of one UNet call per image row: `a * P + b * P^2`, P = latent pixels."""

    a: float
    b: float

    def seconds(self, rows: int, pixels: int) -> float:
        return rows * (self.a * pixels + self.b * pixels * pixels)


def _time_call(model, side: int, repeats: int = 2) -> float:
    x = torch.zeros(1, model.latent_channels, side, side, device=model.device, dtype=model.dtype)
    cond = model.get_learned_conditioning("")
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            model.apply_model(x, torch.tensor([500.0], device=model.device), cond)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best


def measure(model) -> UnetSpeed:
    """Fit the model's UnetSpeed from calls at its own latent size and twice its side."""
    side = max(8, model.default_size // model.vae_scale_factor)
    t1, t2 = _time_call(model, side), _time_call(model, 2 * side)
    p1, p2 = side * side, 4 * side * side
    # t = a p + b p^2 through both points; a negative term (timer noise) is dropped
    b = max((t2 / p2 - t1 / p1) / (p2 - p1), 0.0)
    a = max(t1 / p1 - b * p1, 0.0)
    return UnetSpeed(a, b)


def unet_rows(p) -> int:
    """Images in one step's UNet batch: the prompt's AND parts, plus the uncond pass unless CFG is 1,
    plus the negative for rules that see it separately (Perp-Neg)."""
    from modules import prompt_parser, sd_guidance

    parts = max(1, len(prompt_parser.split_and(p.prompt))) if hasattr(prompt_parser, "split_and") else 1
    rows = parts
    if p.cfg_scale != 1:
        rows += 1
        if sd_guidance.find_guidance_rule(p.guidance).separate_negative:
            rows += 1
    return rows * p.batch_size


def estimate_seconds(p, model, speed: UnetSpeed) -> float:
    """Seconds of UNet work a job will take on this model (both passes of a hires fix)."""
    from modules import sd_samplers

    data = sd_samplers.find_sampler_config(p.sampler_name)
    calls = 2 if data is not None and data.name in SECOND_ORDER else 1
    f = model.vae_scale_factor
    passes = [(p.steps, (p.width // f) * (p.height // f))]
    if getattr(p, "enable_hr", False):
        w, h = hires_size(p)
        passes.append((getattr(p, "hr_second_pass_steps", 0) or p.steps, (w // f) * (h // f)))
    if hasattr(p, "denoising_strength") and getattr(p, "init_images", None):
        passes = [(int(min(p.denoising_strength, 0.999) * steps) + 1, pixels) for steps, pixels in passes]
    rows = unet_rows(p)
    return p.n_iter * sum(steps * calls * speed.seconds(rows, pixels) for steps, pixels in passes)


def hires_size(p) -> tuple[int, int]:
    if getattr(p, "hr_resize_x", 0) or getattr(p, "hr_resize_y", 0):
        return p.hr_resize_x or p.width, p.hr_resize_y or p.height
    scale = getattr(p, "hr_scale", 2.0) or 2.0
    return int(p.width * scale), int(p.height * scale)


def describe(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
