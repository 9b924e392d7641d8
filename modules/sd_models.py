"""Find and load Stable Diffusion checkpoints, offline.

A loaded checkpoint is an `SDModel`: the diffusers components plus what the engine needs
to know about them (noise schedule, prediction type, latent shape, preview factors). It
is a plain object handed to `processing.process_images`; nothing here is global.

Checkpoints come as diffusers folders (with `model_index.json`) or as single files in the
original layout: `.safetensors` always, pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) only when the
caller allows them (`--allow-pickle-checkpoints`), and then through `torch.load(weights_only=True)`.
SD 1.x, SD 2.x (epsilon and v-prediction) and SDXL base are recognised from the weights
(`sd_models_config`); their configs and tokenizer ship in `configs/`, so nothing is fetched.

Listing titles a checkpoint as AUTOMATIC1111 does, `name.safetensors [shorthash]`, the
first 10 hex digits of its sha256. Hashing a 7 GB file takes a while, so hashes are kept in
a JSON file (`cache/checkpoint-hashes.json`) keyed by path, size and modification time.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from modules import sd_models_config
from modules.errors import ModelLoadError, ModelNotFound
from modules.sd_hijack_clip import CLIPTextConditioner, SDXLTextConditioner

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HASH_CACHE = REPO / "cache" / "checkpoint-hashes.json"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

# AUTOMATIC1111's "Approx cheap" factors for SD 1.x/2.x latents (rows: latent channels; cols: R, G, B).
SD1_LATENT_RGB = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
SDXL_LATENT_RGB = [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163],
                   [-0.3730, -0.2499, -0.2088]]
# SD3's 16-channel latents (AUTOMATIC1111's sd_vae_approx.cheap_approximation). A1111 adds no bias to any of
# them and uses SD 1.x's factors for SD 2.x (the same VAE).
SD3_LATENT_RGB = [[-0.0645, 0.0177, 0.1052], [0.0028, 0.0312, 0.0650], [0.1848, 0.0762, 0.0360],
                  [0.0944, 0.0360, 0.0889], [0.0897, 0.0506, -0.0364], [-0.0020, 0.1203, 0.0284],
                  [0.0855, 0.0118, 0.0283], [-0.0539, 0.0658, 0.1047], [-0.0057, 0.0116, 0.0700],
                  [-0.0412, 0.0281, -0.0039], [0.1106, 0.1171, 0.1220], [-0.0248, 0.0682, -0.0481],
                  [0.0815, 0.0846, 0.1207], [-0.0120, -0.0055, -0.0867], [-0.0749, -0.0634, -0.0456],
                  [-0.1418, -0.1457, -0.1259]]
LATENT_RGB_BY_ARCH = {"sd1": SD1_LATENT_RGB, "sd2": SD1_LATENT_RGB, "sdxl": SDXL_LATENT_RGB, "sd3": SD3_LATENT_RGB}


def default_latent_rgb(arch: str) -> tuple[list[list[float]], list[float]]:
    """AUTOMATIC1111's "Approx cheap" (factors, bias) for an architecture; SD 1.x's for an unknown one."""
    return LATENT_RGB_BY_ARCH.get(arch, SD1_LATENT_RGB), [0.0, 0.0, 0.0]


class CheckpointHash:
    """The sha256 of `self.path` (cached on disk by HashCache) and AUTOMATIC1111's 10-digit short hash."""

    path: Path
    hash_cache: "HashCache | None"

    @cached_property
    def sha256(self) -> str:
        return (self.hash_cache or HashCache.default()).sha256(self.path)

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]


