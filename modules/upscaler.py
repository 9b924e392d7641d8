"""Upscalers: the latent modes of the hires fix, the plain pixel filters, and ESRGAN-family models.

Names and shapes are AUTOMATIC1111's, so its clients find their way:
- `latent_upscale_modes()` is `/sdapi/v1/latent-upscale-modes` (`[{"name": "Latent"}, ...]`), each
  a `torch.nn.functional.interpolate` mode of the latent (`upscale_latent`);
- `list_upscalers(models_dir)` is `/sdapi/v1/upscalers`: `None`, `Lanczos`, `Nearest`, then every
  model file in `models_dir/ESRGAN/` (named by its file name without extension), as `UpscalerInfo`
  (name, model_name, model_path, model_url, scale);
- `upscale_image(image, name, scale or size, models_dir)` runs one on a PIL image, with
  AUTOMATIC1111's `Upscaler.upscale` rule (up to three passes of the model until the picture is
  big enough, then Lanczos to the exact size, a multiple of 8 for a scale).

Model files are loaded with spandrel, which detects the architecture (ESRGAN / RRDBNet, Real-ESRGAN,
SwinIR, DAT, ...) from the state dict's keys. `.safetensors` files are read with safetensors;
`.pth` / `.pt` / `.ckpt` pickles are refused unless the caller allows pickles, and then read with
`torch.load(weights_only=True)`. spandrel declares torchvision as a dependency, which this project
does not install (PyPI's torchvision breaks `import transformers` here); only two of its
architectures use it (LaMa inpainting and RestoreFormer face restoration), so spandrel is
imported with a stand-in for those imports, and models of those architectures are refused.
"""
from __future__ import annotations

import importlib.machinery
import re
import sys
import threading
import types
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modules.errors import InvalidParameter, ModelLoadError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = REPO / "models"
LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST

# AUTOMATIC1111's shared.latent_upscale_modes, in its order; "Latent" is its default.
LATENT_UPSCALE_MODES: dict[str, dict] = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
LATENT_UPSCALE_DEFAULT = "Latent"
BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")
MODEL_FOLDERS = ("ESRGAN",)  # under models_dir, as AUTOMATIC1111's models/ESRGAN
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
UNSUPPORTED_ARCHITECTURES = {"LaMa": "needs torchvision", "RestoreFormer": "needs torchvision"}
ESRGAN_TILE, ESRGAN_TILE_OVERLAP = 192, 8  # AUTOMATIC1111's options ESRGAN_tile / ESRGAN_tile_overlap


@dataclass(frozen=True)
class UpscalerInfo:
    """One entry of `/sdapi/v1/upscalers`."""

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float = 4

    def js(self) -> dict:
        return asdict(self)


def latent_upscale_modes() -> list[dict]:
    """`/sdapi/v1/latent-upscale-modes`: `[{"name": "Latent"}, {"name": "Latent (antialiased)"}, ...]`."""
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


def is_latent_upscaler(name: str | None) -> bool:
    return name is None or name in LATENT_UPSCALE_MODES


def _scale_from_name(name: str) -> float:
    """`4x-UltraSharp`, `RealESRGAN_x4plus`, `2x_foo`: the factor the name promises (4 if it says none)."""
    m = re.search(r"(?:^|[^a-z0-9])(\d)x|x(\d)(?:[^0-9]|$)", name.lower())
    return float(m.group(1) or m.group(2)) if m else 4.0


def list_upscalers(models_dir: str | Path | None = None) -> list[UpscalerInfo]:
    """None, Lanczos, Nearest, then the model files of `models_dir/ESRGAN/` (sorted by name)."""
    found = [UpscalerInfo("None"), UpscalerInfo("Lanczos"), UpscalerInfo("Nearest")]
    root = Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR
    for folder in MODEL_FOLDERS:
        d = root / folder
        if not d.is_dir():
            continue
        files = sorted((f for f in d.iterdir() if f.is_file() and f.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES
                        and not f.name.startswith(".")), key=lambda f: f.name.lower())
        for f in files:
            found.append(UpscalerInfo(f.stem, model_name=folder, model_path=str(f), scale=_scale_from_name(f.stem)))
    return found


def upscaler_names(models_dir: str | Path | None = None) -> list[str]:
    """Every name `hr_upscaler` accepts: the latent modes, then the pixel upscalers."""
    return [*LATENT_UPSCALE_MODES, *(u.name for u in list_upscalers(models_dir))]


