"""Prompt schedules -> conditioning tensors, and the conditioning active at a step.

`prompt_parser` turns text into schedules (pure data); this module encodes each distinct
text once per job and answers "which tensor does the UNet see at step s". The negative
prompt goes through exactly the same path: it *is* the unconditional conditioning.
"""
from __future__ import annotations

from typing import Callable

import torch

from modules import prompt_parser
from modules.prompt_parser import (ComposableScheduledPromptConditioning, MulticondLearnedConditioning,
                                   ScheduledPromptConditioning)

Schedule = list[ScheduledPromptConditioning]


class TextEncodingCache:
    """Encodes each distinct text once per job: cond, uncond, every schedule entry and batch share it.

    Keys are stripped: CLIP's tokenizer ignores surrounding whitespace, and AND parts keep it
    (`a AND b` gives "a " and " b").
    """

    def __init__(self, encode: Callable[[str], torch.Tensor]):
        self.encode = encode
        self.cache: dict[str, torch.Tensor] = {}
        self.encoded_texts: list[str] = []  # in encoding order; tests read it to count encoder work

    def __call__(self, text: str) -> torch.Tensor:
        key = text.strip()
        if key not in self.cache:
            self.cache[key] = self.encode(key)
            self.encoded_texts.append(key)
        return self.cache[key]


def get_learned_conditioning(encode: Callable[[str], torch.Tensor], prompts: list[str], steps: int) -> list[Schedule]:
    """One schedule of ScheduledPromptConditioning(end_at_step, cond) per prompt."""
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules(prompts, steps)
    return [[ScheduledPromptConditioning(end_at_step, encode(text)) for end_at_step, text in schedule]
            for schedule in schedules]


def get_multicond_learned_conditioning(encode: Callable[[str], torch.Tensor], prompts: list[str],
                                       steps: int) -> MulticondLearnedConditioning:
    """Like get_learned_conditioning, for prompts with AND parts: each part has its own schedule and weight."""
    res_indexes, prompt_flat_list, _ = prompt_parser.get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(encode, prompt_flat_list, steps)
    batch = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes]
             for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def active_index(schedule: Schedule, step: int) -> int:
    """Index of the schedule entry in force at 0-based sampling step `step`."""
    return prompt_parser.active_schedule_index([entry.end_at_step for entry in schedule], step)


def pad_to_length(cond: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Append chunks of the empty prompt's encoding until `cond` has `length` tokens.

    AUTOMATIC1111's `pad_cond_uncond`: a prompt and a negative prompt of different chunk
    counts still go through one UNet call, and the padding means "nothing more".
    """
    if isinstance(cond, dict):  # SDXL: only the token sequence is padded; the pooled vector stays
        return CondDict(cond, crossattn=pad_to_length(cond["crossattn"], length, empty["crossattn"]))
    missing = length - cond.shape[1]
    if missing <= 0:
        return cond
    chunks = missing // empty.shape[1]
    return torch.cat([cond, empty.expand(cond.shape[0], -1, -1).repeat(1, chunks, 1)], dim=1)


def stack_padded(conds: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """(1, T_i, C) tensors -> one (N, max T, C) batch, padded with the empty prompt's chunks.
    SDXL's CondDicts -> one CondDict of batches (crossattn padded, vector stacked)."""
    length = max(c.shape[1] for c in conds)
    if isinstance(conds[0], dict):
        padded = [pad_to_length(c, length, empty) for c in conds]
        return CondDict({key: torch.cat([c[key] for c in padded], dim=0) for key in padded[0]})
    return torch.cat([pad_to_length(c, length, empty) for c in conds], dim=0)


class CondDict(dict):
    """SDXL's conditioning: {"crossattn": (N, T, C) token states, "vector": (N, D) pooled text embeds}.

    It behaves enough like the (N, T, C) tensor of SD 1.x/2.x for the code that handles either:
    `.shape` is the token tensor's, `.to(...)` moves every part, and `+`, `-`, `*` with a number or
    another CondDict act on every part (the negative-weight interpolation).
    """

    @property
    def shape(self) -> torch.Size:
        return self["crossattn"].shape

    @property
    def dtype(self) -> torch.dtype:
        return self["crossattn"].dtype

    @property
    def device(self) -> torch.device:
        return self["crossattn"].device

    def to(self, *args, **kwargs) -> "CondDict":
        return CondDict({k: v.to(*args, **kwargs) for k, v in self.items()})

    def _apply(self, other, op) -> "CondDict":
        if isinstance(other, dict):
            return CondDict({k: op(v, other[k]) for k, v in self.items()})
        return CondDict({k: op(v, other) for k, v in self.items()})

    def __add__(self, other):
        return self._apply(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._apply(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._apply(other, lambda a, b: a * b)

    __radd__ = __add__
    __rmul__ = __mul__

    def __rsub__(self, other):
        return self._apply(other, lambda a, b: b - a)