@dataclass
class SDModel(CheckpointHash):
    """The parts of a Stable Diffusion checkpoint and the facts the sampler needs about them.

    `cond_stage` is a CLIPTextConditioner (SD 1.x/2.x: conditioning is a (1, T, C) tensor) or an
    SDXLTextConditioner (SDXL: a CondDict with "crossattn" and the pooled "vector").
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    cond_stage: CLIPTextConditioner | SDXLTextConditioner
    scheduler_config: dict
    name: str
    path: Path
    latent_rgb: tuple[list[list[float]], list[float]] = field(default=(SD1_LATENT_RGB, [0.0, 0.0, 0.0]))
    arch: str = "sd1"  # "sd1", "sd2" or "sdxl"
    execution_device: torch.device | None = None  # with CPU offload: where the weights run, not where they rest
    hash_cache: "HashCache | None" = None
    prediction_type_source: str = "config"  # scheduler config, yaml, metadata, unet-test or architecture
    embedding_db: object = field(default=None, repr=False)  # textual_inversion.EmbeddingDatabase (load_model sets it)
    lora_state: object = field(default=None, repr=False)  # extra_networks_lora.LoraState: adapters loaded into it
    allow_pickle: bool = False  # loaded with --allow-pickle-checkpoints: pickled side files (TAESD .pth) may load too
    vae_info: object = field(default=None, repr=False)  # sd_vae.VaeInfo swapped in by swap_vae; None: the checkpoint's own
    base_vae: dict | None = field(default=None, repr=False)  # the checkpoint's own VAE weights (CPU) while another serves
    # sd_precision: the sampler's dtype when the UNet computes in another (a bfloat16 UNet on the CPU samples in
    # float32), and the torch.compile'd UNet that apply_model calls instead of the module (--compile)
    sample_dtype: torch.dtype | None = None
    compiled_unet: object = field(default=None, repr=False)
    precision: object = field(default=None, repr=False)  # the sd_precision.PrecisionOptions it was loaded with

    # From the first weight: diffusers' ModelMixin.device / .dtype walk every submodule looking for
    # group-offload and layerwise-casting hooks (~2 ms a call; the loop asks often), which this project never sets.
    @property
    def device(self) -> torch.device:
        return self.execution_device or next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of latents, noise and conditioning (the sampler's); the UNet's own unless sample_dtype."""
        return self.sample_dtype or next(self.unet.parameters()).dtype

    @property
    def vae_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the VAE runs and in what dtype (SDXL's VAE may be float32 beside a float16 UNet)."""
        weight = next(self.vae.parameters())
        return self.execution_device or weight.device, weight.dtype

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """The training schedule, taken from the model's own scheduler config (float32, CPU)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config).alphas_cumprod.clone()

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)  # an inpainting UNet takes 4 + 5 channels in, gives 4 out

    @property
    def is_inpainting(self) -> bool:
        """A 9-channel UNet (SD 1.5 / SDXL inpainting): it also takes [mask, masked image latents] as input."""
        return int(self.unet.config.in_channels) == self.latent_channels + 1 + self.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @cached_property
    def preview_decoder(self) -> torch.nn.Module | None:
        """The checkpoint's own learned latent->RGB preview decoder (`preview_decoder.safetensors` in its
        folder, `<name>.preview_decoder.safetensors` beside a single file), which "Approx cheap" uses instead
        of the linear `latent_rgb` map; None without one, or when the file cannot be read (then the linear
        map, with a warning: a preview must not stop a model from loading)."""
        from modules import sd_vae_approx

        path = sd_vae_approx.find_preview_decoder(self.path)
        if path is None:
            return None
        try:
            return sd_vae_approx.load_preview_decoder(path)
        except ValueError as e:
            sd_vae_approx.log.warning("preview decoder ignored, using the linear latent->RGB map: %s", e)
            return None

    @property
    def vae_name(self) -> str | None:
        """The swapped-in VAE's file name (AUTOMATIC1111's infotext `VAE`); None for the checkpoint's own."""
        return None if self.vae_info is None else self.vae_info.name

    @property
    def vae_hash(self) -> str | None:
        """Its short hash, the first 10 hex digits of the file's sha256 (infotext `VAE hash`)."""
        return None if self.vae_info is None else self.vae_info.shorthash

    @property
    def default_size(self) -> int:
        """The image size the model was trained at (the UI's default width and height)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


    def get_learned_conditioning(self, text: str, clip_skip: int | None = None) -> torch.Tensor:
        return self.cond_stage.encode(text, clip_skip)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    image_conditioning: torch.Tensor | None = None, crop_coords: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """One UNet call; returns the raw model output (epsilon, v or x0, as the model predicts).

        SDXL's `cond` is a dict: the pooled text embeds and the size conditioning (`time_ids`:
        original size, crop top-left (`crop_coords`, the sdxl_crop_* options), target size, all the image's own size in pixels, as
        diffusers' pipeline and AUTOMATIC1111 use by default) go in as added_cond_kwargs.
        `image_conditioning` (inpainting checkpoints: [mask, masked image latents], one row per row
        of `x`) is concatenated to `x` along the channels, diffusers' `cat([x, mask, masked])`.
        """
        if image_conditioning is not None:
            x = torch.cat([x, image_conditioning.to(x.device, x.dtype)], dim=1)
        if isinstance(cond, dict):
            h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
            time_ids = torch.tensor([[h, w, *crop_coords, h, w]], device=x.device, dtype=cond["vector"].dtype)
            added = {"text_embeds": cond["vector"], "time_ids": time_ids.expand(x.shape[0], -1)}
            return (self.compiled_unet or self.unet)(x, t, encoder_hidden_states=cond["crossattn"],
                                                     added_cond_kwargs=added, return_dict=False)[0]
        return (self.compiled_unet or self.unet)(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    @torch.no_grad()
    def encode_first_stage(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> latents as the UNet sees them, on the model's device and dtype.

        The posterior's mean, not a sample of it (AUTOMATIC1111 samples with the global RNG): the
        same picture always gives the same latent, whatever else ran before.
        """
        posterior = self.vae.encode(images.to(*self.vae_device_dtype), return_dict=False)[0]
        return (posterior.mode() * self.scaling_factor).to(self.device, self.dtype)

    @torch.no_grad()
    def decode_first_stage(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (as the UNet sees them) -> images in [-1, 1], float32 on the CPU."""
        latents = latents.to(*self.vae_device_dtype) / self.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0].float().cpu()

    @property
    def max_clip_skip(self) -> int:
        """The largest CLIP skip this model's text encoders can take: their number of layers."""
        cs = self.cond_stage
        encoders = [cs.clip_l.text_encoder, cs.clip_g.text_encoder] if isinstance(cs, SDXLTextConditioner) \
            else [cs.text_encoder]
        return min(e.config.num_hidden_layers for e in encoders)

    def modules(self) -> list[torch.nn.Module]:
        cs = self.cond_stage
        encoders = [cs.clip_l.text_encoder, cs.clip_g.text_encoder] if isinstance(cs, SDXLTextConditioner) \
            else [cs.text_encoder]
        return [self.unet, self.vae, *encoders]

    def describe_precision(self) -> str:
        """What the modules compute in, read from their weights (the start-up log line): the CPU's default
        changes with its bfloat16 support, so the user is told which one they got."""
        def dtype(module) -> str:
            return str(module.dtype).replace("torch.", "")

        unet, vae, *encoders = self.modules()
        parts = [f"UNet {dtype(unet)}", f"text encoder {'/'.join(dtype(e) for e in encoders)}", f"VAE {dtype(vae)}"]
        if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            parts.append("channels-last")
        return ", ".join(parts + (["compiled"] if self.compiled_unet is not None else []))


# -- hashes ----------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file; for a diffusers folder, of its weight files in name order."""
    h = hashlib.sha256()
    for f in _weight_files(Path(path)):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class HashCache:
    """sha256 of checkpoints, computed once and kept on disk, keyed by resolved path, size and mtime.

    A file that changes (other size or mtime) is hashed again. `computed` counts the hashes
    this object actually computed, so a caller can see that a second listing hashed nothing.
    """

    _defaults: dict[Path, "HashCache"] = {}
    _defaults_lock = threading.Lock()

    def __init__(self, file: str | Path | None = None):
        self.file = Path(file) if file is not None else DEFAULT_HASH_CACHE
        self.computed = 0
        self._lock = threading.Lock()
        self._data: dict[str, dict] | None = None

    @classmethod
    def default(cls, file: str | Path | None = None) -> "HashCache":
        """One shared object per cache file (so the in-memory copy and the counter are shared)."""
        key = Path(file) if file is not None else DEFAULT_HASH_CACHE
        with cls._defaults_lock:
            return cls._defaults.setdefault(key, cls(key))

    def _load(self) -> dict[str, dict]:
        if self._data is None:
            try:
                self._data = json.loads(self.file.read_text()).get("sha256", {})
            except (OSError, ValueError, AttributeError):
                self._data = {}  # missing or damaged: start again
        return self._data

    @staticmethod
    def _stamp(path: Path) -> tuple[int, float]:
        files = _weight_files(path)
        stats = [f.stat() for f in files]
        return sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=0.0)

    def sha256(self, path: str | Path) -> str:
        path = Path(path)
        key = str(path.resolve())
        size, mtime = self._stamp(path)
        with self._lock:
            entry = self._load().get(key)
            if entry and entry.get("size") == size and entry.get("mtime") == mtime:
                return entry["sha256"]
        digest = checkpoint_sha256(path)
        with self._lock:
            self.computed += 1
            self._load()[key] = {"size": size, "mtime": mtime, "sha256": digest}
            self._save()
        return digest

    def _save(self) -> None:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
            self._data = {k: v for k, v in self._data.items() if os.path.exists(k)}  # forget deleted files
            tmp.write_text(json.dumps({"sha256": self._data}, indent=1, sort_keys=True))
            os.replace(tmp, self.file)
        except OSError:
            pass  # a read-only install still works; it just hashes again next time


