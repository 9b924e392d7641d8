"""Tiling: circular padding in the UNet's and the VAE's convolutions for one job.

AUTOMATIC1111's `apply_circular` sets `padding_mode = "circular"` on every Conv2d of the model,
so the picture wraps around at its edges and tiles without a seam. Here it is a context
manager: the modes are set when a `tiling` job starts and put back as they were when it ends
(also when it fails or is interrupted), so the next job sees the model untouched.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_lock = threading.Lock()


def conv_layers(model) -> list[torch.nn.Conv2d]:
    """The Conv2d layers of the UNet and the VAE (the text encoders have none)."""
    return [m for module in (model.unet, model.vae) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


@contextlib.contextmanager
def circular_padding(model, enabled: bool = True) -> Iterator[None]:
    """Within the block, the model's convolutions pad circularly (`enabled`), and afterwards as before."""
    if not enabled:
        yield
        return
    with _lock:
        layers = conv_layers(model)
        saved = [layer.padding_mode for layer in layers]
        for layer in layers:
            layer.padding_mode = "circular"
    try:
        yield
    finally:
        with _lock:
            for layer, mode in zip(layers, saved):
                layer.padding_mode = mode
