"""Build a random-weight Stable Diffusion 1.5-shaped model from configs/sd15 (the benchmarks' real-size model).

The architecture and sizes are SD 1.5's (UNet 860M, CLIP ViT-L text encoder, VAE 84M), the weights
random (seeded), so speed and file-format figures are those of a real SD 1.5 checkpoint, offline.

    python benchmarks/build_sd15.py OUT_DIR                  # a diffusers folder
    python benchmarks/build_sd15.py OUT_DIR --single-file F  # also an original-layout fp16 .safetensors (~2 GiB)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CONFIG = REPO / "configs" / "sd15"


def build_sd15_folder(out_dir: Path, seed: int = 0) -> Path:
    """Write the diffusers folder (float32 weights, small random init so activations stay finite)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_sd import SCHEDULER_CONFIG, TOKENIZER_DIR

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    unet = UNet2DConditionModel.from_config(json.loads((CONFIG / "unet" / "config.json").read_text()))
    unet.save_pretrained(out_dir / "unet")
    del unet
    vae = AutoencoderKL.from_config(json.loads((CONFIG / "vae" / "config.json").read_text()))
    vae.save_pretrained(out_dir / "vae")
    del vae
    te_cfg = json.loads((CONFIG / "text_encoder" / "config.json").read_text())
    te_cfg.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te_cfg.items() if k != "architectures"})).save_pretrained(
        out_dir / "text_encoder")
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(out_dir / "tokenizer")
    (out_dir / "scheduler").mkdir(parents=True)
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    shutil.copy(CONFIG / "model_index.json", out_dir / "model_index.json")
    return out_dir


def write_single_file(folder: Path, out_file: Path, dtype: torch.dtype = torch.float16) -> Path:
    """The folder as an original-layout (CompVis / AUTOMATIC1111) .safetensors, in `dtype` (SD 1.5's fp16 ~2 GiB)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from tests.tiny_checkpoints import diffusers_to_ldm

    kw = dict(local_files_only=True)
    state_dict = diffusers_to_ldm(UNet2DConditionModel.from_pretrained(folder / "unet", **kw),
                                  AutoencoderKL.from_pretrained(folder / "vae", **kw),
                                  [CLIPTextModel.from_pretrained(folder / "text_encoder", **kw)])

    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state_dict.items()}, str(out_file))
    return out_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--single-file", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not (args.out / "model_index.json").is_file():
        build_sd15_folder(args.out, args.seed)
    print(f"{args.out}: built in {time.perf_counter() - t0:.1f} s")
    if args.single_file:
        write_single_file(args.out, args.single_file)
        print(f"{args.single_file}: {args.single_file.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
