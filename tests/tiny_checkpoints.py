"""Tiny random-weight SD 1.x-, SD 2.x- and SDXL-shaped checkpoints, saved both as diffusers folders
and as single `.safetensors` files in the original (CompVis / Stability, "LDM") key layout.

The configs start from the shipped ones in `configs/<arch>/` with only the sizes made small, so
the conventions the single-file loader assumes (GroupNorm 32, head widths, activations,
scaling factors) hold, as they do for real checkpoints. `diffusers_to_ldm` is the inverse of
diffusers' own `convert_ldm_*` functions (checked by `check_round_trip`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TOKENIZER_DIR = CONFIGS / "clip-tokenizer"


def _cfg(folder: str, component: str, name: str = "config.json") -> dict:
    return json.loads((CONFIGS / folder / component / name).read_text())


def _clean(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_models(arch: str, seed: int = 0):
    """(unet, vae, [text encoders], scheduler_config) for 'sd1', 'sd2-v', 'sd2' or 'sdxl'."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = {"sd1": "sd15", "sd2-v": "sd2-v", "sd2": "sd2", "sdxl": "sdxl-base"}[arch]
    torch.manual_seed(seed)
    small_text = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                      max_position_embeddings=77)
    unet_cfg = _clean(_cfg(folder, "unet"))
    unet_cfg.update(block_out_channels=[32, 64], layers_per_block=1, sample_size=8)
    if arch == "sdxl":
        te = [CLIPTextModel(CLIPTextConfig(**{**_clean(_cfg(folder, "text_encoder")), **small_text,
                                              "hidden_size": 32})),
              CLIPTextModelWithProjection(CLIPTextConfig(**{**_clean(_cfg(folder, "text_encoder_2")), **small_text,
                                                            "hidden_size": 48, "projection_dim": 48}))]
        # the two encoders differ in width, as CLIP-L (768) and bigG (1280) do: diffusers' own single-file
        # loader tells them apart by width
        unet_cfg.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[1, 1],
                        transformer_layers_per_block=[1, 2], cross_attention_dim=32 + 48, addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=48 + 6 * 8)
    else:
        width = 32 if arch == "sd1" else 64
        te = [CLIPTextModel(CLIPTextConfig(**{**_clean(_cfg(folder, "text_encoder")), **small_text,
                                              "hidden_size": width}))]
        unet_cfg.update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=width)
        if arch != "sd1":
            unet_cfg["attention_head_dim"] = [1, 1]
    unet = UNet2DConditionModel(**unet_cfg)
    vae_cfg = _clean(_cfg(folder, "vae"))
    vae_cfg.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
    vae = AutoencoderKL(**vae_cfg)
    sched = _cfg(folder, "scheduler", "scheduler_config.json")
    for m in (unet, vae, *te):
        m.eval()
    return unet, vae, te, sched


def save_folder(out_dir: Path, unet, vae, te, sched) -> Path:
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    unet.save_pretrained(out_dir / "unet")
    vae.save_pretrained(out_dir / "vae")
    te[0].save_pretrained(out_dir / "text_encoder")
    sdxl = len(te) == 2
    pad = "!" if te[0].config.hidden_act == "gelu" and not sdxl else "<|endoftext|>"
    CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad).save_pretrained(out_dir / "tokenizer")
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if sdxl:
        te[1].save_pretrained(out_dir / "text_encoder_2")
        CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!").save_pretrained(out_dir / "tokenizer_2")
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=False)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (out_dir / "scheduler").mkdir(parents=True)
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    return out_dir


# -- diffusers -> original (LDM) layout ------------------------------------------------------------
_UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
                ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]


def unet_to_ldm(sd: dict, config) -> dict:
    L, n = len(config.block_out_channels), config.layers_per_block
    prefixes = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
                "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}
    for i in range(L):
        for j in range(n):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * (n + 1) + j}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * (n + 1) + j}.1."
        if i < L - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{1 + i * (n + 1) + n}.0.op."
        has_attn = config.up_block_types[i].startswith("CrossAttn")
        for j in range(n + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (n + 1) + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (n + 1) + j}.1."
        if i < L - 1:
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (n + 1) + n}.{2 if has_attn else 1}."
    out = {}
    for key, value in sd.items():
        match = max((p for p in prefixes if key.startswith(p)), key=len)
        rest = key[len(match):]
        if ".resnets." in match or match.startswith("mid_block.resnets"):
            for a, b in _UNET_RESNET:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
        out["model.diffusion_model." + prefixes[match] + rest] = value
    return out