def find_upscaler(name: str, models_dir: str | Path | None = None, field: str = "hr_upscaler") -> UpscalerInfo:
    """A pixel upscaler by name (exactly, else case-insensitively); InvalidParameter (422) naming what exists."""
    upscalers = list_upscalers(models_dir)
    for exact in (True, False):
        for u in upscalers:
            if (u.name == name) if exact else (u.name.lower() == str(name).strip().lower()):
                return u
    raise InvalidParameter(f"Unknown upscaler {name!r}. Available: {', '.join(upscaler_names(models_dir))}",
                           field=field)


def upscale_latent(latent: torch.Tensor, mode: str | None, size: tuple[int, int]) -> torch.Tensor:
    """Resize latents (N, C, h, w) to `size` (h, w) with one of the latent upscale modes (None: "Latent")."""
    spec = LATENT_UPSCALE_MODES[mode or LATENT_UPSCALE_DEFAULT]
    return torch.nn.functional.interpolate(latent, size=tuple(size), mode=spec["mode"], antialias=spec["antialias"])


# ---- model files -----------------------------------------------------------------------------------------

_spandrel_lock = threading.Lock()
_spandrel_module = None


def _stub_torchvision() -> dict[str, types.ModuleType]:
    """Stand-ins for the two torchvision imports spandrel makes at import time (LaMa, RestoreFormer)."""

    def missing(*_, **__):
        raise ModelLoadError("this model architecture needs torchvision, which is not installed")

    class InterpolationMode:  # only referenced as a default argument
        NEAREST = BILINEAR = BICUBIC = None

    mods = {}
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__path__ = []
        mods[name] = m
    f = mods["torchvision.transforms.functional"]
    f.InterpolationMode, f.rotate, f.normalize = InterpolationMode, missing, missing
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].functional = f
    return mods


def spandrel():
    """spandrel, imported once; without torchvision through stand-ins that are removed right after,
    so nothing else (transformers checks whether torchvision is installed) ever sees them."""
    global _spandrel_module
    with _spandrel_lock:
        if _spandrel_module is None:
            stubs = {}
            try:
                import torchvision  # noqa: F401
            except Exception:
                stubs = {k: v for k, v in _stub_torchvision().items() if k not in sys.modules}
                for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
                    sys.modules.pop(name)  # a failed half-import
            sys.modules.update(stubs)
            try:
                import spandrel as module
            except ImportError as e:
                raise ModelLoadError(f"upscaler models need the spandrel package: {e}") from e
            finally:
                for name in stubs:
                    if sys.modules.get(name) is stubs[name]:
                        del sys.modules[name]
            _spandrel_module = module
    return _spandrel_module


def read_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ModelLoadError(f"{path.name} is not a readable .safetensors file: {type(e).__name__}: {e}",
                                 field="hr_upscaler") from e
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(f"{path.name} is a pickle ({suffix}); pickles can run code when loaded, so they are "
                                 "refused. Convert it to .safetensors, or start with --allow-pickle-checkpoints to "
                                 "load it with torch.load(weights_only=True).", field="hr_upscaler")
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"Could not load {path.name} with torch.load(weights_only=True): "
                                 f"{type(e).__name__}: {e}", field="hr_upscaler") from e
        for key in ("params_ema", "params", "state_dict", "model"):  # the layouts upscaler files come in
            if isinstance(data, dict) and isinstance(data.get(key), dict):
                data = data[key]
                break
        if not isinstance(data, dict):
            raise ModelLoadError(f"{path.name} holds a {type(data).__name__}, not a state dict", field="hr_upscaler")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    raise ModelLoadError(f"{path.name}: not an upscaler model file", field="hr_upscaler")


_model_cache: OrderedDict = OrderedDict()
_model_cache_lock = threading.Lock()
MODEL_CACHE_SIZE = 2


