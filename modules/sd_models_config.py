"""Which Stable Diffusion a single-file checkpoint is, and the diffusers configs that fit it.

A single `.safetensors` checkpoint in the original (CompVis / Stability "LDM") layout
carries weights but no configs. diffusers' `from_single_file` would fetch the configs from
the Hugging Face hub; this project never does. Instead the architecture is detected from
the state dict's key names, the configs of that architecture are read from `configs/<arch>/`
(copies of the public diffusers configs: stable-diffusion-v1-5, stable-diffusion-2-1(-base),
stable-diffusion-xl-base-1.0), and every value the weights themselves determine (channels,
blocks, layers, widths) is read from the tensor shapes. For a real checkpoint the two agree;
a fine-tune or a tiny test model of another size still loads.

What the shapes cannot say is taken from the architecture's convention: SD 1.x uses 8
attention heads in every UNet block; SD 2.x, SDXL and every CLIP text encoder use heads of
64 channels (at least one head); GroupNorm has 32 groups. SD 2.x's prediction type is read
from a sidecar `<name>.yaml` (AUTOMATIC1111's convention: `parameterization: "v"`), from the
file's metadata (`modelspec.prediction_type`), or else found by AUTOMATIC1111's test: run the
UNet once on a constant input and see whether it answers like a v-prediction model.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

from modules.errors import ModelLoadError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TOKENIZER_DIR = CONFIGS / "clip-tokenizer"

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L_SD1 = "cond_stage_model.transformer.text_model."
OPENCLIP_SD2 = "cond_stage_model.model."
CLIP_L_SDXL = "conditioner.embedders.0.transformer.text_model."
OPENCLIP_SDXL = "conditioner.embedders.1.model."

ARCH_TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base"}


@dataclass
class ArchConfigs:
    """Everything needed to build the diffusers modules of one single-file checkpoint."""

    arch: str  # "sd1", "sd2" or "sdxl"
    unet: dict
    vae: dict
    text_encoders: list[dict]  # transformers CLIPTextConfig kwargs, one per encoder
    pad_tokens: list[str]  # the tokenizer's pad token for each encoder
    scheduler: dict
    prediction_type_source: str  # where the prediction type came from (for messages and tests)


def read_config(folder: str, component: str, name: str = "config.json") -> dict:
    return json.loads((CONFIGS / folder / component / name).read_text())


def detect_architecture(shapes: dict[str, tuple[int, ...]]) -> str:
    """'sd1', 'sd2' or 'sdxl' from key names; ModelLoadError for anything else, saying what it looks like."""
    if not any(k.startswith(UNET) for k in shapes):
        if any(k.startswith(("lora_", "lora_unet", "lora_te")) or ".lora_" in k for k in shapes):
            what = "a LoRA, not a full checkpoint"
        elif any(k.startswith(("encoder.", "decoder.")) for k in shapes):
            what = "a VAE, not a full checkpoint"
        elif any(k.startswith(("down_blocks.", "up_blocks.", "unet.")) for k in shapes):
            what = "a diffusers-format component (use a diffusers folder with model_index.json)"
        else:
            what = "no Stable Diffusion UNet (model.diffusion_model.*)"
        raise ModelLoadError(f"unknown architecture: {what}")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise ModelLoadError("unknown architecture: the UNet has no input convolution")
    if conv_in[1] not in (4, 9):  # 9: inpainting (4 latent + 1 mask + 4 masked-image latent channels)
        raise ModelLoadError(f"unsupported architecture: the UNet takes {conv_in[1]} input channels "
                             "(instruct-pix2pix and other image-conditioned models are not supported)")
    if VAE + "decoder.conv_in.weight" not in shapes:
        raise ModelLoadError("the checkpoint has no VAE (first_stage_model.*); a UNet-only file is not supported")
    has = lambda prefix: any(k.startswith(prefix) for k in shapes)  # noqa: E731
    if has(CLIP_L_SDXL) and has(OPENCLIP_SDXL):
        return "sdxl"
    if has("conditioner.embedders."):
        raise ModelLoadError("unsupported architecture: an SDXL model without the two text encoders of SDXL base "
                             "(the SDXL refiner is not supported)")
    if has(OPENCLIP_SD2):
        return "sd2"
    if has(CLIP_L_SD1):
        return "sd1"
    raise ModelLoadError("unknown architecture: no text encoder that SD 1.x, SD 2.x or SDXL uses")


def _count(shapes, pattern: str) -> int:
    """Number of distinct integers matched by the one group of `pattern` over all keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _heads(width: int, head_dim: int = 64) -> int:
    return max(1, width // head_dim)


def unet_config(arch: str, template: dict, shapes: dict) -> dict:
    cfg = copy.deepcopy(template)
    s = lambda k: shapes[UNET + k]  # noqa: E731
    cfg["in_channels"] = s("input_blocks.0.0.weight")[1]
    cfg["out_channels"] = s("out.2.weight")[0]
    # input_blocks: conv_in, then per level `layers` resnets (+ attention) and a downsampler except last
    n_inputs = _count({k: 0 for k in shapes if k.startswith(UNET)}, re.escape(UNET) + r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in range(1, n_inputs) if UNET + f"input_blocks.{i}.0.op.weight" in shapes]
    layers = (downsamplers[0] - 1) if downsamplers else n_inputs - 1
    levels = len(downsamplers) + 1
    channels, down_types, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        channels.append(s(f"input_blocks.{first}.0.out_layers.3.weight")[0])
        attn = UNET + f"input_blocks.{first}.1."
        if any(k.startswith(attn) for k in shapes):
            down_types.append("CrossAttnDownBlock2D")
            depths.append(_count(shapes, re.escape(attn) + r"transformer_blocks\.(\d+)\."))
        else:
            down_types.append("DownBlock2D")
            depths.append(1)
    attn_levels = [i for i, t in enumerate(down_types) if t == "CrossAttnDownBlock2D"]
    if not attn_levels:
        raise ModelLoadError("unknown architecture: the UNet has no cross-attention")
    first_attn = UNET + f"input_blocks.{1 + attn_levels[0] * (layers + 1)}.1."
    cfg.update(
        block_out_channels=channels, layers_per_block=layers, down_block_types=down_types,
        up_block_types=[t.replace("Down", "Up") for t in reversed(down_types)],
        cross_attention_dim=shapes[first_attn + "transformer_blocks.0.attn2.to_k.weight"][1],
        use_linear_projection=len(shapes[first_attn + "proj_in.weight"]) == 2)
    if arch == "sd1":
        cfg["attention_head_dim"] = template["attention_head_dim"]  # 8 heads everywhere
    else:
        cfg["attention_head_dim"] = [_heads(c) for c in channels]
    if arch == "sdxl" or any(d != 1 for d in depths):
        mid_depth = _count(shapes, re.escape(UNET) + r"middle_block\.1\.transformer_blocks\.(\d+)\.")
        depths[-1] = mid_depth or depths[-1]  # diffusers' mid block takes the last level's depth
        cfg["transformer_layers_per_block"] = depths
    if arch == "sdxl":
        # label_emb takes [pooled text embeds, 6 sinusoidal embeddings of the size conditioning]
        in_dim = s("label_emb.0.0.weight")[1]
        pooled = shapes[OPENCLIP_SDXL + "text_projection"][1]
        cfg["projection_class_embeddings_input_dim"] = in_dim
        cfg["addition_time_embed_dim"] = (in_dim - pooled) // 6
    return cfg


def vae_config(template: dict, shapes: dict) -> dict:
    cfg = copy.deepcopy(template)
    enc = VAE + "encoder."
    levels = _count(shapes, re.escape(enc) + r"down\.(\d+)\.")
    cfg.update(
        latent_channels=shapes[VAE + "decoder.conv_in.weight"][1],
        in_channels=shapes[enc + "conv_in.weight"][1],
        out_channels=shapes[VAE + "decoder.conv_out.weight"][0],
        block_out_channels=[shapes[enc + f"down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        layers_per_block=_count(shapes, re.escape(enc) + r"down\.0\.block\.(\d+)\."),
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    return cfg


def clip_config(template: dict, shapes: dict, prefix: str) -> dict:
    """A transformers-layout CLIP text encoder (SD 1.x, SDXL's first encoder)."""
    vocab, width = shapes[prefix + "embeddings.token_embedding.weight"]
    return {**template, "vocab_size": vocab, "hidden_size": width, "num_attention_heads": _heads(width),
            "intermediate_size": shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
            "num_hidden_layers": _count(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
            "max_position_embeddings": shapes[prefix + "embeddings.position_embedding.weight"][0]}


def openclip_config(template: dict, shapes: dict, prefix: str, drop_last_layer: bool) -> dict:
    """An OpenCLIP text transformer (SD 2.x's ViT-H, SDXL's bigG). SD 2.x uses the penultimate
    layer, so diffusers' SD 2 text encoder has one layer fewer than the file (the last is unused)."""
    vocab, width = shapes[prefix + "token_embedding.weight"]
    layers = _count(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    cfg = {**template, "vocab_size": vocab, "hidden_size": width, "num_attention_heads": _heads(width),
           "intermediate_size": shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
           "num_hidden_layers": layers - 1 if drop_last_layer else layers,
           "max_position_embeddings": shapes[prefix + "positional_embedding"][0]}
    if prefix + "text_projection" in shapes:
        cfg["projection_dim"] = shapes[prefix + "text_projection"][1]
    return cfg


def sidecar_prediction_type(path: Path) -> str | None:
    """AUTOMATIC1111's `<checkpoint>.yaml` beside the file: `parameterization: "v"` means v-prediction."""
    for yaml_path in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if yaml_path.is_file():
            m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml_path.read_text(errors="replace"), re.M)
            return "v_prediction" if m and m.group(1) == "v" else "epsilon"
    return None


def metadata_prediction_type(metadata: dict[str, str] | None) -> str | None:
    """Stability's ModelSpec metadata (`modelspec.prediction_type`: "v" or "epsilon") or a plain key."""
    for key in ("modelspec.prediction_type", "prediction_type"):
        value = (metadata or {}).get(key, "").strip().lower()
        if value in ("v", "v_prediction", "v-prediction"):
            return "v_prediction"
        if value in ("epsilon", "eps"):
            return "epsilon"
    return None


def build_configs(shapes: dict[str, tuple[int, ...]], path: Path,
                  metadata: dict[str, str] | None = None) -> ArchConfigs:
    """Detect the architecture and fill its configs from the tensor shapes.

    For SD 2.x whose prediction type neither the sidecar nor the metadata gives, the scheduler's
    prediction_type is left as None: the loader decides with the UNet test (is_v_prediction_unet).
    """
    arch = detect_architecture(shapes)
    try:
        if arch == "sd1":
            folder, source, prediction = "sd15", "architecture", "epsilon"
            encoders = [clip_config(read_config(folder, "text_encoder"), shapes, CLIP_L_SD1)]
            pads = ["<|endoftext|>"]
        elif arch == "sd2":
            prediction, source = sidecar_prediction_type(path), "yaml"
            if prediction is None:
                prediction, source = metadata_prediction_type(metadata), "metadata"
            if prediction is None:
                source = "unet-test"
            folder = "sd2" if prediction == "epsilon" else "sd2-v"
            encoders = [openclip_config(read_config(folder, "text_encoder"), shapes, OPENCLIP_SD2, True)]
            pads = ["!"]
        else:
            folder, source, prediction = "sdxl-base", "architecture", "epsilon"
            encoders = [clip_config(read_config(folder, "text_encoder"), shapes, CLIP_L_SDXL),
                        openclip_config(read_config(folder, "text_encoder_2"), shapes, OPENCLIP_SDXL, False)]
            pads = ["<|endoftext|>", "!"]
        if shapes[UNET + "input_blocks.0.0.weight"][1] == 9:  # SD 1.5 / SDXL inpainting: their own shipped configs
            folder = {"sd15": "sd15-inpainting", "sdxl-base": "sdxl-inpainting"}.get(folder, folder)
        unet = unet_config(arch, read_config(folder, "unet"), shapes)
        vae = vae_config(read_config(folder, "vae"), shapes)
    except (KeyError, IndexError) as e:
        raise ModelLoadError(f"unknown architecture: looks like {ARCH_TITLES[arch]} but the weight {e} "
                             "is missing or has an unexpected shape") from e
    scheduler = read_config(folder, "scheduler", "scheduler_config.json")
    scheduler["prediction_type"] = prediction
    return ArchConfigs(arch, unet, vae, encoders, pads, scheduler, source)


def is_v_prediction_unet(unet) -> bool:
    """AUTOMATIC1111's test for SD 2.x (`is_using_v_parameterization_for_sd2`): on a constant input at
    t=999 an epsilon model answers close to the input, a v model answers far below it."""
    import torch

    with torch.no_grad():
        p = next(unet.parameters())
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
        cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
        out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=cond, return_dict=False)[0]
        return (out - x).float().mean().item() < -1
