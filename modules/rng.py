"""Noise that depends on each image's seed only.

Image i of a run has its own CPU generator seeded with its seed. The initial noise and
every later draw (ancestral and SDE samplers, DDIM with eta > 0) come from that generator,
so a seed gives the same image whatever the batch size and on any device.
"""
from __future__ import annotations

import torch


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation, as AUTOMATIC1111 mixes the seed's and the variation seed's noise."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class ImageRNG:
    """Per-image generators: `first()` is the initial noise, `next()` each later draw."""

    def __init__(self, shape: tuple[int, ...], seeds: list[int], subseeds: list[int] | None = None,
                 subseed_strength: float = 0.0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.shape = tuple(shape)
        self.seeds = list(seeds)
        self.subseeds = list(subseeds) if subseeds is not None else [0] * len(seeds)
        self.subseed_strength = subseed_strength
        self.device, self.dtype = torch.device(device), dtype
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in self.seeds]

    def _draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])

    def first(self) -> torch.Tensor:
        noise = self._draw()
        if self.subseed_strength:
            sub = torch.stack([torch.randn(self.shape, generator=torch.Generator("cpu").manual_seed(int(s)))
                               for s in self.subseeds])
            flat = slerp(self.subseed_strength, noise.flatten(1), sub.flatten(1))
            noise = flat.reshape(noise.shape)
        return noise.to(self.device, self.dtype)

    def next(self) -> torch.Tensor:
        return self._draw().to(self.device, self.dtype)