# -- loading ---------------------------------------------------------------------------------
def default_device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def is_pickle(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def load_model(path: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, clip_skip: int = 1, *, allow_pickle: bool = False,
               offload: str | None = None, vae_dtype: torch.dtype | None = None,
               hash_cache: HashCache | None = None, embeddings_dir: str | Path | None = None,
               lora_dir: str | Path | None = None, precision=None, cache=None) -> SDModel:
    """Load a diffusers folder or a single-file checkpoint from disk, never from a hub.

    On CUDA the weights are fp16 unless `dtype` says otherwise (`--no-half`, `--precision full`:
    float32); on the CPU float32. `vae_dtype` overrides the VAE's (`--no-half-vae`); SDXL's VAE,
    which overflows in fp16, stays float32 unless told otherwise. `offload="medvram"` keeps each
    of text encoder(s), UNet and VAE in CPU memory until it runs (accelerate's
    `cpu_offload_with_hook`, like diffusers' `enable_model_cpu_offload`); "lowvram" offloads
    layer by layer (accelerate's `cpu_offload`): slowest, least memory.
    `embeddings_dir` (`--embeddings-dir`): the textual-inversion embeddings that fit this model are
    loaded into `model.embedding_db` (a switch loads them again for the new model's encoders).
    `lora_dir` (`--lora-dir`, default models/Lora): where the prompt's `<lora:name:w>` tags find their files.
    `precision` (sd_precision.PrecisionOptions: bfloat16 UNet / text encoder / VAE, channels-last, attention,
    torch.compile) is applied on top of `dtype`; a bfloat16 UNet samples in `dtype` (float32).
    `cache` (sd_checkpoint_cache.CheckpointCache): the weights of a checkpoint it holds are copied from RAM
    instead of read from disk, and what is read is offered to it.
    Raises ModelNotFound / ModelLoadError with a message a user can act on.
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"Model not found: {path}")
    default_device, default_dtype = default_device_and_dtype()
    device = torch.device(device) if device is not None else default_device
    dtype = dtype or (default_dtype if device.type == "cuda" else torch.float32)
    if offload not in (None, "", "none", "medvram", "lowvram"):
        raise ValueError(f"unknown offload mode {offload!r}")
    from modules import sd_checkpoint_cache, sd_precision

    precision = precision or sd_precision.PrecisionOptions()
    cache_key = sd_checkpoint_cache.key_for(path, dtype, vae_dtype, precision)
    parts = cache.get(cache_key) if cache is not None else None
    cached = parts is not None  # a copy of the weights of an earlier load, already in these dtypes
    if cached:
        pass
    elif path.is_dir():
        parts = _load_folder(path, dtype)
    elif path.suffix.lower() in SAFETENSORS_SUFFIXES:
        parts = _load_single_file(path, _read_safetensors(path))
    elif is_pickle(path):
        if not allow_pickle:
            raise ModelLoadError(
                f"{path.name} is a pickle checkpoint ({path.suffix}); pickles can run code when loaded, so they "
                "are refused. Convert it to .safetensors, or start with --allow-pickle-checkpoints to load it "
                "with torch.load(weights_only=True).")
        parts = _load_single_file(path, _read_pickle(path))
    else:
        raise ModelLoadError(f"{path.name}: not a checkpoint (expected a diffusers folder, .safetensors, "
                             f"or with --allow-pickle-checkpoints {', '.join(PICKLE_SUFFIXES)})")
    arch, unet, vae, encoders, tokenizers, scheduler_config, latent_rgb, source = parts
    if vae_dtype is None:
        vae_dtype = torch.float32 if (arch == "sdxl" and dtype == torch.float16) else dtype
    for module in (unet, vae, *encoders):  # one cast per module, straight to its final dtype
        module.eval().requires_grad_(False)
        wanted = ((precision.unet_dtype or dtype) if module is unet else (precision.vae_dtype or vae_dtype)
                  if module is vae else (precision.text_dtype or dtype))
        if module.dtype != wanted:
            sd_precision.cast_to(module, wanted)
    sd_precision.cast_modules(unet, vae, encoders, precision, device)
    if cache is not None and not cached:
        cache.put(cache_key, parts)
    execution_device = _place(device, offload, unet, vae, encoders)
    if arch == "sdxl":
        cond_stage = SDXLTextConditioner(tokenizers[0], encoders[0], tokenizers[1], encoders[1], clip_skip=clip_skip)
    else:
        cond_stage = CLIPTextConditioner(tokenizers[0], encoders[0], clip_skip=clip_skip)
    model = SDModel(unet=unet, vae=vae, cond_stage=cond_stage, scheduler_config=scheduler_config, name=path.name,
                    path=path, latent_rgb=latent_rgb, arch=arch, execution_device=execution_device,
                    hash_cache=hash_cache, prediction_type_source=source, allow_pickle=allow_pickle,
                    sample_dtype=dtype if unet.dtype != dtype else None, precision=precision)
    model.compiled_unet = sd_precision.compile_unet(unet, precision)
    from modules import extra_networks_lora, textual_inversion

    textual_inversion.attach(model, embeddings_dir)
    model.lora_state = extra_networks_lora.LoraState(lora_dir)
    return model


def _place(device: torch.device, offload: str | None, unet, vae, encoders) -> torch.device | None:
    """Move the modules to `device`, or set up accelerate's CPU offload; returns the execution device
    when the weights rest elsewhere."""
    if offload in ("medvram", "lowvram"):  # (on the CPU it changes nothing, but runs the same code)
        import accelerate

        # the text encoders move whole (their inputs are made on the device their weights report);
        # with lowvram the UNet and VAE stream layer by layer, else they move whole too
        whole = (*encoders,) if offload == "lowvram" else (*encoders, unet, vae)
        hook = None
        for module in whole:
            _, hook = accelerate.cpu_offload_with_hook(module, execution_device=device, prev_module_hook=hook)
        if offload == "lowvram":
            for module in (unet, vae):
                accelerate.cpu_offload(module, execution_device=device)
        return device
    for module in (unet, vae, *encoders):
        module.to(device)
    return None


def _load_tokenizer(folder: Path | None, pad_token: str):
    """A CLIP tokenizer: the folder's own if it has one, else the BPE files shipped in configs/."""
    from transformers import CLIPTokenizer

    if folder is not None and any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json",
                                                                      "vocab.json")):
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return CLIPTokenizer.from_pretrained(sd_models_config.TOKENIZER_DIR, local_files_only=True, pad_token=pad_token)


