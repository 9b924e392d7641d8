"""Extra-network tags in prompts: `<lora:name:multiplier>` and friends, AUTOMATIC1111's syntax.

A tag is `<type:arg1:arg2:...>`; an argument `key=value` is named (`<lora:x:te=0.5:unet=1>`), the
others positional. Tags are taken out of the prompt before it is encoded (`parse_prompt`), and,
as AUTOMATIC1111 does, only the prompt's tags count (those of the first prompt of a batch): in the
negative prompt a tag is just text. The job then runs with the networks the tags ask for, applied
before sampling and removed after it, also when the job fails (`activate` / `deactivate`, called
by `processing.process_images`). A tag the engine cannot honour (an unknown type, a missing or
unreadable file, a multiplier that is not a number) becomes a warning in the job's
`Processed.comments`; the job runs without it.

This module also does the job's other per-job bookkeeping for the conditioning side: the
embeddings folder is re-read when it changed (AUTOMATIC1111 checks before every job), and
`JobNetworks.infotext` gives the `TI hashes` / `Lora hashes` keys of the infotext.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    """The arguments of one tag: `items` as written, split into `positional` and `named` (`key=value`)."""

    def __init__(self, items: list[str] | None = None):
        self.items = items or []
        self.positional: list[str] = []
        self.named: dict[str, str] = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other) -> bool:
        return isinstance(other, ExtraNetworkParams) and self.items == other.items

    def __repr__(self) -> str:
        return f"ExtraNetworkParams({self.items!r})"


def parse_prompt(prompt: str) -> tuple[str, dict[str, list[ExtraNetworkParams]]]:
    """`a <lora:x:0.5> cat` -> ("a  cat", {"lora": [ExtraNetworkParams(["x", "0.5"])]})."""
    res: dict[str, list[ExtraNetworkParams]] = defaultdict(list)

    def found(m: re.Match) -> str:
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts: list[str]) -> tuple[list[str], dict[str, list[ExtraNetworkParams]]]:
    """Every prompt without its tags, and the tags of the first prompt (AUTOMATIC1111's rule for a batch)."""
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated)
    return res, extra_data or defaultdict(list)


@dataclass
class JobNetworks:
    """What `activate` did for one job: the prompts to encode, the LoRAs applied, the warnings."""

    prompts: list[str]
    extra_network_data: dict = field(default_factory=dict)
    loras: list = field(default_factory=list)  # extra_networks_lora.AppliedLora
    warnings: list[str] = field(default_factory=list)

    @property
    def comments(self) -> str:
        """AUTOMATIC1111's `Processed.comments`: one warning a line."""
        return "".join(f"{w}\n" for w in self.warnings)

    def infotext(self, model, encoded_texts) -> dict[str, str]:
        """`TI hashes` (the embeddings in the texts actually encoded) and `Lora hashes` (the LoRAs applied)."""
        from modules import extra_networks_lora, textual_inversion

        out = dict(textual_inversion.ti_hashes_infotext(model, encoded_texts))
        out.update(extra_networks_lora.lora_hashes_infotext(self.loras))
        return out


def activate(model, prompts: list[str], lora_dir: str | Path | None = None) -> JobNetworks:
    """Before a job samples: re-read the embeddings folder if it changed, take the tags out of `prompts`,
    apply the LoRAs they name (from `lora_dir`, default `model.lora_dir` or models/Lora). Never raises for a
    bad tag: its warning goes to `JobNetworks.warnings`."""
    from modules import extra_networks_lora

    db = getattr(model, "embedding_db", None)
    if db is not None:
        db.load_if_changed(model)
    stripped, data = parse_prompts(list(prompts))
    job = JobNetworks(prompts=stripped, extra_network_data=dict(data))
    for kind in data:
        if kind != "lora":
            job.warnings.append(f"Extra network type not supported: <{kind}:...> (only <lora:...>); left out")
    job.loras, warnings = extra_networks_lora.activate(model, data.get("lora", []), lora_dir)
    job.warnings += warnings
    return job


def deactivate(model, job: JobNetworks | None) -> None:
    """After a job (also one that failed): the model is as it was before `activate`."""
    from modules import extra_networks_lora

    extra_networks_lora.deactivate(model)


def count_prompt_tokens(model, text: str, steps: int = 20, styles: list[str] | None = None, style_db=None,
                        is_positive: bool = True) -> tuple[int, int]:
    """The UI's token counter ("12/75"), as AUTOMATIC1111's `update_token_counter`: styles applied (when a
    StyleDatabase is given), `<lora:...>` tags left out, and the longest text of the prompt's schedules
    (and, for the prompt, of its AND parts) counted, embeddings as their number of vectors."""
    from modules import prompt_parser

    if style_db is not None and styles:
        text = (style_db.apply_styles_to_prompt if is_positive else style_db.apply_negative_styles_to_prompt)(
            text, styles)
    db = getattr(model, "embedding_db", None)
    if db is not None:
        db.load_if_changed(model)
    try:
        text, _ = parse_prompt(text)
        flat = prompt_parser.get_multicond_prompt_list([text])[1] if is_positive else [text]
        schedules = prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps)
    except Exception:
        schedules = [[[steps, text]]]
    texts = [t for schedule in schedules for _, t in schedule]
    return max((model.cond_stage.count_tokens(t) for t in texts), key=lambda x: x[0])
