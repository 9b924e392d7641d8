"""The sampler registry: samplers and schedule types are found by AUTOMATIC1111's names and aliases.

An entry names a constructor `(model, eta=None, schedule="uniform") -> Sampler`.
`create_sampler(name, model, scheduler=...)` resolves a sampler name case-insensitively,
accepts the legacy combined names (`DPM++ 2M Karras`, `Euler a Karras`, `k_dpmpp_2m_ka`)
and splits them into sampler and schedule type, and raises SamplerNotFound for a sampler it
does not know and InvalidParameter for a schedule type it does not know (or one the sampler
cannot take).

Schedule types are AUTOMATIC1111 1.9+'s: Automatic means the sampler's own default (its
`options["scheduler"]`, as A1111: Karras for DPM++ 2M, DPM++ SDE, DPM++ 2S a, DPM2, DPM2 a;
Exponential for DPM++ 2M SDE), and Uniform for the others. DDIM and PLMS are CompVis-style
samplers on the `i * (1000 // S) + 1` timesteps and take only Automatic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from modules.errors import InvalidParameter, SamplerNotFound
from modules.sd_samplers_common import Sampler
from modules.sd_samplers_ddim import DDIMSampler
from modules.sd_samplers_diffusers import (DiffusersSampler, KDiffusionSampler, SchedulerRecipe,
                                           sample_dpmpp_2s_ancestral, sample_euler_ancestral)

ALL_SCHEDULE_TYPES = ("uniform", "karras", "exponential", "sgm_uniform")


@dataclass(frozen=True)
class SchedulerData:
    """A schedule type: `name` is A1111's internal name, `label` what the UI, API and infotext show."""

    name: str
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float | None = None  # A1111's fields, for /sdapi/v1/schedulers
    need_inner_model: bool = False