def _load_folder(path: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)")
    try:
        index = json.loads((path / "model_index.json").read_text())
        kw = dict(local_files_only=True, dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw)
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw)
        encoders = [CLIPTextModel.from_pretrained(path / "text_encoder", **kw)]
        sdxl = "text_encoder_2" in index and index["text_encoder_2"][0] is not None
        if sdxl:
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw))
        # OpenCLIP ViT-H (SD 2.x) uses gelu; OpenAI CLIP-L (SD 1.x) quick_gelu
        arch = "sdxl" if sdxl else ("sd2" if encoders[0].config.hidden_act == "gelu" else "sd1")
        pad = "!" if arch == "sd2" else "<|endoftext|>"
        tokenizers = [_load_tokenizer(path / "tokenizer", pad)]
        if sdxl:
            tokenizers.append(_load_tokenizer(path / "tokenizer_2", "!"))
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except Exception as e:  # corrupt or incomplete folder: say which and why
        raise ModelLoadError(f"Could not load {path.name}: {type(e).__name__}: {e}") from e
    latent_rgb = default_latent_rgb(arch)
    if (path / "latent_rgb.json").is_file():
        data = json.loads((path / "latent_rgb.json").read_text())
        latent_rgb = (data["factors"], data.get("bias", [0.0, 0.0, 0.0]))
    return arch, unet, vae, encoders, tokenizers, scheduler_config, latent_rgb, "config"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The whole state dict; a truncated or damaged file becomes a ModelLoadError that says so."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise ModelLoadError(f"{path.name} is not a readable .safetensors file (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from e


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"Could not load {path.name} with torch.load(weights_only=True) (a pickle that holds "
                             f"more than tensors is refused): {type(e).__name__}: {e}") from e
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} holds a {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _build(cls, config, state_dict: dict, what: str, name: str, ignore=("position_ids",)):
    """Instantiate `cls(config)` without initialising weights, then assign the converted weights."""
    import accelerate

    with accelerate.init_empty_weights():
        module = cls(config) if not isinstance(config, dict) else cls.from_config(config)
    missing, unexpected = module.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith(ignore)]
    unexpected = [k for k in unexpected if not k.endswith(ignore)]
    if missing or unexpected:
        raise ModelLoadError(f"Could not load {name}: the {what} weights do not fit the detected architecture "
                             f"(missing: {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected: {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    meta = [n for n, p in [*module.named_parameters(), *module.named_buffers()] if p.is_meta]
    if meta:
        raise ModelLoadError(f"Could not load {name}: {what} weights missing: {meta[:3]}")
    return module


def _load_single_file(path: Path, state_dict: dict[str, torch.Tensor]):
    """A checkpoint in the original layout -> diffusers modules, with diffusers' own key conversion."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    old = "cond_stage_model.transformer."  # SD 1.x files saved with transformers < 4.x lack `text_model.`
    if any(k.startswith(old + "embeddings.") for k in state_dict):
        state_dict = {(old + "text_model." + k[len(old):] if k.startswith(old) else k): v
                      for k, v in state_dict.items()}
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    metadata = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
    cfg = sd_models_config.build_configs(shapes, path, metadata)
    try:
        unet = _build(UNet2DConditionModel, cfg.unet, sfu.convert_ldm_unet_checkpoint(state_dict, cfg.unet),
                      "UNet", path.name)
        vae = _build(AutoencoderKL, cfg.vae, sfu.convert_ldm_vae_checkpoint(state_dict, cfg.vae), "VAE", path.name)
        encoders = []
        if cfg.arch == "sd1":
            sd = _strip_text_model(sfu.convert_ldm_clip_checkpoint(state_dict))
            encoders.append(_build(CLIPTextModel, CLIPTextConfig(**cfg.text_encoders[0]), sd, "text encoder",
                                   path.name))
        elif cfg.arch == "sd2":
            prefix = sd_models_config.OPENCLIP_SD2
            last = cfg.text_encoders[0]["num_hidden_layers"]  # the file's last layer is not used by SD 2.x
            dropped = {k: v for k, v in state_dict.items() if k.startswith(prefix)
                       and not k.startswith(f"{prefix}transformer.resblocks.{last}.")
                       and k != prefix + "text_projection"}
            te_cfg = CLIPTextConfig(**cfg.text_encoders[0])
            sd = _strip_text_model(sfu.convert_open_clip_checkpoint(_Cfg(te_cfg), dropped, prefix=prefix))
            encoders.append(_build(CLIPTextModel, te_cfg, sd, "text encoder", path.name))
        else:
            clip_l = {k: v for k, v in state_dict.items() if k.startswith("conditioner.embedders.0.")}
            sd = _strip_text_model(sfu.convert_ldm_clip_checkpoint(clip_l))
            encoders.append(_build(CLIPTextModel, CLIPTextConfig(**cfg.text_encoders[0]), sd, "text encoder",
                                   path.name))
            te2_cfg = CLIPTextConfig(**cfg.text_encoders[1])
            sd2 = sfu.convert_open_clip_checkpoint(_Cfg(te2_cfg), state_dict, prefix=sd_models_config.OPENCLIP_SDXL)
            encoders.append(_build(CLIPTextModelWithProjection, te2_cfg, sd2, "second text encoder", path.name))
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"Could not load {path.name} as {sd_models_config.ARCH_TITLES[cfg.arch]}: "
                             f"{type(e).__name__}: {e}") from e
    scheduler_config = dict(cfg.scheduler)
    source = cfg.prediction_type_source
    if scheduler_config["prediction_type"] is None:
        unet.float()
        v = sd_models_config.is_v_prediction_unet(unet)
        scheduler_config["prediction_type"] = "v_prediction" if v else "epsilon"
    tokenizers = [_load_tokenizer(None, pad) for pad in cfg.pad_tokens]
    latent_rgb = default_latent_rgb(cfg.arch)
    return cfg.arch, unet, vae, encoders, tokenizers, scheduler_config, latent_rgb, source


class _Cfg:
    """What diffusers' convert_open_clip_checkpoint reads from the text model: only `.config`."""

    def __init__(self, config):
        self.config = config


def _strip_text_model(sd: dict) -> dict:
    """transformers 5 flattened CLIPTextModel: its keys no longer start with `text_model.`."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def unload_model(model: SDModel | None) -> None:
    """Drop a model's weights now (a switch frees the previous checkpoint before the next job)."""
    if model is None:
        return
    model.base_vae = None
    for module in model.modules():
        module.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vae_tensors(model: SDModel) -> dict[str, torch.Tensor]:
    """The tensors that hold the VAE's weights, by state-dict name, to read or overwrite in place.

    Normally (and with medvram, whose weights rest on the CPU) the module's own parameters; with
    lowvram's layer-by-layer offload the parameters are empty (meta) and the weights live in the
    CPU dict accelerate's hooks copy from at each call, so that dict is the one to change.
    """
    for module in model.vae.modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is not None and isinstance(getattr(weights_map, "dataset", None), dict):
            return weights_map.dataset
    return model.vae.state_dict()


@torch.no_grad()
def swap_vae(model: SDModel, state_dict: dict[str, torch.Tensor] | None, info=None) -> None:
    """Serve `state_dict` (diffusers layout, already checked to fit: sd_vae.apply_vae does both) from
    the loaded model's VAE, or with None go back to the checkpoint's own VAE without reloading it.

    The weights are copied in place, so the module keeps its device, dtype and offload hooks. At
    the first swap the checkpoint's own weights are copied to the CPU (in their dtype, so going
    back is bit-identical) and kept until then. Call it between jobs (the context holds the queue).
    """
    targets = vae_tensors(model)
    if state_dict is None:
        if model.base_vae is not None:
            for key, tensor in targets.items():
                tensor.copy_(model.base_vae[key])
        model.base_vae = None
        model.vae_info = None
        return
    missing = set(targets) ^ set(state_dict)
    if missing:
        raise ValueError(f"VAE state dict does not match the model's VAE: {sorted(missing)[:3]}")
    if model.base_vae is None:
        model.base_vae = {key: tensor.detach().to("cpu", copy=True) for key, tensor in targets.items()}
    for key, tensor in targets.items():
        tensor.copy_(state_dict[key])
    model.vae_info = info


def switch_model(current: SDModel | None, path: str | Path, **load_kwargs) -> SDModel:
    """Load `path`; only when that succeeded free `current`. A failed load raises ModelLoadError /
    ModelNotFound and leaves `current` untouched and serving. On CUDA the current model waits in
    CPU memory while the new one loads (so two checkpoints need not fit in GPU memory at once)."""
    parked = current is not None and current.execution_device is None and current.device.type == "cuda"
    devices = [next(m.parameters()).device for m in current.modules()] if parked else []
    if parked:
        for module in current.modules():
            module.to("cpu")
        torch.cuda.empty_cache()
    try:
        model = load_model(path, **load_kwargs)
    except BaseException:
        for module, device in zip(current.modules() if parked else [], devices):
            module.to(device)
        raise
    if current is not None and current is not model:
        unload_model(current)
    return model


def load_kwargs_from_args(args) -> dict:
    """The load_model keyword arguments that the command-line flags ask for."""
    kw: dict = {"device": getattr(args, "device", None), "allow_pickle": bool(getattr(args, "allow_pickle_checkpoints",
                                                                                        False))}
    if getattr(args, "no_half", False) or getattr(args, "precision", "autocast") == "full":
        kw["dtype"] = torch.float32
    if getattr(args, "no_half_vae", False):
        kw["vae_dtype"] = torch.float32
    if getattr(args, "lowvram", False):
        kw["offload"] = "lowvram"
    elif getattr(args, "medvram", False):
        kw["offload"] = "medvram"
    from modules import sd_precision

    precision = sd_precision.options_from_args(args, kw["device"])
    if precision != sd_precision.PrecisionOptions():  # only what the flags change from load_model's defaults
        kw["precision"] = precision
    if getattr(args, "embeddings_dir", None):
        kw["embeddings_dir"] = args.embeddings_dir
    if getattr(args, "lora_dir", None):
        kw["lora_dir"] = args.lora_dir
    return kw


# -- listing ---------------------------------------------------------------------------------
@dataclass
class CheckpointInfo(CheckpointHash):
    """A checkpoint found on disk, titled as AUTOMATIC1111 titles it: `name [shorthash]`."""

    path: Path
    name: str  # file or folder name, relative to its checkpoint folder (with "/" for subfolders)
    hash_cache: HashCache | None = field(default=None, repr=False, compare=False)

    @property
    def model_name(self) -> str:
        return self.name.rsplit(".", 1)[0] if Path(self.path).is_file() else self.name

    @property
    def filename(self) -> str:
        return str(self.path)

    @property
    def is_pickle(self) -> bool:
        return is_pickle(Path(self.path))


    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]"