def load_upscaler_model(path: str | Path, allow_pickle: bool = False, device: torch.device | str = "cpu"):
    """The spandrel ImageModelDescriptor of a model file, eval mode, on `device` (cached: the last two)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime, str(device))
    with _model_cache_lock:
        if key in _model_cache:
            _model_cache.move_to_end(key)
            return _model_cache[key]
    sp = spandrel()
    state_dict = read_state_dict(path, allow_pickle)
    try:
        descriptor = sp.ModelLoader().load_from_state_dict(state_dict)
    except Exception as e:
        raise ModelLoadError(f"{path.name}: not an upscaler model spandrel knows ({type(e).__name__}: {e})",
                             field="hr_upscaler") from e
    arch = descriptor.architecture.id
    if arch in UNSUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path.name} is a {arch} model, which is not supported ({UNSUPPORTED_ARCHITECTURES[arch]})",
                             field="hr_upscaler")
    if not isinstance(descriptor, sp.ImageModelDescriptor) or descriptor.input_channels != 3 \
            or descriptor.output_channels != 3:
        raise ModelLoadError(f"{path.name} is a {arch} model that does not turn RGB pictures into RGB pictures",
                             field="hr_upscaler")
    descriptor.model.eval().requires_grad_(False)
    descriptor.to(device)
    with _model_cache_lock:
        _model_cache[key] = descriptor
        while len(_model_cache) > MODEL_CACHE_SIZE:
            _model_cache.popitem(last=False)
    return descriptor


def tiled_upscale(img: torch.Tensor, model, scale: int, tile_size: int = ESRGAN_TILE,
                  tile_overlap: int = ESRGAN_TILE_OVERLAP) -> torch.Tensor:
    """Run `model` on overlapping tiles and average where they overlap (AUTOMATIC1111's `tiled_upscale_2`)."""
    _, c, h, w = img.shape
    tile_size = min(tile_size, h, w)
    if tile_size <= 0 or (h <= tile_size and w <= tile_size):
        return model(img)
    stride = max(1, tile_size - tile_overlap)
    hs = list(range(0, h - tile_size, stride)) + [h - tile_size]
    ws = list(range(0, w - tile_size, stride)) + [w - tile_size]
    result = torch.zeros(img.shape[0], c, h * scale, w * scale, device=img.device, dtype=img.dtype)
    weights = torch.zeros_like(result)
    for y in hs:
        for x in ws:
            out = model(img[..., y:y + tile_size, x:x + tile_size])
            result[..., y * scale:(y + tile_size) * scale, x * scale:(x + tile_size) * scale] += out
            weights[..., y * scale:(y + tile_size) * scale, x * scale:(x + tile_size) * scale] += 1
    return result / weights


@torch.no_grad()
def model_upscale_once(image: Image.Image, descriptor) -> Image.Image:
    """One pass of the model over the picture (RGB in [0, 1]), tiled."""
    device = next(descriptor.model.parameters()).device
    dtype = next(descriptor.model.parameters()).dtype
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(device, dtype)
    out = tiled_upscale(x, descriptor, int(descriptor.scale))
    out = (out.float().clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(out)


def _do_upscale(image: Image.Image, info: UpscalerInfo, scale: float, allow_pickle: bool, device) -> Image.Image:
    if info.name == "None":
        return image
    if info.name == "Lanczos":
        return image.resize((int(image.width * scale), int(image.height * scale)), resample=LANCZOS)
    if info.name == "Nearest":
        return image.resize((int(image.width * scale), int(image.height * scale)), resample=NEAREST)
    return model_upscale_once(image, load_upscaler_model(info.model_path, allow_pickle, device))


def upscale(image: Image.Image, info: UpscalerInfo, scale: float, allow_pickle: bool = False,
            device: torch.device | str = "cpu") -> Image.Image:
    """AUTOMATIC1111's `Upscaler.upscale`: to `int(side * scale) // 8 * 8`, by up to three passes, then Lanczos."""
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for _ in range(3):
        if image.width >= dest_w and image.height >= dest_h and scale != 1:
            break
        shape = image.size
        image = _do_upscale(image, info, scale, allow_pickle, device)
        if shape == image.size:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def upscale_image(image: Image.Image, upscaler_name: str | None, scale: float | None = None,
                  size: tuple[int, int] | None = None, models_dir: str | Path | None = None,
                  allow_pickle: bool = False, device: torch.device | str = "cpu") -> Image.Image:
    """Upscale a picture with the pixel upscaler `upscaler_name` by `scale`, or to `size` (w, h).

    To a size, as AUTOMATIC1111's `resize_image`: no upscaler (None or "None") or a mask is a plain
    Lanczos resize; otherwise the upscaler runs for `max(w / width, h / height)` when that is over 1,
    and Lanczos makes the exact size.
    """
    if (scale is None) == (size is None):
        raise ValueError("give either scale or size")
    info = find_upscaler(upscaler_name or "None", models_dir)
    if size is None:
        return upscale(image, info, scale, allow_pickle, device)
    w, h = size
    if info.name == "None" or image.mode == "L":
        return image.resize((w, h), resample=LANCZOS)
    factor = max(w / image.width, h / image.height)
    if factor > 1.0:
        image = upscale(image, info, factor, allow_pickle, device)
    if image.size != (w, h):
        image = image.resize((w, h), resample=LANCZOS)
    return image
