"""Compare without negative: the same job again with the negative prompt empty, without its styles, without
its LoRAs, or under another guidance rule.

"Without styles" reruns the prompts as they were sent, before `styles` were applied (the job
layer keeps them: `Job.unstyled`); "Without LoRA" takes the `<lora:...>` tags out of the prompt
(the rest of the text is encoded exactly as in the LoRA job, where the tags were taken out too).
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
WITHOUT_STYLES = "Without styles"
WITHOUT_LORA = "Without LoRA"
NO_NEGATIVE_ALIASES = {"no negative", "without negative", "without negative prompt", "no negative prompt", "none", ""}
ALIASES = {**{a: WITHOUT_NEGATIVE for a in NO_NEGATIVE_ALIASES},
           **{a: WITHOUT_STYLES for a in ("without styles", "no styles", "without style", "no style")},
           **{a: WITHOUT_LORA for a in ("without lora", "no lora", "without loras", "no loras")}}
PROMPT_FIELDS = ("prompt", "hr_prompt")  # where <lora:...> tags act (AUTOMATIC1111 reads them from prompts only)


def compare_modes() -> list[str]:
    """The choices of the page's dropdown: no negative, no styles, no LoRA, then each guidance rule."""
    return [WITHOUT_NEGATIVE, WITHOUT_STYLES, WITHOUT_LORA] + [r.name for r in sd_guidance.guidance_rules]


def resolve_mode(compare_with: str | None) -> str:
    """`"no negative"`, `"no styles"`, `"no lora"` (and their spellings) or a guidance rule's name -> the
    canonical mode; 422 otherwise."""
    text = (compare_with or "").strip() if isinstance(compare_with, str) or compare_with is None else None
    if text is None:
        raise InvalidParameter("compare_with must be text", field="compare_with")
    if text.lower() in ALIASES:
        return ALIASES[text.lower()]
    try:
        return sd_guidance.find_guidance_rule(text).name
    except InvalidParameter:
        raise InvalidParameter(f"compare_with must be 'no negative', 'no styles', 'no lora' or a guidance rule "
                               f"({', '.join(r.name for r in sd_guidance.guidance_rules)}), got {compare_with!r}",
                               field="compare_with") from None


def fix_seeds(p):
    """The job with its random seeds (-1) drawn now, so that both runs use the same ones."""
    return dataclasses.replace(p, seed=processing.fix_seed(p.seed), subseed=processing.fix_seed(p.subseed))


def strip_lora(text: str) -> str:
    """The prompt as the LoRA job encoded it: every `<kind:...>` tag taken out (modules/extra_networks)."""
    from modules import extra_networks

    return extra_networks.parse_prompt(text)[0] if isinstance(text, str) else text


def variant(p, compare_with: str, unstyled: tuple[str, str] | None = None):
    """The job to compare with: negative prompt empty; the prompts before styles (`unstyled`, the job
    layer's `Job.unstyled`; a job without styles is rerun unchanged); the `<lora:...>` tags taken out;
    or the same job under another guidance rule."""
    mode = resolve_mode(compare_with)
    if mode == WITHOUT_NEGATIVE:
        return dataclasses.replace(p, negative_prompt="")
    if mode == WITHOUT_STYLES:
        if unstyled is None:
            return dataclasses.replace(p)
        return dataclasses.replace(p, prompt=unstyled[0], negative_prompt=unstyled[1], styles=[])
    if mode == WITHOUT_LORA:
        return dataclasses.replace(p, **{name: strip_lora(getattr(p, name)) for name in PROMPT_FIELDS
                                         if hasattr(p, name)})
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
    if mode in (WITHOUT_NEGATIVE, WITHOUT_STYLES, WITHOUT_LORA):
        return mode[0].lower() + mode[1:]
    return f"guidance {mode}"