def _is_diffusers_folder(p: Path) -> bool:
    return p.is_dir() and (p / "model_index.json").is_file()


def list_checkpoints(dirs: list[Path], hash_cache: HashCache | None = None) -> list[CheckpointInfo]:
    """Diffusers folders (with model_index.json) and checkpoint files (.safetensors; .ckpt/.pt/.pth/.bin
    are listed too, and refused at load time without --allow-pickle-checkpoints) in each checkpoint
    folder and its subfolders (not inside diffusers folders), sorted by name. An entry of `dirs` that
    is a file (`--ckpt`) is listed as itself. Hashes are computed (once, cached on disk) for the titles."""
    hash_cache = hash_cache or HashCache.default()
    found: list[CheckpointInfo] = []
    seen: set[Path] = set()

    def add(p: Path, name: str) -> None:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            found.append(CheckpointInfo(p, name, hash_cache))

    for folder in dirs:
        folder = Path(folder)
        if folder.is_file() and folder.suffix.lower() in CHECKPOINT_SUFFIXES:
            add(folder, folder.name)
            continue
        if _is_diffusers_folder(folder):
            add(folder, folder.name)
            continue
        if not folder.is_dir():
            continue
        entries = []
        for root, subdirs, files in os.walk(folder, followlinks=True):
            root = Path(root)
            for d in list(subdirs):
                if _is_diffusers_folder(root / d):
                    entries.append(root / d)
                    subdirs.remove(d)  # its weights are not separate checkpoints
                elif d.startswith("."):
                    subdirs.remove(d)
            entries += [root / f for f in files if Path(f).suffix.lower() in CHECKPOINT_SUFFIXES
                        and not f.startswith(".")]
        for p in sorted(entries, key=lambda e: e.relative_to(folder).as_posix().lower()):
            add(p, p.relative_to(folder).as_posix())
    for info in found:
        info.sha256  # noqa: B018 - titles need the hash; computed once, then read from the cache
    return found


