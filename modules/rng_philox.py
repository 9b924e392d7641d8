"""CUDA's `torch.randn` on any machine: Philox 4x32-10 and Box-Muller in numpy (the "NV" noise source).

AUTOMATIC1111's `randn_source = "NV"` makes the noise an NVIDIA GPU would draw for a seed, so
an image made on a GPU can be remade on a CPU or a Mac. PyTorch's CUDA generator (curand's
Philox 4x32-10, Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") gives
element i of the n-th draw of a seed from the counter (n, 0, i, 0) and the key (seed's low
and high 32 bits); the first two output words go through Box-Muller and the first of its two
normals is the value. Numbers are exact to float32 rounding of the reference
`torch.randn(..., device="cuda")`: seed 0, shape (3, 4) gives -0.92466259, -0.42534415, ...
"""
from __future__ import annotations

import numpy as np

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # Philox 4x32's round multipliers
WEYL = (0x9E3779B9, 0xBB67AE85)  # its key schedule increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10
MASK32 = 0xFFFFFFFF
# curand's constants, as float32: 2^-32 and 2^-32 * 2 pi
TWO_POW32_INV = np.float32(2.3283064e-10)
TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)


def _mulhilo(a: np.ndarray, multiplier: int) -> tuple[np.ndarray, np.ndarray]:
    """High and low 32-bit words of the 64-bit product a * multiplier."""
    product = a.astype(np.uint64) * np.uint64(multiplier)
    return (product >> np.uint64(32)).astype(np.uint32), (product & np.uint64(MASK32)).astype(np.uint32)


def philox4x32(counter: list[np.ndarray], key: tuple[int, int], rounds: int = ROUNDS) -> list[np.ndarray]:
    """The Philox 4x32 bijection of `counter` (four uint32 arrays) under `key` (two 32-bit words)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + WEYL[0]) & MASK32, (k1 + WEYL[1]) & MASK32
        hi0, lo0 = _mulhilo(c0, MULTIPLIERS[0])
        hi1, lo1 = _mulhilo(c2, MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint32(k0), lo1, hi0 ^ c3 ^ np.uint32(k1), lo0
    return [c0, c1, c2, c3]


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two uint32 words -> one standard normal (curand's `_curand_box_muller`, its first value)."""
    u = x * TWO_POW32_INV + TWO_POW32_INV / 2  # in (0, 1]: never log(0)
    v = y * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A seed's CUDA-like normal draws: each `randn(shape)` is the next draw, as torch's CUDA generator gives."""

    def __init__(self, seed: int):
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2 ** 32:
            raise ValueError("at most 2^32 numbers per draw")
        counter = [np.full(n, self.offset & MASK32, dtype=np.uint32), np.zeros(n, dtype=np.uint32),
                   np.arange(n, dtype=np.uint32), np.zeros(n, dtype=np.uint32)]
        self.offset += 1
        out = philox4x32(counter, (self.seed & MASK32, self.seed >> 32))
        return box_muller(out[0], out[1]).reshape(shape)
