"""VAE selection as AUTOMATIC1111 does it: list the VAE files, resolve the `sd_vae` setting, swap weights.

Where VAEs are found (AUTOMATIC1111's `refresh_vae_list`): every `.safetensors`, `.pt` and `.ckpt`
under `models/VAE` and `--vae-dir` (subfolders too), and every `*.vae.safetensors`, `*.vae.pt`,
`*.vae.ckpt` under the checkpoint folders. Each is named by its file name (the `model_name` of
GET /sdapi/v1/sd-vae); when two share a name the later folder wins, as there.

The `sd_vae` setting:
- "Automatic": a VAE file whose name starts with the checkpoint's name (`<ckpt>.vae.safetensors`
  beside it, or `<ckpt>...` in models/VAE: AUTOMATIC1111's `find_vae_near_checkpoint` matches the
  prefix), else the checkpoint's own VAE.
- "None": the checkpoint's own VAE.
- a file name from the list: that file ("specified in settings"). A name that is no longer listed
  falls back to the checkpoint's own VAE, as in AUTOMATIC1111 (the API refuses such a name first).
- `--vae-path FILE` overrides all of it; `sd_vae_overrides_per_model_preferences` false lets a VAE
  beside the checkpoint win over a named one (the two rules of AUTOMATIC1111's `resolve_vae`).

Files: `.safetensors` always; pickles (`.pt`, `.ckpt`) only with `allow_pickle`
(`--allow-pickle-checkpoints`), and then through `torch.load(weights_only=True)`. The weights may be
in the original (CompVis) layout (`encoder.down.0.block.0...`, also under `first_stage_model.`, or in
a checkpoint's `state_dict`) or in diffusers' (`encoder.down_blocks.0.resnets.0...`, also the
pre-0.14 attention names); the original layout goes through diffusers' own
`convert_ldm_vae_checkpoint`, offline, against the loaded model's VAE config.

Shapes: AUTOMATIC1111 does not tell an SD 1.x/2.x VAE from an SDXL one; they have the same shapes
(4 latent channels, widths 128/256/512/512) and differ only in their training (and in the scaling
factor, which stays the checkpoint's, as there), so neither does this module. What it does check,
before anything changes, is that every tensor of the file fits the loaded model's VAE (latent
channels, block widths, layers), and it refuses one that does not (an SD3/Flux 16-channel VAE, a
tiny test VAE on a full-size model) with a message that says both shapes. A refused, corrupt or
unreadable file leaves the VAE that was serving in place.

The swap itself (`sd_models.swap_vae`) copies the weights into the loaded VAE in place; the
checkpoint's own weights wait in CPU memory, so "None" goes back without reloading, bit for bit.
The VAE's name and short hash (sha256, cached on disk like the checkpoints') are on the model
(`model.vae_name`, `model.vae_hash`) for the infotext keys `VAE` and `VAE hash`.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modules import sd_models
from modules.cmd_args import DEFAULT_VAE_DIR
from modules.errors import ModelLoadError, ModelNotFound

log = logging.getLogger(__name__)

AUTOMATIC, NONE = "Automatic", "None"
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
PICKLE_SUFFIXES = (".pt", ".ckpt")
IGNORE_KEYS = {"model_ema.decay", "model_ema.num_updates"}  # AUTOMATIC1111's vae_ignore_keys (and "loss*")
LDM_PREFIXES = ("first_stage_model.", "vae.")


@dataclass
class VaeInfo(sd_models.CheckpointHash):
    """A VAE file: its path and AUTOMATIC1111's name for it (the file name)."""

    path: Path
    name: str
    hash_cache: sd_models.HashCache | None = field(default=None, repr=False, compare=False)

    @property
    def model_name(self) -> str:
        return self.name

    @property
    def filename(self) -> str:
        return str(self.path)

    @property
    def is_pickle(self) -> bool:
        return Path(self.path).suffix.lower() in PICKLE_SUFFIXES

    def api(self) -> dict:
        """One entry of GET /sdapi/v1/sd-vae."""
        return {"model_name": self.name, "filename": str(self.path)}


def vae_dirs_from_args(args) -> list[Path]:
    """The folders every VAE file of is listed: models/VAE and --vae-dir."""
    dirs = [DEFAULT_VAE_DIR]
    extra = getattr(args, "vae_dir", None)
    if extra and Path(extra).resolve() != DEFAULT_VAE_DIR.resolve():
        dirs.append(Path(extra))
    return dirs


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _walk(folder: Path, wanted) -> list[Path]:
    found = []
    if folder.is_file():
        return [folder] if wanted(folder.name) else []
    if not folder.is_dir():
        return found
    for root, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found += [Path(root) / f for f in files if not f.startswith(".") and wanted(f)]
    return sorted(found)


