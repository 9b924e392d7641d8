"""The sampler registry: samplers are found by AUTOMATIC1111's names and aliases.

An entry names a constructor `(model, options) -> Sampler`; `create_sampler` resolves a
name case-insensitively and raises SamplerNotFound for one it does not know.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from modules.errors import SamplerNotFound
from modules.sd_samplers_common import Sampler
from modules.sd_samplers_ddim import DDIMSampler


@dataclass(frozen=True)
class SamplerData:
    name: str
    constructor: Callable[..., Sampler]
    aliases: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)


all_samplers: list[SamplerData] = [
    SamplerData("DDIM", lambda model, eta=0.0, **_: DDIMSampler(model, eta=eta), ["ddim"], {"default_eta_is_0": True}),
]


def find_sampler_config(name: str | None) -> SamplerData | None:
    if not name:
        return None
    key = name.strip().lower()
    for data in all_samplers:
        if key == data.name.lower() or key in (a.lower() for a in data.aliases):
            return data
    return None


def create_sampler(name: str, model, **options) -> Sampler:
    data = find_sampler_config(name)
    if data is None:
        raise SamplerNotFound(f"Sampler not found: {name!r}. Available: {', '.join(s.name for s in all_samplers)}",
                              field="sampler_name")
    return data.constructor(model, **options)
