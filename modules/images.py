"""Saving images with their generation parameters, and reading them back.

The parameters travel in the PNG's `parameters` text chunk in AUTOMATIC1111's infotext
format, so its PNG Info tab, this project's, and tools that read either agree.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def quote(value) -> str:
    """Infotext values with `,`, `:` or a newline are written JSON-quoted."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def format_parameters(params: dict) -> str:
    """`Key: value, Key: value` for the entries whose value is not None."""
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def parse_generation_parameters(text: str) -> dict[str, str]:
    """Infotext -> {"Prompt", "Negative prompt", "Steps", "Size-1", "Size-2", ...}, as AUTOMATIC1111.

    The last line holds the parameters only if it has at least 3 `key: value` pairs; lines
    from `Negative prompt:` on form the negative prompt.
    """
    res: dict[str, str] = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in re_param.findall(lastline):
        v = unquote(v) if v[:1] == '"' and v[-1:] == '"' else v
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


# Infotext key -> (StableDiffusionProcessingTxt2Img field, type), for "send to txt2img" and the API.
INFOTEXT_FIELDS: dict[str, tuple[str, type]] = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Clip skip": ("clip_skip", int),
    "Eta": ("eta", float),
    "Eta DDIM": ("eta", float),
    "NGMS": ("s_min_uncond", float),
    "Guidance": ("guidance", str),
    "Negative weight": ("negative_weight", float),
    "Negative start": ("negative_start", float),
    "Negative end": ("negative_end", float),
    "Guidance interval": ("guidance_interval", lambda v: tuple(float(x) for x in v.split("-"))),
    "CFG rescale": ("cfg_rescale", float),
}


def infotext_to_fields(params: dict[str, str]) -> dict:
    """Parsed infotext -> the processing fields it sets (unknown keys and bad values are left out)."""
    fields = {}
    for key, (name, kind) in INFOTEXT_FIELDS.items():
        if key in params:
            try:
                fields[name] = kind(params[key])
            except ValueError:
                pass
    return fields


def read_info_from_image(image: Image.Image) -> str | None:
    """The infotext stored in an image, or None."""
    return image.info.get("parameters") if hasattr(image, "info") else None


def latents_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) images in [-1, 1] -> 8-bit PIL images (rounded, as diffusers does)."""
    arr = ((images.float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def next_sequence_number(path: Path) -> int:
    """The next free NNNNN prefix in a folder, as AUTOMATIC1111 numbers its outputs."""
    numbers = [int(m.group(1)) for f in (os.listdir(path) if path.is_dir() else [])
               if (m := re.match(r"^(\d+)-", f))]
    return max(numbers, default=-1) + 1


def save_image(image: Image.Image, path: str | Path, seed: int, info: str | None) -> Path:
    """Save as `path/NNNNN-<seed>.png` with the infotext in its `parameters` chunk.

    The file is written under a temporary name and renamed, so a failure never leaves a
    half-written image behind.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"{next_sequence_number(path):05}-{seed}.png"
    pnginfo = PngImagePlugin.PngInfo()
    if info:
        pnginfo.add_text("parameters", info)
    tmp = target.with_suffix(".png.tmp")
    image.save(tmp, format="PNG", pnginfo=pnginfo)
    os.replace(tmp, target)
    return target
