"""Cheap previews: latent -> RGB without the VAE.

A sampling step's pred_x0 is a latent; decoding it with the VAE costs about as much as a
UNet step at full size, so previews use something cheaper. Three methods:

- "cheap" (the UI's *Approx cheap*): the model's own small learned decoder when its folder
  ships one (`preview_decoder.safetensors`, a few convolutions and a pixel shuffle, trained
  against the model's VAE by `training/train_preview_decoder.py`; `SDModel.preview_decoder`),
  else AUTOMATIC1111's linear map `rgb = F^T latent + bias` (`SDModel.latent_rgb`: the
  factors of the model's architecture, or a fitted `latent_rgb.json`). A linear map cannot
  follow a VAE whose colours are not linear in the latent (the embedded model's red circle
  came out grey-blue and tan), hence the decoder.
- "taesd": madebyollin's Tiny AutoEncoder decoder (AUTOMATIC1111's *TAESD* live preview) read
  from `models/VAE-approx/` when the user puts it there (`taesd_decoder` for SD 1.x/2.x,
  `taesdxl_decoder` for SDXL, `taesd3_decoder` for SD3; `.safetensors`, or `.pth` only when the
  model was loaded with pickles allowed, then through `torch.load(weights_only=True)`). Without
  a fitting file it falls back to "cheap" and says why (`resolve_method`).
- "full": the model's VAE, as slow as the final decode.

This module knows nothing about any particular checkpoint: the model object says what it has.
Every method returns (N, 3, h', w') in [-1, 1], float32 on the CPU; `to_pil` scales for display.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
VAE_APPROX_DIR = REPO / "models" / "VAE-approx"
PREVIEW_DECODER_FILE = "preview_decoder.safetensors"

METHOD_CHEAP, METHOD_TAESD, METHOD_FULL = "cheap", "taesd", "full"
METHODS = (METHOD_CHEAP, METHOD_TAESD, METHOD_FULL)

# AUTOMATIC1111's TAESD decoder file names by architecture (its sd_vae_taesd.py; SD 2.x shares SD 1.x's VAE).
TAESD_NAMES = {"sd1": "taesd_decoder", "sd2": "taesd_decoder", "sdxl": "taesdxl_decoder", "sd3": "taesd3_decoder"}
TAESD_SUFFIXES = (".safetensors", ".pth", ".pt")


# -- the linear map --------------------------------------------------------------------------
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


# -- the learned preview decoder ---------------------------------------------------------------
class PreviewDecoder(nn.Module):
    """A model's own small latent -> RGB decoder (what "cheap" uses when the model folder has one).

    All the work happens at latent resolution: a 3x3 convolution, `depth` residual 3x3
    convolutions (dilated by `dilations`, so a few layers see most of a small latent, as the
    VAE's mid-block attention does), an optional global context (the mean of the features,
    through a 1x1 convolution, added everywhere: the background colour is a whole-image fact),
    and a last 3x3 convolution giving `upscale`^2 RGB values per latent pixel, which a pixel
    shuffle lays out at image resolution. So it costs one small conv net on the latent grid,
    against the VAE decoder's convolutions at image resolution.
    Input: latents as the UNet sees them (scaled); output: RGB in about [-1, 1].
    """

    def __init__(self, latent_channels: int = 4, channels: int = 64, depth: int = 2, upscale: int = 4,
                 dilations: Sequence[int] | None = None, global_context: bool = False):
        super().__init__()
        dilations = [1] * depth if dilations is None else [int(d) for d in dilations]
        if len(dilations) != depth:
            raise ValueError(f"{len(dilations)} dilations for {depth} layers")
        self.config = dict(latent_channels=int(latent_channels), channels=int(channels), depth=int(depth),
                           upscale=int(upscale), dilations=dilations, global_context=bool(global_context))
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in dilations)
        self.context = nn.Conv2d(channels, channels, 1) if global_context else None
        self.conv_out = nn.Conv2d(channels, 3 * upscale * upscale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv_in(x))
        if self.context is not None:
            h = h + self.context(h.mean(dim=(2, 3), keepdim=True))
        for conv in self.body:
            h = h + torch.relu(conv(h))
        return self.shuffle(self.conv_out(h))


def save_preview_decoder(decoder: PreviewDecoder, path: str | Path, metadata: dict | None = None,
                         dtype: torch.dtype = torch.float16) -> Path:
    """Write the decoder as safetensors (weights in `dtype`), its shape in the metadata so the file
    alone rebuilds it; `metadata` (how it was trained, what it measured) is stored beside it."""
    from safetensors.torch import save_file

    meta = {"format": "preview_decoder", "config": json.dumps(decoder.config)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in decoder.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def load_preview_decoder(path: str | Path) -> PreviewDecoder:
    """A preview decoder file -> PreviewDecoder on the CPU in float32, for inference.

    Safetensors only (nothing in it can run code). Raises ValueError for a file that is not a
    preview decoder, or whose weights do not fit the shape its metadata declares.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path.name} is not a readable safetensors file: {type(e).__name__}: {e}") from e
    if meta.get("format") != "preview_decoder" or "config" not in meta:
        raise ValueError(f"{path.name} is not a preview decoder (no 'format: preview_decoder' metadata)")
    decoder = PreviewDecoder(**json.loads(meta["config"]))
    try:
        decoder.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as e:
        raise ValueError(f"{path.name}: weights do not fit its declared shape: {e}") from e
    return decoder.eval().requires_grad_(False)


