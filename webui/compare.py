"""Compare without negative: the same job again with the negative prompt empty, or under another guidance rule.

Used by the txt2img page's *Compare* button (on the session's last job) and by
`POST /sdapi/v1/txt2img-compare`. The second run keeps every setting and the seeds of
the first (a random seed is fixed before either runs), so the two differ only by what
the negative prompt (or the guidance rule) did. Differences are |a - b| per pixel and
channel: exactly black where the two agree.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from modules import processing, sd_guidance
from modules.errors import InvalidParameter

WITHOUT_NEGATIVE = "Without negative prompt"
NO_NEGATIVE_ALIASES = {"no negative", "without negative", "without negative prompt", "no negative prompt", "none", ""}


def compare_modes() -> list[str]:
    """The choices of the page's dropdown: no negative, then each guidance rule."""
    return [WITHOUT_NEGATIVE] + [r.name for r in sd_guidance.guidance_rules]


def resolve_mode(compare_with: str | None) -> str:
    """`"no negative"` (and its spellings) or a guidance rule's name -> the canonical mode; 422 otherwise."""
    text = (compare_with or "").strip()
    if text.lower() in NO_NEGATIVE_ALIASES:
        return WITHOUT_NEGATIVE
    try:
        return sd_guidance.find_guidance_rule(text).name
    except InvalidParameter:
        raise InvalidParameter(f"compare_with must be 'no negative' or a guidance rule "
                               f"({', '.join(r.name for r in sd_guidance.guidance_rules)}), got {compare_with!r}",
                               field="compare_with") from None


def fix_seeds(p):
    """The job with its random seeds (-1) drawn now, so that both runs use the same ones."""
    return dataclasses.replace(p, seed=processing.fix_seed(p.seed), subseed=processing.fix_seed(p.subseed))


def variant(p, compare_with: str):
    """The job to compare with: negative prompt empty, or the same job under another guidance rule."""
    mode = resolve_mode(compare_with)
    if mode == WITHOUT_NEGATIVE:
        return dataclasses.replace(p, negative_prompt="")
    return dataclasses.replace(p, guidance=mode)


def difference(a: Image.Image, b: Image.Image, amplify: bool = False) -> Image.Image:
    """|a - b| per pixel and channel; with `amplify`, stretched so the largest difference is white
    (for the eye: small differences are otherwise near black)."""
    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    d = np.abs(x - y).astype(np.float32)
    if amplify and d.max() > 0:
        d = d * (255.0 / d.max())
    return Image.fromarray(d.round().clip(0, 255).astype(np.uint8), "RGB")


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean |a - b| over pixels and channels, in 8-bit units."""
    return float(np.asarray(difference(a, b), dtype=np.float32).mean())


def label_for(mode: str) -> str:
    return "without negative prompt" if mode == WITHOUT_NEGATIVE else f"guidance {mode}"