all_schedulers: list[SchedulerData] = [
    SchedulerData("automatic", "Automatic"),
    SchedulerData("uniform", "Uniform", need_inner_model=True),
    SchedulerData("karras", "Karras", default_rho=7.0),
    SchedulerData("exponential", "Exponential"),
    SchedulerData("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
]


@dataclass(frozen=True)
class SamplerData:
    name: str
    constructor: Callable[..., Sampler]
    aliases: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    schedule_types: tuple[str, ...] = ALL_SCHEDULE_TYPES  # besides Automatic

    @property
    def default_schedule(self) -> str:
        """What Automatic means for this sampler (A1111's `options["scheduler"]`, else uniform)."""
        return self.options.get("scheduler", "uniform")


def _diffusers(name: str, cls_name: str, **overrides) -> Callable[..., Sampler]:
    recipe = SchedulerRecipe(cls_name, overrides)
    return lambda model, schedule="uniform", **_: DiffusersSampler(model, name, recipe, schedule)


def _euler_a(model, schedule: str = "uniform", eta: float | None = None, **_) -> Sampler:
    """diffusers' EulerAncestralDiscreteScheduler where it can (no Karras/exponential sigmas, no eta), else k-diffusion's."""
    if schedule in ("uniform", "sgm_uniform") and eta in (None, 1.0):
        return DiffusersSampler(model, "Euler a", SchedulerRecipe("EulerAncestralDiscreteScheduler"), schedule)
    return KDiffusionSampler(model, "Euler a", sample_euler_ancestral, schedule, eta=1.0 if eta is None else eta)


def _ddim(model, eta: float | None = None, **_) -> Sampler:
    return DDIMSampler(model, eta=eta or 0.0)


def _plms(model, **_) -> Sampler:
    recipe = SchedulerRecipe("PNDMScheduler", dict(skip_prk_steps=True, timestep_spacing="leading", steps_offset=1,
                                                   set_alpha_to_one=False))
    return DiffusersSampler(model, "PLMS", recipe, "automatic")


def _dpmpp_2s_a(model, schedule: str = "karras", eta: float | None = None, **_) -> Sampler:
    return KDiffusionSampler(model, "DPM++ 2S a", sample_dpmpp_2s_ancestral, schedule, eta=1.0 if eta is None else eta)


_DPMPP = dict(solver_order=2, solver_type="midpoint", lower_order_final=True, euler_at_final=False)

all_samplers: list[SamplerData] = [
    SamplerData("DDIM", _ddim, ["ddim"], {"default_eta_is_0": True}, schedule_types=()),
    SamplerData("DPM++ 2M", _diffusers("DPM++ 2M", "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", **_DPMPP),
                ["k_dpmpp_2m"], {"scheduler": "karras"}),
    SamplerData("DPM++ SDE", _diffusers("DPM++ SDE", "DPMSolverSDEScheduler"), ["k_dpmpp_sde"],
                {"scheduler": "karras", "second_order": True, "brownian_noise": True}),
    SamplerData("DPM++ 2M SDE", _diffusers("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                                           algorithm_type="sde-dpmsolver++", **_DPMPP),
                ["k_dpmpp_2m_sde"], {"scheduler": "exponential"}),
    SamplerData("DPM++ 2S a", _dpmpp_2s_a, ["k_dpmpp_2s_a"],
                {"scheduler": "karras", "uses_ensd": True, "second_order": True}),
    SamplerData("Euler a", _euler_a, ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    SamplerData("Euler", _diffusers("Euler", "EulerDiscreteScheduler"), ["k_euler"], {}),
    SamplerData("LMS", _diffusers("LMS", "LMSDiscreteScheduler"), ["k_lms"], {}),
    SamplerData("Heun", _diffusers("Heun", "HeunDiscreteScheduler"), ["k_heun"], {"second_order": True}),
    SamplerData("DPM2", _diffusers("DPM2", "KDPM2DiscreteScheduler"), ["k_dpm_2"],
                {"scheduler": "karras", "second_order": True}),
    SamplerData("DPM2 a", _diffusers("DPM2 a", "KDPM2AncestralDiscreteScheduler"), ["k_dpm_2_a"],
                {"scheduler": "karras", "uses_ensd": True, "second_order": True}),
    SamplerData("PLMS", _plms, ["plms"], {}, schedule_types=()),
    # AUTOMATIC1111's UniPC defaults: variant bh1, order 3, lower order final, ending at sigma_min (its
    # "time_uniform" grid ends at t = 1/N; diffusers' bh1 step to sigma 0 would divide by zero)
    SamplerData("UniPC", _diffusers("UniPC", "UniPCMultistepScheduler", solver_type="bh1", solver_order=3,
                                    lower_order_final=True, predict_x0=True, final_sigmas_type="sigma_min"),
                ["unipc"], {}),
]

# Pre-1.9 AUTOMATIC1111 aliases of the combined names: `k_dpmpp_2m_ka` is DPM++ 2M with Karras.
_LEGACY_ALIAS_SUFFIXES = {"_ka": "karras", "_exp": "exponential"}


def _find_exact(name: str) -> SamplerData | None:
    key = name.strip().lower()
    for data in all_samplers:
        if key == data.name.lower() or key in (a.lower() for a in data.aliases):
            return data
    return None


def find_scheduler(name: str | None) -> SchedulerData:
    """A schedule type by label, name or alias, case-insensitively; empty means Automatic."""
    if name is None or not str(name).strip():
        return all_schedulers[0]
    key = str(name).strip().lower()
    for s in all_schedulers:
        if key in (s.name, s.label.lower(), *(a.lower() for a in s.aliases)):
            return s
    raise InvalidParameter(f"Unknown schedule type {name!r}. Available: {', '.join(s.label for s in all_schedulers)}",
                           field="scheduler")


def split_legacy_name(name: str) -> tuple[SamplerData, SchedulerData] | None:
    """`DPM++ 2M Karras` -> (DPM++ 2M, Karras); `k_dpmpp_2m_ka` -> (DPM++ 2M, Karras); None if not such a name."""
    key = name.strip()
    options = sorted(((opt, s) for s in all_schedulers[1:] for opt in (s.label, s.name, *s.aliases)),
                     key=lambda o: -len(o[0]))  # "SGM Uniform" before "Uniform"
    for opt, s in options:
        if key.lower().endswith(" " + opt.lower()):
            data = _find_exact(key[:-len(opt) - 1])
            if data is not None:
                return data, s
    for suffix, sched_name in _LEGACY_ALIAS_SUFFIXES.items():
        if key.lower().endswith(suffix):
            data = _find_exact(key[:-len(suffix)])
            if data is not None:
                return data, next(s for s in all_schedulers if s.name == sched_name)
    return None


def find_sampler_config(name: str | None) -> SamplerData | None:
    """The sampler a name means (its name or an alias, case-insensitive, or a legacy combined name)."""
    if not name:
        return None
    data = _find_exact(name)
    if data is None:
        legacy = split_legacy_name(name)
        data = legacy[0] if legacy else None
    return data


def get_sampler_and_scheduler(sampler_name: str | None, scheduler_name: str | None = None
                              ) -> tuple[SamplerData, SchedulerData]:
    """Resolve a sampler name and a schedule type as AUTOMATIC1111 does; a legacy combined name's suffix wins.

    Raises SamplerNotFound (404) for an unknown sampler, InvalidParameter (422, field `scheduler`)
    for an unknown schedule type or one the sampler cannot take.
    """
    scheduler = find_scheduler(scheduler_name)
    data = _find_exact(sampler_name) if sampler_name else None
    if data is None and sampler_name:
        legacy = split_legacy_name(sampler_name)
        if legacy is not None:
            data, scheduler = legacy
    if data is None:
        raise SamplerNotFound(f"Sampler not found: {sampler_name!r}. Available: "
                              f"{', '.join(s.name for s in all_samplers)}", field="sampler_name")
    if scheduler.name != "automatic" and scheduler.name not in data.schedule_types:
        allowed = ["Automatic"] + [s.label for s in all_schedulers if s.name in data.schedule_types]
        raise InvalidParameter(f"Sampler {data.name} does not take schedule type {scheduler.label}; "
                               f"use one of: {', '.join(allowed)}", field="scheduler")
    return data, scheduler


# Samplers that take `eta`: the infotext key A1111 writes it under, and the default it is left out at.
ETA = {"DDIM": ("Eta DDIM", 0.0), "Euler a": ("Eta", 1.0), "DPM++ 2S a": ("Eta", 1.0)}


def eta_infotext(sampler_name: str, eta: float | None) -> dict:
    """`{"Eta DDIM": 0.5}` / `{"Eta": 0.0}` when eta matters to the sampler and is not its default, else {}."""
    data = find_sampler_config(sampler_name)
    key, default = ETA.get(data.name if data else "", (None, None))
    return {key: eta} if key and eta is not None and eta != default else {}


def create_sampler(name: str, model, scheduler: str | None = None, **options) -> Sampler:
    """Build the sampler `name` (with schedule type `scheduler`, default Automatic) for `model`."""
    data, sched = get_sampler_and_scheduler(name, scheduler)
    schedule = data.default_schedule if sched.name == "automatic" else sched.name
    return data.constructor(model, schedule=schedule, **options)
