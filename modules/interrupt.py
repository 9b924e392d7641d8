"""Interrupting a job in the middle of a UNet call.

The sampler checks the job's interrupt flag between steps (the `after_sample` hooks), but
one step of a big job (a large image, a big batch, many AND parts, CPU) can take minutes:
the Interrupt button would only act when that step is over. `interruptible` makes the UNet
itself check the flag: it puts a forward pre-hook on each of its sub-blocks (every resnet,
attention, down/upsampler of diffusers' `UNet2DConditionModel`, or every transformer block
of a transformer denoiser), and the first one that runs after `should_stop()` turns true
raises `InterruptedException`, so the call stops within one sub-block's time.

    with interrupt.interruptible(model.unet, lambda: state.interrupted or state.skipped):
        samples = sampler.sample(...)

The hooks only read the flag: with it never set, the UNet computes exactly what it computes
without them (bit for bit). They are removed when the `with` ends, also when it ends by an
exception, so a model shared between jobs never keeps a hook of a finished job.

On CUDA the host queues kernels ahead of the GPU; the checks also keep it at most a couple of
sub-blocks ahead, so the flag is seen while there is still work to save (not checked on a GPU
in this project's CI, which has none).

Whoever calls the UNet inside the `with` must expect `InterruptedException` from the UNet
call itself (not only from the after_sample hooks): the step in progress has no result, so
the run keeps the last finished step's prediction.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from modules.errors import InterruptedException

__all__ = ["interruptible", "interrupt_points"]

# Attributes of a diffusers UNet block that hold its sub-blocks (ModuleLists), in forward order.
_BLOCK_PARTS = ("resnets", "attentions", "motion_modules", "downsamplers", "upsamplers")
# Transformer denoisers (SD3, Flux, PixArt...): their blocks are these ModuleLists.
_TRANSFORMER_PARTS = ("transformer_blocks", "single_transformer_blocks")


def interrupt_points(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The sub-modules that get a check: the UNet itself first, then every sub-block.

    For a diffusers `UNet2DConditionModel` (SD 1.x, 2.x, SDXL): each resnet, attention and
    down/upsampler inside `down_blocks`, `mid_block` and `up_blocks` (a few dozen for SD 1.5,
    each a small fraction of the call). For a transformer denoiser: each transformer block.
    Anything else: its direct children. The list has no duplicates.
    """
    points: list[torch.nn.Module] = [unet]
    blocks: list[torch.nn.Module] = []
    if hasattr(unet, "down_blocks") or hasattr(unet, "up_blocks") or hasattr(unet, "mid_block"):
        blocks += list(getattr(unet, "down_blocks", None) or [])
        if getattr(unet, "mid_block", None) is not None:
            blocks.append(unet.mid_block)
        blocks += list(getattr(unet, "up_blocks", None) or [])
        for block in blocks:
            found = False
            for part in _BLOCK_PARTS:
                for sub in getattr(block, part, None) or []:
                    points.append(sub)
                    found = True
            if not found:  # a block without the usual parts: check at its entry at least
                points.append(block)
    elif any(getattr(unet, part, None) is not None for part in _TRANSFORMER_PARTS):
        for part in _TRANSFORMER_PARTS:
            points += list(getattr(unet, part, None) or [])
    else:
        points += list(unet.children())
    unique: dict[int, torch.nn.Module] = {}
    for module in points:
        unique.setdefault(id(module), module)
    return list(unique.values())


@contextmanager
def interruptible(unet: torch.nn.Module, should_stop: Callable[[], bool],
                  max_ahead: int = 2, enabled: bool = True) -> Iterator[list[torch.nn.Module]]:
    """While the `with` lasts, every sub-block of `unet` raises InterruptedException once `should_stop()` is true.

    `should_stop` is called before each sub-block runs, from the thread that runs the UNet,
    so it must be cheap and thread-safe (reading a flag that another thread sets is both).
    Yields the list of modules that carry a check. Every hook is removed on exit, whatever
    the exit; nesting two `interruptible` on one UNet works (each removes only its own).
    On CUDA, `max_ahead` bounds how many sub-blocks the host may queue ahead of the GPU.
    `enabled=False` (a torch.compile'd UNet, whose graph a per-job hook would recompile) puts no hooks:
    the job then stops between steps only.
    """
    if not enabled:
        yield []
        return

    points = interrupt_points(unet)
    # On CUDA the Python thread only queues kernels and can run a whole forward ahead of the
    # GPU: a check would then see the flag too late to save anything. Each check records an
    # event and waits for the one `max_ahead` checks back, so the host stays at most that many
    # sub-blocks ahead (the GPU stays busy; the results do not change).
    parameter = next(unet.parameters(), None)
    on_cuda = parameter is not None and parameter.device.type == "cuda"
    pending: deque = deque()

    def check(module: torch.nn.Module, args) -> None:
        if should_stop():
            raise InterruptedException()
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
            pending.append(event)
            if len(pending) > max_ahead:
                pending.popleft().synchronize()

    handles = []
    try:
        for module in points:
            handles.append(module.register_forward_pre_hook(check))
        yield points
    finally:
        for handle in handles:
            handle.remove()
