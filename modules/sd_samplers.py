"""The sampler registry: samplers and schedule types are found by AUTOMATIC1111's names and aliases.

An entry names a constructor `(model, schedule, eta=None, discard_next_to_last_sigma=False) -> Sampler`.
`create_sampler(name, model, scheduler=...)` resolves a sampler name case-insensitively,
accepts the legacy combined names (`DPM++ 2M Karras`, `Euler a Karras`, `k_dpmpp_2m_ka`)
and splits them into sampler and schedule type, and raises SamplerNotFound for a sampler it
does not know and InvalidParameter for a schedule type it does not know (or one the sampler
cannot take).

Samplers and options are AUTOMATIC1111 1.10's (`/sdapi/v1/samplers` lists the same
options). Schedule types are `modules/sd_schedulers.py`'s: Automatic means the sampler's
own default (its `options["scheduler"]`, as A1111), else Uniform. Where diffusers computes
the schedule type's sigmas itself (Uniform, Karras, Exponential, SGM Uniform) the samplers
diffusers ships run through its schedulers; on the other schedule types, or with
`discard_next_to_last_sigma`, the same sampler runs as its k-diffusion-style function on
explicit sigmas. UniPC (diffusers only, and in A1111 a timesteps sampler without schedule
types) takes only diffusers' four; DDIM, DDIM CFG++ and PLMS (CompVis timesteps
`i * (1000 // S) + 1`) and DPM fast / DPM adaptive (which place their own steps) take only
Automatic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from modules import sd_samplers_kdiffusion as kd
from modules.errors import InvalidParameter, SamplerNotFound
from modules.sd_samplers_common import Sampler
from modules.sd_samplers_ddim import DDIMCFGPPSampler, DDIMSampler
from modules.sd_samplers_diffusers import DiffusersSampler, SchedulerRecipe
from modules.sd_samplers_kdiffusion import KDiffusionSampler, sample_dpmpp_2s_ancestral, sample_euler_ancestral
from modules.sd_schedulers import SchedulerData, all_schedulers, find_scheduler  # noqa: F401 (importable from here)

ALL_SCHEDULE_TYPES = tuple(s.name for s in all_schedulers if s.name != "automatic")
DIFFUSERS_SCHEDULE_TYPES = ("uniform", "karras", "exponential", "sgm_uniform")


@dataclass(frozen=True)
class SamplerData:
    name: str
    constructor: Callable[..., Sampler]
    aliases: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    schedule_types: tuple[str, ...] = ALL_SCHEDULE_TYPES  # besides Automatic
    schedule_note: str = ""  # why a sampler takes fewer, for the error message

    @property
    def default_schedule(self) -> str:
        """What Automatic means for this sampler (A1111's `options["scheduler"]`, else uniform)."""
        return self.options.get("scheduler", "uniform")


def _no_discard(name: str, discard: bool) -> None:
    if discard:
        raise InvalidParameter(f"Sampler {name} cannot discard the next-to-last sigma", field="discard_next_to_last_sigma")


def _kdiffusion(name: str, function: Callable, eta_default: float = 1.0, takes_eta: bool = True, brownian=False,
                discard=False, lcm=False, per_image=False, **options) -> Callable[..., Sampler]:
    """A sampler that is always a k-diffusion-style function (A1111 1.10's additions, DPM++ 2S a)."""
    def make(model, schedule: str = "uniform", eta: float | None = None, discard_next_to_last_sigma: bool = False,
             **_) -> Sampler:
        eta_ = eta_default if eta is None or not takes_eta else eta
        return KDiffusionSampler(model, name, function, schedule, eta=eta_, options=options, brownian=brownian,
                                 discard_next_to_last_sigma=discard or discard_next_to_last_sigma, lcm=lcm,
                                 per_image=per_image)
    return make


def _diffusers(name: str, cls_name: str, function: Callable | None = None, brownian=False, discard=False,
               **overrides) -> Callable[..., Sampler]:
    """diffusers' scheduler on the schedule types it computes, else the k-diffusion-style `function`.

    On the k-diffusion path the sampler keeps A1111's own options (a Brownian tree for the SDE
    samplers, DPM2's discarded next-to-last sigma) and, like its diffusers form, ignores eta.
    """
    recipe = SchedulerRecipe(cls_name, overrides)

    def make(model, schedule: str = "uniform", discard_next_to_last_sigma: bool = False, philox_noise: bool = False,
             **_) -> Sampler:
        # diffusers' schedulers draw noise from torch generators only: the NV source runs the k-diffusion form
        if schedule in DIFFUSERS_SCHEDULE_TYPES and not discard_next_to_last_sigma and not (philox_noise and function):
            return DiffusersSampler(model, name, recipe, schedule)
        if function is None:
            _no_discard(name, discard_next_to_last_sigma)
            raise InvalidParameter(f"Sampler {name} does not take schedule type {schedule}", field="scheduler")
        return KDiffusionSampler(model, name, function, schedule, eta=1.0, brownian=brownian,
                                 discard_next_to_last_sigma=discard or discard_next_to_last_sigma)
    return make


def _euler_a(model, schedule: str = "uniform", eta: float | None = None, discard_next_to_last_sigma: bool = False,
             philox_noise: bool = False, **_) -> Sampler:
    """diffusers' EulerAncestralDiscreteScheduler where it can (no Karras/exponential sigmas, no eta, torch
    generators), else k-diffusion's."""
    if schedule in ("uniform", "sgm_uniform") and eta in (None, 1.0) and not discard_next_to_last_sigma \
            and not philox_noise:
        return DiffusersSampler(model, "Euler a", SchedulerRecipe("EulerAncestralDiscreteScheduler"), schedule)
    return KDiffusionSampler(model, "Euler a", sample_euler_ancestral, schedule, eta=1.0 if eta is None else eta,
                             discard_next_to_last_sigma=discard_next_to_last_sigma)


def _ddim(model, eta: float | None = None, discard_next_to_last_sigma: bool = False, **_) -> Sampler:
    return DDIMSampler(model, eta=eta or 0.0, discard_next_to_last_sigma=discard_next_to_last_sigma)


def _ddim_cfgpp(model, eta: float | None = None, discard_next_to_last_sigma: bool = False, **_) -> Sampler:
    return DDIMCFGPPSampler(model, eta=eta or 0.0, discard_next_to_last_sigma=discard_next_to_last_sigma)


def _plms(model, discard_next_to_last_sigma: bool = False, **_) -> Sampler:
    _no_discard("PLMS", discard_next_to_last_sigma)
    recipe = SchedulerRecipe("PNDMScheduler", dict(skip_prk_steps=True, timestep_spacing="leading", steps_offset=1,
                                                   set_alpha_to_one=False))
    return DiffusersSampler(model, "PLMS", recipe, "automatic")


_DPMPP = dict(solver_order=2, solver_type="midpoint", lower_order_final=True, euler_at_final=False)
_OWN_STEPS = "it places its own steps (uniform or adaptive in log sigma)"
_TIMESTEPS = "it walks the CompVis DDIM timesteps"

all_samplers: list[SamplerData] = [
    SamplerData("DDIM", _ddim, ["ddim"], {"default_eta_is_0": True}, schedule_types=(), schedule_note=_TIMESTEPS),
    SamplerData("DPM++ 2M", _diffusers("DPM++ 2M", "DPMSolverMultistepScheduler", kd.sample_dpmpp_2m,
                                       algorithm_type="dpmsolver++", **_DPMPP),
                ["k_dpmpp_2m"], {"scheduler": "karras"}),
    SamplerData("DPM++ SDE", _diffusers("DPM++ SDE", "DPMSolverSDEScheduler", kd.sample_dpmpp_sde, brownian=True),
                ["k_dpmpp_sde"], {"scheduler": "karras", "second_order": True, "brownian_noise": True}),
    SamplerData("DPM++ 2M SDE", _diffusers("DPM++ 2M SDE", "DPMSolverMultistepScheduler", kd.sample_dpmpp_2m_sde,
                                           brownian=True, algorithm_type="sde-dpmsolver++", **_DPMPP),
                ["k_dpmpp_2m_sde"], {"scheduler": "exponential", "brownian_noise": True}),
    SamplerData("DPM++ 2M SDE Heun", _kdiffusion("DPM++ 2M SDE Heun", kd.sample_dpmpp_2m_sde, brownian=True,
                                                 solver_type="heun"),
                ["k_dpmpp_2m_sde_heun"], {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}),
    SamplerData("DPM++ 2S a", _kdiffusion("DPM++ 2S a", sample_dpmpp_2s_ancestral), ["k_dpmpp_2s_a"],
                {"scheduler": "karras", "uses_ensd": True, "second_order": True}),
    SamplerData("DPM++ 3M SDE", _kdiffusion("DPM++ 3M SDE", kd.sample_dpmpp_3m_sde, brownian=True, discard=True),
                ["k_dpmpp_3m_sde"], {"scheduler": "exponential", "discard_next_to_last_sigma": True,
                                     "brownian_noise": True}),
    SamplerData("Euler a", _euler_a, ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    SamplerData("Euler", _diffusers("Euler", "EulerDiscreteScheduler", kd.sample_euler), ["k_euler"], {}),
    SamplerData("LMS", _diffusers("LMS", "LMSDiscreteScheduler", kd.sample_lms), ["k_lms"], {}),
    SamplerData("Heun", _diffusers("Heun", "HeunDiscreteScheduler", kd.sample_heun), ["k_heun"], {"second_order": True}),
    SamplerData("DPM2", _diffusers("DPM2", "KDPM2DiscreteScheduler", kd.sample_dpm_2, discard=True), ["k_dpm_2"],
                {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True}),
    SamplerData("DPM2 a", _diffusers("DPM2 a", "KDPM2AncestralDiscreteScheduler", kd.sample_dpm_2_ancestral,
                                     discard=True), ["k_dpm_2_a"],
                {"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True, "second_order": True}),
    SamplerData("DPM fast", _kdiffusion("DPM fast", kd.sample_dpm_fast), ["k_dpm_fast"], {"uses_ensd": True},
                schedule_types=(), schedule_note=_OWN_STEPS),
    SamplerData("DPM adaptive", _kdiffusion("DPM adaptive", kd.sample_dpm_adaptive, per_image=True), ["k_dpm_ad"],
                {"uses_ensd": True}, schedule_types=(), schedule_note=_OWN_STEPS),
    SamplerData("Restart", _kdiffusion("Restart", kd.sample_restart, takes_eta=False), ["restart"],
                {"scheduler": "karras", "second_order": True}),
    SamplerData("DDIM CFG++", _ddim_cfgpp, ["ddim_cfgpp"], {}, schedule_types=(), schedule_note=_TIMESTEPS),
    SamplerData("PLMS", _plms, ["plms"], {}, schedule_types=(), schedule_note=_TIMESTEPS),
    # AUTOMATIC1111's UniPC defaults: variant bh1, order 3, lower order final, ending at sigma_min (its
    # "time_uniform" grid ends at t = 1/N; diffusers' bh1 step to sigma 0 would divide by zero)
    SamplerData("UniPC", _diffusers("UniPC", "UniPCMultistepScheduler", solver_type="bh1", solver_order=3,
                                    lower_order_final=True, predict_x0=True, final_sigmas_type="sigma_min"),
                ["unipc"], {}, schedule_types=DIFFUSERS_SCHEDULE_TYPES,
                schedule_note="it runs on diffusers' UniPCMultistepScheduler, which computes only these"),
    SamplerData("LCM", _kdiffusion("LCM", kd.sample_lcm, takes_eta=False, lcm=True), ["k_lcm"], {}),
]

# Pre-1.9 AUTOMATIC1111 aliases of the combined names: `k_dpmpp_2m_ka` is DPM++ 2M with Karras.
_LEGACY_ALIAS_SUFFIXES = {"_ka": "karras", "_exp": "exponential"}


def _find_exact(name: str) -> SamplerData | None:
    key = name.strip().lower()
    for data in all_samplers:
        if key == data.name.lower() or key in (a.lower() for a in data.aliases):
            return data
    return None


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
        why = f" ({data.schedule_note})" if data.schedule_note else ""
        raise InvalidParameter(f"Sampler {data.name} does not take schedule type {scheduler.label}{why}; "
                               f"use one of: {', '.join(allowed)}", field="scheduler")
    return data, scheduler


# Samplers that take `eta`: the infotext key A1111 writes it under, and the default it is left out at.
ETA = {"DDIM": ("Eta DDIM", 0.0), "DDIM CFG++": ("Eta DDIM", 0.0), "Euler a": ("Eta", 1.0),
       "DPM++ 2S a": ("Eta", 1.0), "DPM++ 2M SDE Heun": ("Eta", 1.0), "DPM++ 3M SDE": ("Eta", 1.0),
       "DPM fast": ("Eta", 1.0), "DPM adaptive": ("Eta", 1.0)}


def eta_infotext(sampler_name: str, eta: float | None) -> dict:
    """`{"Eta DDIM": 0.5}` / `{"Eta": 0.0}` when eta matters to the sampler and is not its default, else {}."""
    data = find_sampler_config(sampler_name)
    key, default = ETA.get(data.name if data else "", (None, None))
    return {key: eta} if key and eta is not None and eta != default else {}


def create_sampler(name: str, model, scheduler: str | None = None, **options) -> Sampler:
    """Build the sampler `name` (with schedule type `scheduler`, default Automatic) for `model`.

    `options`: `eta`, `philox_noise` (the NV noise source: no diffusers scheduler, they take torch
    generators only), and `discard_next_to_last_sigma` (A1111's `always_discard_next_to_last_sigma`:
    the schedule is made for steps + 1 and its next-to-last sigma dropped; samplers diffusers runs
    then run as their k-diffusion-style function; PLMS and UniPC refuse it).
    """
    data, sched = get_sampler_and_scheduler(name, scheduler)
    schedule = data.default_schedule if sched.name == "automatic" else sched.name
    return data.constructor(model, schedule=schedule, **options)


# Samplers the `always_discard_next_to_last_sigma` option does not reach (as in AUTOMATIC1111, it is
# a k-diffusion schedule option): the timestep samplers, and the two that place their own steps.
NO_SIGMA_SCHEDULE = ("DDIM", "DDIM CFG++", "PLMS", "UniPC", "DPM fast", "DPM adaptive")


def honours_discard_option(sampler_name: str) -> bool:
    """Whether `always_discard_next_to_last_sigma` changes this sampler's schedule (not already discarding)."""
    data = find_sampler_config(sampler_name)
    return data is not None and data.name not in NO_SIGMA_SCHEDULE and \
        not data.options.get("discard_next_to_last_sigma", False)


def uses_ensd(sampler_name: str, eta: float | None) -> bool:
    """Whether `eta_noise_seed_delta` changes this sampler's image: it draws noise after the first
    (ancestral samplers, DDIM with eta > 0); AUTOMATIC1111's `is_sampler_using_eta_noise_seed_delta`,
    which also counts DDIM."""
    data = find_sampler_config(sampler_name)
    if data is None:
        return False
    if eta is None:
        eta = 0.0 if data.options.get("default_eta_is_0") else 1.0
    return eta != 0 and (bool(data.options.get("uses_ensd")) or data.name in ("DDIM", "DDIM CFG++"))