def vae_to_ldm(sd: dict, config) -> dict:
    L = len(config.block_out_channels)
    out = {}
    for key, value in sd.items():
        k = key
        for i in range(L):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{L - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{L - 1 - i}.upsample.")
        for m in range(2):
            k = k.replace(f"mid_block.resnets.{m}.", f"mid.block_{m + 1}.")
        k = k.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")]:
                k = k.replace(a, b)
            if k.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + k] = value
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}


def openclip_to_ldm(sd: dict, prefix: str, extra_layer: bool = False) -> dict:
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["final_layer_norm.bias"]}
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    width = sd["embeddings.token_embedding.weight"].shape[1]
    for i in range(layers + (1 if extra_layer else 0)):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        if i == layers:  # SD 2.x's unused last layer: random, so a loader that used it would differ
            g = torch.Generator().manual_seed(1)
            r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
            inter = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
            layer = {"self_attn.q_proj.weight": r(width, width), "self_attn.k_proj.weight": r(width, width),
                     "self_attn.v_proj.weight": r(width, width), "self_attn.q_proj.bias": r(width),
                     "self_attn.k_proj.bias": r(width), "self_attn.v_proj.bias": r(width),
                     "self_attn.out_proj.weight": r(width, width), "self_attn.out_proj.bias": r(width),
                     "layer_norm1.weight": 1 + r(width), "layer_norm1.bias": r(width),
                     "layer_norm2.weight": 1 + r(width), "layer_norm2.bias": r(width),
                     "mlp.fc1.weight": r(inter, width), "mlp.fc1.bias": r(inter),
                     "mlp.fc2.weight": r(width, inter), "mlp.fc2.bias": r(width)}
        else:
            layer = {k[len(src):]: v for k, v in sd.items() if k.startswith(src)}
        out[dst + "attn.in_proj_weight"] = torch.cat([layer[f"self_attn.{c}_proj.weight"] for c in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([layer[f"self_attn.{c}_proj.bias"] for c in "qkv"])
        for a, b in [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                     ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]:
            for wb in ("weight", "bias"):
                out[dst + b + wb] = layer[a + wb]
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T
    elif extra_layer:
        out[prefix + "text_projection"] = torch.randn(width, width, generator=torch.Generator().manual_seed(2))
    return out


def diffusers_to_ldm(unet, vae, te) -> dict:
    sd = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    if len(te) == 2:
        sd.update(clip_to_ldm(te[0].state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_ldm(te[1].state_dict(), "conditioner.embedders.1.model."))
    elif te[0].config.hidden_act == "gelu":  # OpenCLIP ViT-H layout (SD 2.x)
        sd.update(openclip_to_ldm(te[0].state_dict(), "cond_stage_model.model.", extra_layer=True))
    else:
        sd.update(clip_to_ldm(te[0].state_dict(), "cond_stage_model.transformer."))
    return {k: v.detach().contiguous().clone() for k, v in sd.items() if not k.endswith("position_ids")}


def save_single_file(path: Path, unet, vae, te, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(diffusers_to_ldm(unet, vae, te), str(path), metadata=metadata)
    return path


def check_round_trip(unet, vae) -> None:
    """diffusers' own convert_ldm_* applied to our LDM layout gives back the diffusers state dicts."""
    from diffusers.loaders import single_file_utils as sfu

    ldm = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    for module, back in [(unet, sfu.convert_ldm_unet_checkpoint(ldm, dict(unet.config))),
                         (vae, sfu.convert_ldm_vae_checkpoint(ldm, dict(vae.config)))]:
        sd = module.state_dict()
        assert set(back) == set(sd), (set(sd) ^ set(back))
        for k, v in sd.items():
            assert torch.equal(back[k].reshape(v.shape), v), k


def build(arch: str, root: Path, metadata: dict[str, str] | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Write `root/<arch>` (diffusers folder) and `root/<arch>.safetensors`; returns both paths."""
    unet, vae, te, sched = build_models(arch, seed)
    folder = save_folder(Path(root) / arch, unet, vae, te, sched)
    file = save_single_file(Path(root) / f"{arch}.safetensors", unet, vae, te, metadata)
    return folder, file
