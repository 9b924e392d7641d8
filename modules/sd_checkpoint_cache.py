"""RAM copies of the last checkpoints loaded, so switching back is a copy, not a load.

AUTOMATIC1111's "Checkpoints to cache in RAM" (`sd_checkpoint_cache`) keeps the state dicts of the
last N checkpoints loaded, the current one included; "Maximum number of checkpoints loaded at the
same time" (`sd_checkpoints_limit`) keeps N whole models. Here both are one cache of weights (CPU
tensors, already converted to diffusers' layout and to the dtypes they were loaded in): a hit
builds the modules without initialising them and assigns clones of the cached tensors, so the
file is neither read nor converted again, and nothing the new model does (a VAE swap, LoRA)
can change the cached copy. `configure(options)` sets the size from the options object passed in.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch


def key_for(path: Path, dtype, vae_dtype, precision) -> tuple:
    """A cache key that changes when the file changes (size, mtime) or the load asks other dtypes."""
    from modules.sd_models import _weight_files

    files = _weight_files(Path(path))
    stats = [f.stat() for f in files]
    stamp = (sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))
    p = precision
    return (str(Path(path).resolve()), stamp, str(dtype), str(vae_dtype),
            str(p.unet_dtype), str(p.text_dtype), str(p.vae_dtype), p.channels_last)


@dataclass
class _Entry:
    arch: str
    modules: list  # [(class, config, state dict)] for unet, vae, encoders...
    tokenizers: list
    scheduler_config: dict
    latent_rgb: tuple
    source: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, _, sd in self.modules for t in sd.values())


class CheckpointCache:
    """The last `size` checkpoints' weights in RAM, oldest evicted first. `hits` / `misses` count lookups
    (a test or a benchmark reads them to see that a switch back read nothing)."""

    def __init__(self, size: int = 0):
        self.size = int(size)
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def configure(self, options) -> "CheckpointCache":
        """Size from AUTOMATIC1111's options: `sd_checkpoint_cache`, or `sd_checkpoints_limit` when that is
        larger than 1 (models kept at once); 0 turns the cache off and frees it."""
        limit = int(options.get("sd_checkpoints_limit") or 1)
        self.resize(max(int(options.get("sd_checkpoint_cache") or 0), limit if limit > 1 else 0))
        return self

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = max(0, int(size))
            self._trim()

    def _trim(self) -> None:
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key):
        """load_model's `parts` built from a copy of the cached weights, or None (a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        from modules.sd_models import _build

        built = [_build(cls, config, {k: v.clone() for k, v in sd.items()}, "cached", key[0])
                 for cls, config, sd in entry.modules]
        unet, vae, *encoders = built
        return (entry.arch, unet, vae, encoders, list(entry.tokenizers), dict(entry.scheduler_config),
                entry.latent_rgb, entry.source)

    def put(self, key, parts) -> None:
        """Keep CPU copies of freshly loaded weights (before they are placed or offloaded)."""
        if self.size <= 0:
            return
        arch, unet, vae, encoders, tokenizers, scheduler_config, latent_rgb, source = parts
        modules = []
        for module in (unet, vae, *encoders):
            state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            modules.append((type(module), module.config, state))
        entry = _Entry(arch, modules, list(tokenizers), dict(scheduler_config), latent_rgb, source)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._trim()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def state_dict_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same keys and bit-identical tensors (tests: a cache hit gives the weights the load gave)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