def find_preview_decoder(model_path: str | Path) -> Path | None:
    """Where a checkpoint's own preview decoder lives: `preview_decoder.safetensors` in a diffusers
    folder, or `<name>.preview_decoder.safetensors` beside a single-file checkpoint."""
    p = Path(model_path)
    candidate = p / PREVIEW_DECODER_FILE if p.is_dir() else p.with_name(f"{p.stem}.{PREVIEW_DECODER_FILE}")
    return candidate if candidate.is_file() else None


# -- TAESD ---------------------------------------------------------------------------------------
_taesd_cache: dict[tuple, nn.Module] = {}
_taesd_lock = threading.Lock()
_warned: set[tuple] = set()


def taesd_file(model, directory: str | Path | None = None) -> Path | None:
    """The TAESD decoder file for the model's architecture in `directory` (default models/VAE-approx),
    safetensors first, or None."""
    name = TAESD_NAMES.get(getattr(model, "arch", "sd1"))
    d = Path(directory) if directory is not None else VAE_APPROX_DIR
    if name is None or not d.is_dir():
        return None
    for suffix in TAESD_SUFFIXES:
        if (d / (name + suffix)).is_file():
            return d / (name + suffix)
    return None


def _read_taesd_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise ValueError(f"{path.name} is a pickle; pickles can run code when loaded, so they are refused. "
                         f"Use {path.stem}.safetensors, or start with --allow-pickle-checkpoints")
    return torch.load(str(path), map_location="cpu", weights_only=True)


def taesd_decoder_from_state_dict(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """diffusers' `DecoderTiny` built to the shape of a TAESD decoder state dict, weights loaded.

    Accepts madebyollin's own files (`taesd_decoder.pth`: an nn.Sequential whose index 0 is the
    parameterless clamp, keys `1.weight`, `3.conv.0.weight`, ...), diffusers' `DecoderTiny`
    (`layers.0.weight`, ...) and a whole `AutoencoderTiny` (`decoder.layers.0.weight`, ...; the
    encoder is ignored). Widths and block counts come from the weights, so a small test decoder
    loads as well as the real 64-channel one. Output in [-1, 1] (DecoderTiny's convention).
    """
    from diffusers.models.autoencoders.vae import DecoderTiny

    if any(k.startswith("decoder.layers.") for k in state_dict):
        sd = {k[len("decoder.layers."):]: v for k, v in state_dict.items() if k.startswith("decoder.layers.")}
    elif any(k.startswith("layers.") for k in state_dict):
        sd = {k[len("layers."):]: v for k, v in state_dict.items() if k.startswith("layers.")}
    else:  # madebyollin's Sequential: index 0 is Clamp(), so every index is one more than DecoderTiny's
        sd = {}
        for k, v in state_dict.items():
            head, _, rest = k.partition(".")
            if not head.isdigit():
                raise ValueError(f"not a TAESD decoder state dict (key {k!r})")
            sd[f"{int(head) - 1}.{rest}"] = v
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        by_index.setdefault(int(head), {})[rest] = v
    if 0 not in by_index or "weight" not in by_index[0]:
        raise ValueError("not a TAESD decoder state dict (no first convolution)")
    latent_channels = by_index[0]["weight"].shape[1]
    num_blocks, widths, blocks = [], [], 0
    for i in sorted(by_index)[1:]:
        params = by_index[i]
        if "conv.0.weight" in params:  # an AutoencoderTinyBlock
            blocks += 1
        elif "weight" in params:  # a level's closing convolution (upsampled before, except the last)
            num_blocks.append(blocks)
            widths.append(params["weight"].shape[1])
            blocks = 0
        else:
            raise ValueError(f"not a TAESD decoder state dict (layer {i}: {sorted(params)})")
    if not num_blocks or blocks:
        raise ValueError("not a TAESD decoder state dict (no final convolution)")
    decoder = DecoderTiny(in_channels=latent_channels, out_channels=3, num_blocks=tuple(num_blocks),
                          block_out_channels=tuple(widths), upsampling_scaling_factor=2, act_fn="relu",
                          upsample_fn="nearest")
    try:
        decoder.layers.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"TAESD decoder weights do not fit: {e}") from e
    decoder.latent_channels, decoder.upscale = latent_channels, 2 ** (len(num_blocks) - 1)
    return decoder.eval().requires_grad_(False)


