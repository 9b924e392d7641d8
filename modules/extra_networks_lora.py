"""LoRA for a job: `<lora:name:multiplier>`, `<lora:name:te:unet>`, `<lora:name:te=0.5:unet=1>`.

Files come from the LoRA folder (`--lora-dir`, default `models/Lora`, subfolders too): `.safetensors`,
and `.pt` / `.ckpt` / `.bin` read with `torch.load(weights_only=True)` (a pickle holding more than
tensors is refused). kohya-ss (`lora_unet_...`, `lora_te_...`, `lora_te1_/te2_` for SDXL, with
`.alpha`) and diffusers / peft (`unet....lora_A.weight`) layouts, SD 1.x/2.x and SDXL. They are read
with diffusers' own LoRA machinery (`StableDiffusion[XL]LoraLoaderMixin.lora_state_dict`, which
converts kohya's keys, then `load_lora_into_unet` / `load_lora_into_text_encoder`), so the UNet and
text encoder(s) get peft adapter layers; the multipliers become peft's adapter weights (signed:
a negative multiplier subtracts), separately for the text encoder (`te`) and the UNet (`unet`).

For a job the adapters it names are enabled with its weights; after it (also when it failed)
every adapter layer is disabled, so the model computes exactly what it did without them (peft's
disabled layer calls only the base layer: bit for bit). Adapters stay loaded, keyed by file,
size and modification time, so a LoRA that the next job names again is not read again; the least
recently used beyond `MAX_CACHED` are deleted. A multiplier of 0 leaves that part out entirely.

A LoRA that cannot be applied (not found, not a number, unreadable, not this model's layers)
is a warning for the job, which runs without it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LORA_DIR = REPO / "models" / "Lora"
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
MAX_CACHED = 8
METADATA_ORDER = {"ss_sd_model_name": 1, "ss_resolution": 2, "ss_clip_skip": 3, "ss_num_train_images": 10,
                  "ss_tag_frequency": 20}


class LoraError(Exception):
    """Why a LoRA file cannot be applied to the model (the job's warning)."""


# -- on disk -------------------------------------------------------------------------------------
def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def addnet_hash_safetensors(path: Path) -> str:
    """kohya-ss's hash of a .safetensors file (AUTOMATIC1111 names LoRAs by it): sha256 of the bytes after the
    header, so editing the metadata does not change it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(n + 8)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_hash_cache: dict[tuple, str] = {}
_hash_lock = threading.Lock()


@dataclass
class LoraOnDisk:
    """A LoRA file: `name` is its file name without the suffix, `alias` its `ss_output_name` (or the name)."""

    name: str
    filename: str
    metadata: dict = field(default_factory=dict)

    @property
    def is_safetensors(self) -> bool:
        return self.filename.lower().endswith(".safetensors")

    @property
    def alias(self) -> str:
        return str(self.metadata.get("ss_output_name") or self.name)

    def stamp(self) -> tuple[str, int, int]:
        st = os.stat(self.filename)
        return str(Path(self.filename).resolve()), st.st_size, st.st_mtime_ns

    @property
    def hash(self) -> str:
        """AUTOMATIC1111's: the metadata's `sshs_model_hash`, else kohya's addnet hash (.safetensors) or the
        file's sha256; computed once per file version."""
        if self.metadata.get("sshs_model_hash"):
            return str(self.metadata["sshs_model_hash"])
        key = self.stamp()
        with _hash_lock:
            if key in _hash_cache:
                return _hash_cache[key]
        try:
            digest = addnet_hash_safetensors(Path(self.filename)) if self.is_safetensors \
                else _file_sha256(Path(self.filename))
        except OSError:
            return ""
        with _hash_lock:
            _hash_cache[key] = digest
        return digest

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    def api_dict(self) -> dict:
        """One entry of AUTOMATIC1111's GET /sdapi/v1/loras."""
        return {"name": self.name, "alias": self.alias, "path": self.filename, "metadata": self.metadata}


def list_loras(lora_dir: str | Path | None = None) -> dict[str, LoraOnDisk]:
    """The LoRA files under `lora_dir` (subfolders too, sorted by path), by name."""
    folder = Path(lora_dir) if lora_dir is not None else DEFAULT_LORA_DIR
    found: dict[str, LoraOnDisk] = {}
    if not folder.is_dir():
        return found
    paths = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [Path(root) / f for f in files if f.lower().endswith(LORA_SUFFIXES) and not f.startswith(".")]
    for p in sorted(paths, key=lambda p: p.relative_to(folder).as_posix().lower()):
        metadata = {}
        if p.suffix.lower() == ".safetensors":
            try:
                metadata = _safetensors_metadata(p)
            except Exception:
                metadata = {}  # unreadable: listed all the same; applying it says why
            metadata.pop("ssmd_cover_images", None)  # pictures, too big to show as text
            metadata = dict(sorted(metadata.items(), key=lambda kv: METADATA_ORDER.get(kv[0], 999)))
        found.setdefault(p.stem, LoraOnDisk(p.stem, str(p), metadata))
    return found


def get_loras(lora_dir: str | Path | None = None) -> list[dict]:
    """AUTOMATIC1111's GET /sdapi/v1/loras: [{"name", "alias", "path", "metadata"}]."""
    return [entry.api_dict() for entry in list_loras(lora_dir).values()]


def find_lora(name: str, loras: dict[str, LoraOnDisk]) -> LoraOnDisk | None:
    """By file name, else by alias (AUTOMATIC1111's lookup)."""
    if name in loras:
        return loras[name]
    for entry in loras.values():
        if entry.alias == name:
            return entry
    return None


def read_lora_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise LoraError(f"not a readable .safetensors file (truncated or corrupt?): {type(e).__name__}: {e}")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoraError(f"could not be read with torch.load(weights_only=True) (a pickle that holds more than "
                        f"tensors is refused): {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraError(f"holds a {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


# -- multipliers ----------------------------------------------------------------------------------
@dataclass
class LoraRequest:
    """One `<lora:...>` tag: the name as written (mentioned_name) and its two multipliers."""

    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    items: list[str] = field(default_factory=list)


def parse_lora_params(params) -> LoraRequest:
    """AUTOMATIC1111's reading of `<lora:name:te:unet>` with `te=` / `unet=` overriding; unet defaults to te.
    ValueError (with the tag) for a multiplier that is not a finite number."""
    tag = f"<lora:{':'.join(params.items)}>"
    if not params.positional:
        raise ValueError(f"{tag}: no LoRA name")
    name = params.positional[0]
    try:
        te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
        te = float(params.named.get("te", te))
        unet = float(params.positional[2]) if len(params.positional) > 2 else te
        unet = float(params.named.get("unet", unet))
    except ValueError as e:
        raise ValueError(f"{tag}: the multiplier is not a number ({e})") from None
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise ValueError(f"{tag}: the multiplier is not a finite number")
    return LoraRequest(name, te, unet, list(params.items))


# -- on the model ---------------------------------------------------------------------------------
@dataclass
class AppliedLora:
    """A LoRA applied to the job: as the prompt named it, its file and the weights used."""

    mentioned_name: str
    lora: LoraOnDisk
    adapter: str
    te_multiplier: float
    unet_multiplier: float


@dataclass
class _Adapter:
    name: str  # peft adapter name
    stamp: tuple
    components: set[str]  # "unet", "text_encoder", "text_encoder_2" that got layers
    last_used: int = 0


class LoraState:
    """The adapters loaded into one model (SDModel.lora_state) and the LoRA folder they come from."""

    def __init__(self, lora_dir: str | Path | None = None):
        self.lora_dir = Path(lora_dir) if lora_dir is not None else DEFAULT_LORA_DIR
        self.adapters: dict[str, _Adapter] = {}  # by resolved file path
        self.active = False
        self.clock = 0
        self.lock = threading.RLock()
        self._counter = 0

    def new_adapter_name(self) -> str:
        self._counter += 1
        return f"lora{self._counter}"


def lora_state(model) -> LoraState:
    state = getattr(model, "lora_state", None)
    if state is None:
        state = LoraState()
        model.lora_state = state
    return state


def _components(model) -> dict[str, torch.nn.Module]:
    cs = model.cond_stage
    if hasattr(cs, "clip_l"):
        return {"unet": model.unet, "text_encoder": cs.clip_l.text_encoder, "text_encoder_2": cs.clip_g.text_encoder}
    return {"unet": model.unet, "text_encoder": cs.text_encoder}


def _adapter_layers(module: torch.nn.Module, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            weights = getattr(m, "lora_A", None)
            if weights is not None and adapter in weights:
                n += 1
    return n


def _delete_adapter(model, adapter: str) -> None:
    with _quiet_diffusers():
        _delete_adapter_layers(model, adapter)


def _delete_adapter_layers(model, adapter: str) -> None:
    from diffusers.loaders.lora_base import delete_adapter_layers

    for key, module in _components(model).items():
        if adapter not in (getattr(module, "peft_config", None) or {}):
            continue
        if key == "unet":
            module.delete_adapters([adapter])
        else:
            delete_adapter_layers(module, adapter)
            if getattr(module, "peft_config", None) is not None:
                module.peft_config.pop(adapter, None)


def _quiet_diffusers():
    """diffusers logs (not raises) when keys are left over; we count layers ourselves and report that."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def quiet():
        import warnings

        loggers = [logging.getLogger(n) for n in ("diffusers.loaders.peft", "diffusers.loaders.lora_base",
                                                 "diffusers.loaders.lora_pipeline", "diffusers.utils.peft_utils")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR + 10)
        try:
            with warnings.catch_warnings():  # peft: "Already found a peft_config", "Setting active adapter to"
                warnings.simplefilter("ignore", UserWarning)
                yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)

    return quiet()


def load_adapter(model, lora: LoraOnDisk, adapter: str) -> set[str]:
    """Read `lora` and load it into the model's UNet and text encoder(s) as peft adapter `adapter`, with
    diffusers' loaders. Returns the components that got layers; LoraError (nothing left loaded) if none did
    or the weights do not fit."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    if getattr(model, "execution_device", None) is not None and any(
            hasattr(m, "_hf_hook") for m in model.unet.modules() if m is not model.unet):
        raise LoraError("LoRA is not supported with --lowvram (layer-by-layer offload); use --medvram")
    state_dict = read_lora_state_dict(lora.filename)
    if not state_dict:
        raise LoraError("holds no tensors")
    sdxl = hasattr(model.cond_stage, "clip_l")
    mixin = StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin
    components = _components(model)
    try:
        with _quiet_diffusers():
            sd, alphas = mixin.lora_state_dict(dict(state_dict), unet_config=model.unet.config)
    except Exception as e:
        raise LoraError(f"not a LoRA diffusers can read: {type(e).__name__}: {e}")
    if not sd or not all("lora" in k for k in sd):
        raise LoraError("not a LoRA (its keys do not name lora weights)")
    loaded: set[str] = set()
    try:
        with _quiet_diffusers():
            if any(k.startswith("unet.") for k in sd):
                mixin.load_lora_into_unet(sd, alphas, model.unet, adapter_name=adapter)
            prefixes = [("text_encoder", "text_encoder")] + ([("text_encoder_2", "text_encoder_2")] if sdxl else [])
            for key, prefix in prefixes:
                if any(k.startswith(prefix + ".") for k in sd):
                    mixin.load_lora_into_text_encoder(sd, alphas, components[key], prefix=prefix,
                                                      adapter_name=adapter)
    except Exception as e:
        _delete_adapter(model, adapter)
        text = str(e).splitlines()[0][:300] if str(e) else ""
        raise LoraError(f"does not fit this model ({type(e).__name__}: {text})")
    for key, module in components.items():
        if _adapter_layers(module, adapter):
            loaded.add(key)
    if not loaded:
        _delete_adapter(model, adapter)
        raise LoraError("none of its layers is a layer of this model (a LoRA for another architecture?)")
    return loaded


def _set_component(model, key: str, module, names: list[str], weights: list[float]) -> None:
    from diffusers.loaders.lora_base import (disable_lora_for_text_encoder, enable_lora_for_text_encoder,
                                             set_adapters_for_text_encoder)

    if not getattr(module, "peft_config", None):
        return
    if key == "unet":
        if names:
            module.set_adapters(names, weights)
            module.enable_lora()
        else:
            module.disable_lora()
    elif names:
        set_adapters_for_text_encoder(names, module, weights)
        enable_lora_for_text_encoder(module)
    else:
        disable_lora_for_text_encoder(module)


def activate(model, params_list, lora_dir: str | Path | None = None) -> tuple[list[AppliedLora], list[str]]:
    """Apply the LoRAs of a job's `<lora:...>` tags (ExtraNetworkParams) to `model`; returns (applied, warnings).
    Every other loaded adapter is off. A tag that cannot be honoured is a warning, and left out."""
    state = lora_state(model)
    warnings: list[str] = []
    applied: list[AppliedLora] = []
    if not params_list and not state.adapters:
        return applied, warnings
    with state.lock:
        folder = Path(lora_dir) if lora_dir is not None else state.lora_dir
        available = list_loras(folder) if params_list else {}
        requests = []
        for params in params_list:
            try:
                requests.append(parse_lora_params(params))
            except ValueError as e:
                warnings.append(f"LoRA left out: {e}")
        missing = []
        state.clock += 1
        for req in requests:
            lora = find_lora(req.name, available)
            if lora is None:
                missing.append(req.name)
                continue
            stamp = lora.stamp()
            cached = state.adapters.get(stamp[0])
            if cached is not None and cached.stamp != stamp:  # the file changed: read it again
                _delete_adapter(model, cached.name)
                del state.adapters[stamp[0]]
                cached = None
            if cached is None:
                adapter = state.new_adapter_name()
                try:
                    components = load_adapter(model, lora, adapter)
                except LoraError as e:
                    warnings.append(f"LoRA {req.name} left out: {lora.filename}: {e}")
                    continue
                except Exception as e:  # anything else a damaged file can raise
                    _delete_adapter(model, adapter)
                    warnings.append(f"LoRA {req.name} left out: {lora.filename}: {type(e).__name__}: {e}")
                    continue
                cached = state.adapters[stamp[0]] = _Adapter(adapter, stamp, components)
            cached.last_used = state.clock
            applied.append(AppliedLora(req.name, lora, cached.name, req.te_multiplier, req.unet_multiplier))
        if missing:
            warnings.append(f"Networks not found: {', '.join(missing)}")
        _evict(model, state, keep={a.adapter for a in applied})
        by_adapter = {a.adapter: a for a in applied}  # the same file twice: the last tag's weights
        for key, module in _components(model).items():
            names, weights = [], []
            for adapter, a in by_adapter.items():
                weight = a.unet_multiplier if key == "unet" else a.te_multiplier
                entry = next(x for x in state.adapters.values() if x.name == adapter)
                if key in entry.components and weight != 0:
                    names.append(adapter)
                    weights.append(weight)
            _set_component(model, key, module, names, weights)
        state.active = bool(applied)
    return applied, warnings


def _evict(model, state: LoraState, keep: set[str]) -> None:
    if len(state.adapters) <= MAX_CACHED:
        return
    for path, entry in sorted(state.adapters.items(), key=lambda kv: kv[1].last_used):
        if len(state.adapters) <= MAX_CACHED:
            break
        if entry.name not in keep:
            _delete_adapter(model, entry.name)
            del state.adapters[path]


def deactivate(model) -> None:
    """Turn every adapter layer off: the model computes exactly what it computes without LoRA."""
    state = getattr(model, "lora_state", None)
    if state is None or not state.adapters:
        return
    with state.lock:
        for key, module in _components(model).items():
            _set_component(model, key, module, [], [])
        state.active = False


def unload_all(model) -> None:
    """Delete every adapter from the model (frees their memory; the next use reads the file again)."""
    state = getattr(model, "lora_state", None)
    if state is None:
        return
    with state.lock:
        for entry in list(state.adapters.values()):
            _delete_adapter(model, entry.name)
        state.adapters.clear()
        state.active = False


def lora_hashes_infotext(applied: list[AppliedLora]) -> dict[str, str]:
    """{"Lora hashes": "name: hash, name2: hash2"} as AUTOMATIC1111 writes it (`:` and `,` removed from the
    names as written in the prompt, 12-digit hashes); {} when no LoRA was applied."""
    hashes, seen = [], set()
    for a in applied:
        alias = a.mentioned_name.replace(":", "").replace(",", "")
        shorthash = a.lora.shorthash
        if not alias or not shorthash or alias in seen:
            continue
        seen.add(alias)
        hashes.append(f"{alias}: {shorthash}")
    return {"Lora hashes": ", ".join(hashes)} if hashes else {}


def metadata_json(lora: LoraOnDisk) -> str:
    return json.dumps(lora.metadata, indent=1, ensure_ascii=False)
