"""Noise that depends on each image's seed only.

Image i of a run has its own generator seeded with its seed. The initial noise and every
later draw (ancestral and SDE samplers, DDIM with eta > 0) come from that generator, so a
seed gives the same image whatever the batch size.

Where the generator lives is AUTOMATIC1111's `randn_source` option: "CPU" (torch's CPU
generator: the same image on any device), "GPU" (its default: a generator on the model's
device, so on a CUDA machine the noise CUDA draws; the CPU one on CPU and Mac), or "NV"
(modules/rng_philox.py: CUDA's numbers computed on the CPU, so a GPU's image on any machine).
`eta_noise_seed_delta` (ENSD) reseeds the generators with seed + delta after the initial
noise: only the later draws change, as in AUTOMATIC1111.
"""
from __future__ import annotations

import torch

from modules.rng_philox import PhiloxGenerator

RANDN_SOURCES = ("GPU", "CPU", "NV")


def create_generator(seed: int, source: str = "CPU", device: torch.device | str = "cpu"):
    """A seed's generator for a noise source (AUTOMATIC1111's `create_generator`)."""
    if source == "NV":
        return PhiloxGenerator(seed)
    if source not in RANDN_SOURCES:
        raise ValueError(f"unknown randn_source {source!r}")
    device = torch.device(device)
    on = device if source == "GPU" and device.type not in ("cpu", "mps") else torch.device("cpu")
    return torch.Generator(on).manual_seed(int(seed))


def randn(shape: tuple[int, ...], generator) -> torch.Tensor:
    """The generator's next draw of `shape`, float32, on the device it draws on."""
    if isinstance(generator, PhiloxGenerator):
        return torch.from_numpy(generator.randn(shape))
    return torch.randn(shape, generator=generator, device=generator.device)


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
                 subseed_strength: float = 0.0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str = "CPU", eta_noise_seed_delta: int = 0):
        self.shape = tuple(shape)
        self.seeds = list(seeds)
        self.subseeds = list(subseeds) if subseeds is not None else [0] * len(seeds)
        self.subseed_strength = subseed_strength
        self.device, self.dtype = torch.device(device), dtype
        self.source, self.eta_noise_seed_delta = source, int(eta_noise_seed_delta or 0)
        self.generators = [self._generator(s) for s in self.seeds]

    def _generator(self, seed: int):
        return create_generator(seed, self.source, self.device)

    def _draw(self) -> torch.Tensor:
        return torch.stack([randn(self.shape, g).to(self.device) for g in self.generators])

    def first(self) -> torch.Tensor:
        noise = self._draw()
        if self.subseed_strength:
            sub = torch.stack([randn(self.shape, self._generator(s)).to(self.device) for s in self.subseeds])
            flat = slerp(self.subseed_strength, noise.flatten(1), sub.flatten(1))
            noise = flat.reshape(noise.shape)
        if self.eta_noise_seed_delta:  # the later draws (ancestral / SDE / DDIM eta noise) from seed + ENSD
            self.generators = [self._generator(s + self.eta_noise_seed_delta) for s in self.seeds]
        return noise.to(self.device, self.dtype)

    def next(self) -> torch.Tensor:
        return self._draw().to(self.device, self.dtype)