def _split_title(name: str) -> tuple[str, str | None]:
    """`name.safetensors [abcdef0123]` -> ("name.safetensors", "abcdef0123")."""
    name = name.strip()
    if name.endswith("]") and " [" in name:
        base, _, h = name[:-1].rpartition(" [")
        return base, h
    return name, None


def find_checkpoint(name: str, dirs: list[Path], hash_cache: HashCache | None = None) -> CheckpointInfo:
    """Resolve a title (`name [hash]`), a name (with or without extension), or a short hash among the
    listed checkpoints only, so a name from the UI or the API can never point outside the checkpoint
    folders: `../x`, absolute paths and the like are refused before anything is looked up."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ModelNotFound(f"Checkpoint not found: {name!r}")
    base, wanted_hash = _split_title(name)
    parts = base.replace("\\", "/").split("/")
    if base.startswith(("/", "\\", "~")) or ".." in parts or (len(base) > 1 and base[1] == ":"):
        raise ModelNotFound(f"Checkpoint not found: {name!r} (names are relative to the checkpoint folders)")
    infos = list_checkpoints(dirs, hash_cache)
    for info in infos:
        if name.strip() in (info.title, info.name, info.model_name, info.shorthash, info.sha256):
            return info
    for info in infos:
        if base in (info.name, info.model_name) and (wanted_hash is None or info.sha256.startswith(wanted_hash)):
            return info
    for info in infos:  # a title whose file changed since: the name decides
        if base in (info.name, info.model_name):
            return info
    raise ModelNotFound(f"Checkpoint not found: {name!r}")


def resolve_checkpoint_path(path: str | Path, dirs: list[Path]) -> Path:
    """`path` if it lies inside one of `dirs` (after resolving links and `..`), else ModelNotFound."""
    p = Path(path).resolve()
    for d in dirs:
        d = Path(d).resolve()
        if p == d or d in p.parents:
            return p
    raise ModelNotFound(f"Checkpoint not found: {str(path)!r} is outside the checkpoint folders")
