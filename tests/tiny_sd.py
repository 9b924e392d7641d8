"""Tiny random-weight Stable Diffusion models, built with diffusers and saved as real folders.

Shared by the tests and the benchmarks: the same code path as a real checkpoint, at a size
that runs in milliseconds on a CPU.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "configs" / "clip-tokenizer"

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}


def build_tiny_sd(out_dir: Path, seed: int = 0, prediction_type: str = "epsilon", cross_attention_dim: int = 32,
                  unet_channels: tuple[int, ...] = (32, 64)) -> Path:
    """Write a tiny SD 1.x-shaped diffusers folder (8x latent factor, 4 latent channels) to `out_dir`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=64, scaling_factor=0.5)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    unet.save_pretrained(out_dir / "unet")
    vae.save_pretrained(out_dir / "vae")
    text_encoder.save_pretrained(out_dir / "text_encoder")
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(out_dir / "tokenizer")
    (out_dir / "scheduler").mkdir(parents=True)
    (out_dir / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SCHEDULER_CONFIG, "prediction_type": prediction_type}, indent=2))
    (out_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return out_dir


def build_bench_sd() -> Path:
    """The benchmarks' default model: a small random SD (UNet (64, 128), 64-wide text encoder) in a temp folder."""
    import tempfile

    return build_tiny_sd(Path(tempfile.mkdtemp()) / "bench-sd", unet_channels=(64, 128), cross_attention_dim=64)


def diffusers_pipeline(model_dir: Path, scheduler_cls=None):
    """diffusers' own StableDiffusionPipeline on the same folder, CPU float32, for reference outputs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False, dtype=torch.float32)
    pipe.scheduler = (scheduler_cls or DDIMScheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