def load_taesd_decoder(path: str | Path, allow_pickle: bool = False, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> nn.Module:
    """A TAESD decoder file -> DecoderTiny on `device`, cached by file (path, size, mtime), device and dtype."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, str(torch.device(device)), dtype)
    with _taesd_lock:
        if key not in _taesd_cache:
            decoder = taesd_decoder_from_state_dict(_read_taesd_state_dict(path, allow_pickle))
            _taesd_cache[key] = decoder.to(device, dtype)
        return _taesd_cache[key]


def taesd_unavailable(model, directory: str | Path | None = None) -> str | None:
    """Why "taesd" cannot preview this model (None when it can)."""
    arch = getattr(model, "arch", "sd1")
    if arch not in TAESD_NAMES:
        return f"TAESD has no decoder for the {arch} architecture"
    d = Path(directory) if directory is not None else VAE_APPROX_DIR
    path = taesd_file(model, d)
    if path is None:
        return f"no TAESD decoder: put {TAESD_NAMES[arch]}.safetensors in {d}"
    if path.suffix != ".safetensors" and not getattr(model, "allow_pickle", False):
        return (f"{path.name} is a pickle and pickles are refused: use {path.stem}.safetensors, or start with "
                "--allow-pickle-checkpoints")
    try:
        decoder = load_taesd_decoder(path, allow_pickle=getattr(model, "allow_pickle", False))
    except (ValueError, OSError, RuntimeError) as e:
        return f"{path.name} could not be loaded: {e}"
    channels, factor = model.latent_channels, model.vae_scale_factor
    if (decoder.latent_channels, decoder.upscale) != (channels, factor):
        return (f"{path.name} decodes {decoder.latent_channels}-channel latents {decoder.upscale}x; this model's "
                f"VAE has {channels} channels at {factor}x (TAESD is trained for Stable Diffusion's own VAE)")
    return None


# -- choosing and running a method ----------------------------------------------------------------
def available_methods(model, vae_approx_dir: str | Path | None = None) -> list[str]:
    """The preview methods that work for this model as it is now: "cheap" and "full" always, "taesd"
    when a fitting TAESD decoder file is in `vae_approx_dir` (default models/VAE-approx)."""
    methods = [METHOD_CHEAP]
    if taesd_unavailable(model, vae_approx_dir) is None:
        methods.append(METHOD_TAESD)
    return methods + [METHOD_FULL]


def resolve_method(model, method: str, vae_approx_dir: str | Path | None = None) -> tuple[str, str | None]:
    """(the method that will run, why it is not the one asked for, or None). Only "taesd" can fall back
    (to "cheap"); an unknown method is a ValueError."""
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"unknown preview method {method!r} (one of {', '.join(METHODS)})")
    if method == METHOD_TAESD:
        reason = taesd_unavailable(model, vae_approx_dir)
        if reason is not None:
            return METHOD_CHEAP, reason
    return method, None


def cheap_kind(model) -> str:
    """What "cheap" runs for this model: "decoder" (its own learned preview decoder) or "linear"."""
    return "decoder" if getattr(model, "preview_decoder", None) is not None else "linear"


@torch.no_grad()
def latents_to_rgb(model, latents: torch.Tensor, method: str = METHOD_CHEAP, *,
                   vae_approx_dir: str | Path | None = None) -> torch.Tensor:
    """Preview of latents (as the sampler sees them) as (N, 3, h', w') RGB in [-1, 1] on the CPU.

    method "cheap": the model's preview decoder (image resolution) if it has one, else the
    linear map (latent resolution); "taesd": the TAESD decoder (image resolution), or "cheap"
    when there is none (logged once per reason; `resolve_method` tells the caller); "full": the
    model's VAE (image resolution, as slow as the final decode).
    """
    used, reason = resolve_method(model, method, vae_approx_dir)
    if reason is not None:
        key = (id(model), reason)
        if key not in _warned:
            _warned.add(key)
            log.warning("TAESD preview unavailable, using Approx cheap: %s", reason)
    if used == METHOD_FULL:
        return model.decode_first_stage(latents).clamp(-1, 1)
    if used == METHOD_TAESD:
        device = model.device
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        decoder = load_taesd_decoder(taesd_file(model, vae_approx_dir), getattr(model, "allow_pickle", False),
                                     device, dtype)
        return decoder(latents.detach().to(device, dtype)).float().cpu().clamp(-1, 1)
    decoder = getattr(model, "preview_decoder", None)
    if decoder is not None:
        return decoder(latents.detach().to("cpu", torch.float32)).clamp(-1, 1)
    factors, bias = model.latent_rgb
    return cheap_approximation(latents, factors, bias)


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