def list_vaes(dirs: list[Path], checkpoint_dirs: list[Path] = (),
              hash_cache: sd_models.HashCache | None = None) -> list[VaeInfo]:
    """Every VAE file, named and ordered as AUTOMATIC1111 lists them (natural sort of the names).

    `dirs`: VAE folders (models/VAE, --vae-dir), every .safetensors/.pt/.ckpt in them;
    `checkpoint_dirs`: checkpoint folders, only their `*.vae.*` files. Hashes are not computed here.
    """
    named: dict[str, Path] = {}
    is_vae_file = lambda f: f.lower().endswith(VAE_SUFFIXES)  # noqa: E731
    is_side_vae = lambda f: any(f.lower().endswith(".vae" + s) for s in VAE_SUFFIXES)  # noqa: E731
    for folder in checkpoint_dirs:
        for p in _walk(Path(folder), is_side_vae):
            named[p.name] = p
    for folder in dirs:
        for p in _walk(Path(folder), is_vae_file):
            named[p.name] = p
    return [VaeInfo(named[n], n, hash_cache) for n in sorted(named, key=_natural_key)]


def find_vae(name: str, dirs: list[Path], checkpoint_dirs: list[Path] = (),
             hash_cache: sd_models.HashCache | None = None) -> VaeInfo:
    """A listed VAE by its file name (or that name without its extension); ModelNotFound otherwise.
    Only listed files are found, so a name can never point outside the VAE and checkpoint folders."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFound(f"VAE not found: {name!r}")
    vaes = list_vaes(dirs, checkpoint_dirs, hash_cache)
    for info in vaes:
        if name == info.name:
            return info
    for info in vaes:
        if name == info.name.rsplit(".", 1)[0]:
            return info
    raise ModelNotFound(f"VAE not found: {name!r}")


def vae_choices(vaes: list[VaeInfo]) -> list[str]:
    """The values the `sd_vae` setting takes (AUTOMATIC1111's `sd_vae_items`)."""
    return [AUTOMATIC, NONE, *(v.name for v in vaes)]


def is_automatic(setting: str | None) -> bool:
    return setting in (AUTOMATIC, "auto")  # "auto": AUTOMATIC1111's old configs


def validate_setting(setting, vaes: list[VaeInfo]) -> str:
    """A value for `sd_vae` that names something that exists (for POST /options and override_settings,
    before anything switches): "Automatic", "None" or a listed file name; ModelNotFound otherwise.
    (AUTOMATIC1111 takes any text and falls back to the checkpoint's own VAE; a 404 says why instead.)"""
    if setting in (*vae_choices(vaes), "auto"):
        return setting
    if isinstance(setting, str):
        for info in vaes:
            if setting == info.name.rsplit(".", 1)[0]:
                return info.name
    raise ModelNotFound(f"VAE not found: {setting!r}")


def find_vae_near_checkpoint(checkpoint_path: str | Path, vaes: list[VaeInfo]) -> VaeInfo | None:
    """AUTOMATIC1111's rule: the first listed VAE whose file name starts with the checkpoint's name
    (without its extension); `<name>.vae.*` first, since that is the file meant for it."""
    stem = Path(checkpoint_path).name
    stem = stem.rsplit(".", 1)[0] if Path(checkpoint_path).is_file() else stem
    exact = [v for v in vaes if v.name.rsplit(".", 1)[0] == stem + ".vae"]
    prefixed = [v for v in vaes if v.name.startswith(stem)]
    return (exact or prefixed or [None])[0]


def resolve_vae(setting: str | None, checkpoint_path: str | Path | None, vaes: list[VaeInfo], *,
                vae_path: str | Path | None = None, overrides_per_model: bool = True,
                hash_cache: sd_models.HashCache | None = None) -> tuple[VaeInfo | None, str]:
    """Which VAE the setting means for a checkpoint: (VaeInfo or None for the checkpoint's own, why)."""
    if vae_path:
        return VaeInfo(Path(vae_path), Path(vae_path).name, hash_cache), "from commandline argument"
    automatic = is_automatic(setting)

    def from_setting() -> tuple[VaeInfo | None, str]:
        if setting == NONE or automatic:
            return None, "the checkpoint's own" if setting == NONE else "no VAE found near the checkpoint"
        for info in vaes:
            if info.name == setting:
                return info, "specified in settings"
        log.warning("Couldn't find VAE named %s; using None instead", setting)
        return None, f"VAE {setting!r} not found, the checkpoint's own"

    if overrides_per_model and not automatic:
        return from_setting()
    if checkpoint_path is not None:
        near = find_vae_near_checkpoint(checkpoint_path, vaes)
        if near is not None:
            return near, "found near the checkpoint"
    return from_setting()


# -- reading and converting ------------------------------------------------------------------
def read_vae_file(info: VaeInfo, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors (any layout); ModelLoadError with the reason for a refused or damaged file."""
    path = Path(info.path)
    if not path.is_file():
        raise ModelNotFound(f"VAE not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd = sd_models._read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(
                f"{path.name} is a pickle VAE ({suffix}); pickles can run code when loaded, so they are refused. "
                "Convert it to .safetensors, or start with --allow-pickle-checkpoints to load it with "
                "torch.load(weights_only=True).")
        sd = sd_models._read_pickle(path)
    else:
        raise ModelLoadError(f"{path.name}: not a VAE file (expected .safetensors, or a .pt/.ckpt pickle)")
    return {k: v for k, v in sd.items() if not k.startswith("loss") and k not in IGNORE_KEYS}


_OLD_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def to_diffusers_layout(sd: dict[str, torch.Tensor], config, name: str = "VAE") -> dict[str, torch.Tensor]:
    """A VAE state dict in either layout -> diffusers' AutoencoderKL keys (`config`: the target's)."""
    for prefix in LDM_PREFIXES:  # a VAE saved with its checkpoint prefix, or a whole checkpoint
        if any(k.startswith(prefix + "encoder.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in sd):
        out = {}
        for key, value in sd.items():
            if ".attentions." in key:
                for old, new in _OLD_ATTENTION.items():
                    key = key.replace(f".attentions.0.{old}", f".attentions.0.{new}")
            out[key] = value
        return out
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):
        from diffusers.loaders import single_file_utils as sfu

        try:
            return sfu.convert_ldm_vae_checkpoint(sd, dict(config))
        except Exception as e:
            raise ModelLoadError(f"{name}: its weights could not be converted from the original layout "
                                 f"({type(e).__name__}: {e})") from e
    raise ModelLoadError(f"{name} is not a VAE: it has no encoder./decoder. weights "
                         f"(a LoRA, an embedding, or a checkpoint without a VAE?)")


def describe(shapes: dict[str, tuple[int, ...]]) -> str:
    """"4 latent channels, block widths [128, 256, 512, 512], 2 layers per block" from diffusers keys."""
    latent = shapes.get("decoder.conv_in.weight", (None, None))[1]
    widths, i = [], 0
    while f"encoder.down_blocks.{i}.resnets.0.conv2.weight" in shapes:
        widths.append(shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0])
        i += 1
    layers = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")})
    return f"{latent} latent channels, block widths {widths}, {layers} layers per block"


def check_fits(sd: dict[str, torch.Tensor], model: sd_models.SDModel, name: str = "VAE") -> None:
    """ModelLoadError unless every tensor of `sd` (diffusers layout) has the loaded VAE's key and shape."""
    want = {k: tuple(v.shape) for k, v in model.vae.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    if want == have:
        return
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    detail = "; ".join(x for x in (
        f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "",
        f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
        f"{wrong[0]} is {list(have[wrong[0]])}, the model's {list(want[wrong[0]])}" if wrong else "") if x)
    raise ModelLoadError(f"{name} does not fit the loaded model's VAE: the file has {describe(have)}, the model "
                         f"{describe(want)} ({detail}). An SD 1.x/2.x or SDXL VAE fits SD 1.x, 2.x and SDXL "
                         f"checkpoints; VAEs of other architectures do not.")


def load_vae_weights(info: VaeInfo, model: sd_models.SDModel, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read, convert and check a VAE file for `model`, changing nothing (raises ModelLoadError)."""
    sd = to_diffusers_layout(read_vae_file(info, allow_pickle), model.vae.config, info.name)
    check_fits(sd, model, info.name)
    return sd


def apply_vae(model: sd_models.SDModel, vae: VaeInfo | None, allow_pickle: bool = False) -> VaeInfo | None:
    """Serve `vae` from the loaded model (None: the checkpoint's own). Everything is read and checked
    before anything changes, so a refused file leaves the previous VAE serving. Returns what serves."""
    current = model.vae_info
    if vae is None:
        sd_models.swap_vae(model, None)
        return None
    if current is not None and Path(current.path).resolve() == Path(vae.path).resolve():
        return current
    weights = load_vae_weights(vae, model, allow_pickle)
    vae.sha256  # noqa: B018 - for the infotext: hashed (once, cached on disk) now, between jobs, not during one
    sd_models.swap_vae(model, weights, vae)
    log.info("VAE %s loaded into %s", vae.name, model.name)
    return vae


def apply_vae_setting(model: sd_models.SDModel, setting: str | None, vaes: list[VaeInfo], *,
                      vae_path: str | Path | None = None, overrides_per_model: bool = True,
                      allow_pickle: bool = False) -> tuple[VaeInfo | None, str]:
    """Resolve the `sd_vae` setting for the loaded checkpoint and apply it (after a checkpoint switch, or
    when the setting changes): (what serves now, why). Raises as apply_vae does, leaving the VAE."""
    info, source = resolve_vae(setting, model.path, vaes, vae_path=vae_path, overrides_per_model=overrides_per_model,
                               hash_cache=model.hash_cache)
    return apply_vae(model, info, allow_pickle), source


def infotext_params(model: sd_models.SDModel, options=None) -> dict[str, str | None]:
    """The infotext keys `VAE hash` and `VAE` (AUTOMATIC1111's, after `Model`), None with the
    checkpoint's own VAE; `options` may turn them off (add_vae_hash_to_info, add_vae_name_to_info)."""
    get = (options.get if options is not None else lambda k, d=None: d)
    return {"VAE hash": model.vae_hash if get("add_vae_hash_to_info", True) else None,
            "VAE": model.vae_name if get("add_vae_name_to_info", True) else None}
