"""Find and load Stable Diffusion checkpoints, offline.

A loaded checkpoint is an `SDModel`: the diffusers components plus what the engine needs
to know about them (noise schedule, prediction type, latent shape, preview factors). It
is a plain object handed to `processing.process_images`; nothing here is global.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from modules.errors import ModelLoadError, ModelNotFound
from modules.sd_hijack_clip import CLIPTextConditioner

# AUTOMATIC1111's "Approx cheap" factors for SD 1.x/2.x latents (rows: latent channels; cols: R, G, B).
SD1_LATENT_RGB = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]


@dataclass
class SDModel:
    """The parts of a Stable Diffusion checkpoint and the facts the sampler needs about them."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    cond_stage: CLIPTextConditioner
    scheduler_config: dict
    name: str
    path: Path
    latent_rgb: tuple[list[list[float]], list[float]] = field(default=(SD1_LATENT_RGB, [0.0, 0.0, 0.0]))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

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
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def default_size(self) -> int:
        """The image size the model was trained at (the UI's default width and height)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @cached_property
    def sha256(self) -> str:
        return checkpoint_sha256(self.path)

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    @cached_property
    def empty_cond(self) -> torch.Tensor:
        """The empty prompt's encoding: padding for conditionings of unequal length."""
        return self.cond_stage.encode("")

    def get_learned_conditioning(self, text: str, clip_skip: int | None = None) -> torch.Tensor:
        return self.cond_stage.encode(text, clip_skip)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One UNet call; returns the raw model output (epsilon, v or x0, as the model predicts)."""
        return self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    @torch.no_grad()
    def decode_first_stage(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (as the UNet sees them) -> images in [-1, 1], float32 on the CPU."""
        latents = latents.to(self.vae.device, self.vae.dtype) / self.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0].float().cpu()


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file; for a diffusers folder, of its weight files in name order."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def default_device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def load_model(path: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, clip_skip: int = 1) -> SDModel:
    """Load a diffusers-format Stable Diffusion folder from disk, never from a hub.

    On CUDA the weights are fp16 unless `dtype` says otherwise; on the CPU float32.
    Raises ModelNotFound / ModelLoadError with a message a user can act on.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"Model not found: {path}")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)")
    default_device, default_dtype = default_device_and_dtype()
    device = torch.device(device) if device is not None else default_device
    dtype = dtype or (default_dtype if device.type == "cuda" else torch.float32)
    try:
        kw = dict(local_files_only=True, dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw)
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except Exception as e:  # corrupt or incomplete folder: say which and why
        raise ModelLoadError(f"Could not load {path.name}: {type(e).__name__}: {e}") from e
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    latent_rgb = SDModel.__dataclass_fields__["latent_rgb"].default
    if (path / "latent_rgb.json").is_file():
        data = json.loads((path / "latent_rgb.json").read_text())
        latent_rgb = (data["factors"], data.get("bias", [0.0, 0.0, 0.0]))
    return SDModel(unet=unet, vae=vae, cond_stage=CLIPTextConditioner(tokenizer, text_encoder, clip_skip=clip_skip),
                   scheduler_config=scheduler_config, name=path.name, path=path, latent_rgb=latent_rgb)


@dataclass
class CheckpointInfo:
    """A checkpoint found on disk, titled as AUTOMATIC1111 titles it: `name [shorthash]`."""

    path: Path
    name: str  # file or folder name, relative to its checkpoint folder

    @property
    def model_name(self) -> str:
        return Path(self.name).stem if self.path.is_file() else self.name

    @cached_property
    def sha256(self) -> str:
        return checkpoint_sha256(self.path)

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]"


def list_checkpoints(dirs: list[Path]) -> list[CheckpointInfo]:
    """Diffusers folders (with model_index.json) directly inside each checkpoint folder, sorted by name."""
    found = []
    for folder in dirs:
        if Path(folder).is_dir():
            found += [CheckpointInfo(p, p.name) for p in sorted(Path(folder).iterdir())
                      if p.is_dir() and (p / "model_index.json").is_file()]
    return found


def find_checkpoint(name: str, dirs: list[Path]) -> CheckpointInfo:
    """Resolve a title (`name [hash]`), a name, or a short hash among the known checkpoints only,
    so a name from the UI or the API can never point outside the checkpoint folders."""
    for info in list_checkpoints(dirs):
        if name in (info.title, info.name, info.model_name, info.shorthash):
            return info
    raise ModelNotFound(f"Checkpoint not found: {name!r}")
