"""The sampler registry on a tiny random-weight SD model: parity with diffusers' pipeline per scheduler,
per-image noise, schedule types and legacy names, infotext, hooks and interrupt for every sampler."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modules import images, processing, sd_samplers
from modules.errors import InterruptedException, InvalidParameter, SamplerNotFound
from modules.processing import StableDiffusionProcessingTxt2Img
from modules.sd_samplers_diffusers import KDiffusionSampler, sample_euler_ancestral
from tests.tiny_sd import diffusers_pipeline

# DPM++ SDE's Brownian tree (torchsde) warns when a query touches its float32-rounded ends; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

STEPS = 6
SEED = 11
PROMPT, NEGATIVE = "a red circle", "blue square"

UNIFORM = dict(timestep_spacing="linspace")
KARRAS = dict(timestep_spacing="linspace", use_karras_sigmas=True)
EXPONENTIAL = dict(timestep_spacing="linspace", use_exponential_sigmas=True)
SGM_UNIFORM = dict(timestep_spacing="trailing")
DPMPP_2M = dict(algorithm_type="dpmsolver++", solver_order=2)
DPMPP_2M_SDE = dict(algorithm_type="sde-dpmsolver++", solver_order=2)

# (sampler name, schedule type, diffusers scheduler, config overrides the reference pipeline gets):
# the mapping of A1111's names onto diffusers, spelled out independently of the registry.
PARITY = [
    ("Euler", "Automatic", "EulerDiscreteScheduler", UNIFORM),
    ("Euler", "Karras", "EulerDiscreteScheduler", KARRAS),
    ("Euler", "Exponential", "EulerDiscreteScheduler", EXPONENTIAL),
    ("Euler", "SGM Uniform", "EulerDiscreteScheduler", SGM_UNIFORM),
    ("Euler a", "Automatic", "EulerAncestralDiscreteScheduler", UNIFORM),
    ("LMS", "Automatic", "LMSDiscreteScheduler", UNIFORM),
    ("LMS Karras", "Automatic", "LMSDiscreteScheduler", KARRAS),
    ("Heun", "Automatic", "HeunDiscreteScheduler", UNIFORM),
    ("DPM2", "Automatic", "KDPM2DiscreteScheduler", KARRAS),
    ("DPM2 a", "Automatic", "KDPM2AncestralDiscreteScheduler", KARRAS),
    ("DPM++ 2M", "Automatic", "DPMSolverMultistepScheduler", {**DPMPP_2M, **KARRAS}),
    ("DPM++ 2M", "Uniform", "DPMSolverMultistepScheduler", {**DPMPP_2M, **UNIFORM}),
    ("DPM++ 2M SDE", "Automatic", "DPMSolverMultistepScheduler", {**DPMPP_2M_SDE, **EXPONENTIAL}),
    ("DPM++ 2M SDE Karras", "Automatic", "DPMSolverMultistepScheduler", {**DPMPP_2M_SDE, **KARRAS}),
    ("DPM++ SDE", "Automatic", "DPMSolverSDEScheduler", KARRAS),
    ("UniPC", "Automatic", "UniPCMultistepScheduler",
     {**UNIFORM, "solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ("UniPC", "Karras", "UniPCMultistepScheduler",
     {**KARRAS, "solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ("PLMS", "Automatic", "PNDMScheduler", dict(skip_prk_steps=True)),
]

ALL_NAMES = [s.name for s in sd_samplers.all_samplers]
# DPM adaptive chooses how many steps it takes (tests/test_samplers_kdiffusion.py checks its reports)
FIXED_STEP_NAMES = [name for name in ALL_NAMES if name != "DPM adaptive"]
STOCHASTIC = ["Euler a", "DPM2 a", "DPM++ 2M SDE", "DPM++ SDE", "DPM++ 2S a", "Euler a Karras"]


def txt2img(**kw) -> StableDiffusionProcessingTxt2Img:
    defaults = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=7.0, seed=SEED,
                    width=64, height=64, do_not_save_samples=True)
    return StableDiffusionProcessingTxt2Img(**{**defaults, **kw})


def pixels(images_) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images_]).astype(np.float64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and this machine's cores are shared (oversubscription costs 50x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = diffusers_pipeline(tiny_model_dir)
    pipe.base_scheduler_config = dict(pipe.scheduler.config)  # the model's own, before any test swaps it
    return pipe


def reference(pipe, cls_name: str, overrides: dict, seeds: list[int]) -> np.ndarray:
    """diffusers' pipeline on the project's initial noise, with the same per-image generators afterwards."""
    import diffusers

    config = pipe.base_scheduler_config
    if cls_name == "DPMSolverSDEScheduler":
        overrides = {**overrides, "noise_sampler_seed": seeds}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(config, **overrides)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    latents = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators])  # as ImageRNG.first()
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0, latents=latents,
               generator=generators, num_images_per_prompt=len(seeds), output_type="np").images
    return (out * 255).round()


@pytest.mark.parametrize("name,schedule,cls_name,overrides", PARITY, ids=[f"{c[0]}-{c[1]}" for c in PARITY])
def test_equals_diffusers_pipeline_with_the_same_scheduler(tiny_model, pipe, name, schedule, cls_name, overrides):
    ours = pixels(processing.process_images(tiny_model, txt2img(sampler_name=name, scheduler=schedule,
                                                                batch_size=2)).images)
    ref = reference(pipe, cls_name, overrides, [SEED, SEED + 1])
    assert np.abs(ours - ref).mean() < 1.0


@pytest.fixture(scope="module")
def v_model_and_pipe(tmp_path_factory):
    from modules import sd_models
    from tests.tiny_sd import build_tiny_sd

    model_dir = build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")
    v_pipe = diffusers_pipeline(model_dir)
    v_pipe.base_scheduler_config = dict(v_pipe.scheduler.config)
    return sd_models.load_model(model_dir, device="cpu"), v_pipe


V_PARITY = [c for c in PARITY if (c[0], c[1]) in {("Euler a", "Automatic"), ("DPM++ 2M", "Automatic"),
                                                 ("DPM2", "Automatic"), ("DPM++ SDE", "Automatic"),
                                                 ("UniPC", "Automatic"), ("PLMS", "Automatic")}]


@pytest.mark.parametrize("name,schedule,cls_name,overrides", V_PARITY, ids=[c[0] for c in V_PARITY])
def test_v_prediction_equals_diffusers_pipeline(v_model_and_pipe, name, schedule, cls_name, overrides):
    model, v_pipe = v_model_and_pipe
    ours = pixels(processing.process_images(model, txt2img(sampler_name=name, scheduler=schedule,
                                                           batch_size=2)).images)
    assert np.abs(ours - reference(v_pipe, cls_name, overrides, [SEED, SEED + 1])).mean() < 1.0


def test_k_diffusion_euler_ancestral_equals_diffusers(tiny_model, pipe, monkeypatch):
    """The k-diffusion-style driver (used for DPM++ 2S a and Euler a on Karras sigmas) checked on Euler a."""
    monkeypatch.setattr(sd_samplers, "DiffusersSampler", lambda model, name, recipe, schedule: KDiffusionSampler(
        model, name, sample_euler_ancestral, schedule))
    sampler = sd_samplers.create_sampler("Euler a", tiny_model)
    assert isinstance(sampler, KDiffusionSampler)
    ours = pixels(processing.process_images(tiny_model, txt2img(sampler_name="Euler a", batch_size=2)).images)
    ref = reference(pipe, "EulerAncestralDiscreteScheduler", UNIFORM, [SEED, SEED + 1])
    assert np.abs(ours - ref).mean() < 1.0


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_are_batch_size_independent(tiny_model, name):
    single = pixels(processing.process_images(tiny_model, txt2img(sampler_name=name)).images)[0]
    batch = pixels(processing.process_images(tiny_model, txt2img(sampler_name=name, batch_size=3)).images)
    assert np.abs(batch[0] - single).mean() < 0.5
    assert np.abs(batch[1] - single).mean() > 1.0  # other seeds, other noise


@pytest.mark.parametrize("name", FIXED_STEP_NAMES + ["Euler a Karras"])
def test_hooks_see_every_step_with_branches_and_can_interrupt(tiny_model, monkeypatch, name):
    from modules import sd_samplers_cfg_denoiser

    denoiser_steps = []
    original = sd_samplers_cfg_denoiser.CFGDenoiser.__call__

    calls = []

    def recording(self, x, timestep, alpha, step):
        denoiser_steps.append(step)
        calls.append((float(timestep), float(alpha)))
        return original(self, x, timestep, alpha, step)

    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "__call__", recording)
    seen = []
    processing.process_images(tiny_model, txt2img(sampler_name=name), hooks=[lambda info: seen.append(info)])
    assert [info.step for info in seen] == list(range(STEPS))
    assert all({"prompt", "negative"} <= set(info.branches) for info in seen)
    assert all(info.pred_x0.shape == (1, 4, 8, 8) and torch.isfinite(info.x).all() for info in seen)
    # the denoiser gets the sampling step's index (prompt schedules switch on it), twice per step for 2nd order
    assert sorted(set(denoiser_steps)) == list(range(STEPS)) and denoiser_steps == sorted(denoiser_steps)
    # the alpha given with each call is the one of the point the model is evaluated at (log-SNR close to the
    # training schedule's at that timestep), so pred_x0, branches and sigma-based guidance rules are right
    log_snr = (tiny_model.alphas_cumprod / (1 - tiny_model.alphas_cumprod)).double().log()
    for t, alpha in calls:
        lo = min(int(t), len(log_snr) - 2)
        expected = log_snr[lo] + (t - lo) * (log_snr[lo + 1] - log_snr[lo])
        assert abs(math.log(alpha / (1 - alpha)) - float(expected)) < 0.1, (t, alpha)  # 0.1: rounded t

    def interrupt(info):
        if info.step == 2:
            raise InterruptedException()

    steps_seen = []
    result = processing.process_images(tiny_model, txt2img(sampler_name=name),
                                       hooks=[lambda info: steps_seen.append(info.step), interrupt])
    assert steps_seen == [0, 1, 2] and len(result.images) == 1


@pytest.mark.parametrize("given,sampler,schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("Euler a Karras", "Euler a", "Karras"),
    ("dpm++ 2m sde exponential", "DPM++ 2M SDE", "Exponential"),
    ("Euler SGM Uniform", "Euler", "SGM Uniform"),
    ("UniPC Uniform", "UniPC", "Uniform"),
    ("k_dpmpp_2m_ka", "DPM++ 2M", "Karras"),
    ("DPM++ 2M SDE", "DPM++ 2M SDE", "Automatic"),
    ("k_euler_a", "Euler a", "Automatic"),
    ("K_EULER_A", "Euler a", "Automatic"),
    ("k_dpmpp_2m", "DPM++ 2M", "Automatic"),
    ("k_dpmpp_2s_a", "DPM++ 2S a", "Automatic"),
    ("euler A", "Euler a", "Automatic"),
    ("plms", "PLMS", "Automatic"),
])
def test_names_aliases_and_legacy_combined_names(given, sampler, schedule):
    data, sched = sd_samplers.get_sampler_and_scheduler(given, "Automatic")
    assert (data.name, sched.label) == (sampler, schedule)
    assert sd_samplers.find_sampler_config(given).name == sampler


def test_schedule_type_names_and_errors(tiny_model):
    assert sd_samplers.get_sampler_and_scheduler("Euler", "karras")[1].label == "Karras"
    assert sd_samplers.get_sampler_and_scheduler("Euler", "sgm_uniform")[1].label == "SGM Uniform"
    assert sd_samplers.get_sampler_and_scheduler("Euler", None)[1].label == "Automatic"
    with pytest.raises(InvalidParameter) as err:
        processing.process_images(tiny_model, txt2img(sampler_name="Euler", scheduler="Nope"))
    assert err.value.field == "scheduler"
    with pytest.raises(InvalidParameter):
        processing.process_images(tiny_model, txt2img(sampler_name="DDIM", scheduler="Karras"))
    with pytest.raises(SamplerNotFound):
        processing.process_images(tiny_model, txt2img(sampler_name="Euler b Karras"))


def test_legacy_name_and_schedule_type_give_the_same_image_and_infotext(tiny_model):
    legacy = processing.process_images(tiny_model, txt2img(sampler_name="Euler a Karras", steps=3))
    split = processing.process_images(tiny_model, txt2img(sampler_name="Euler a", scheduler="Karras", steps=3))
    automatic = processing.process_images(tiny_model, txt2img(sampler_name="Euler a", steps=3))
    assert np.array_equal(pixels(legacy.images), pixels(split.images))
    assert not np.array_equal(pixels(split.images), pixels(automatic.images))
    assert legacy.infotexts == split.infotexts and legacy.sampler_name == "Euler a"
    assert "Sampler: Euler a, Schedule type: Karras, CFG scale: 7" in split.infotexts[0]
    assert "Schedule type" not in automatic.infotexts[0]
    fields = images.infotext_to_fields(images.parse_generation_parameters(split.infotexts[0]))
    assert (fields["sampler_name"], fields["scheduler"]) == ("Euler a", "Karras")
    again = processing.process_images(tiny_model, txt2img(**{k: fields[k] for k in ("sampler_name", "scheduler")},
                                                          steps=3))
    assert np.array_equal(pixels(again.images), pixels(split.images))


@pytest.mark.parametrize("name", FIXED_STEP_NAMES)
def test_one_and_two_steps(tiny_model, name):
    for steps in (1, 2):
        seen = []
        result = processing.process_images(tiny_model, txt2img(sampler_name=name, steps=steps),
                                           hooks=[lambda info: seen.append(info.step)])
        assert seen == list(range(steps)) and np.isfinite(pixels(result.images)).all()


def test_dpmpp_2s_a_without_noise_is_a_second_order_solver_of_the_same_ode(tiny_model):
    """DPM++ 2S a has no diffusers scheduler: with eta 0 it must solve the probability-flow ODE that
    DPM++ 2M solves, and at 10 steps come closer to a 40-step solution than first-order Euler does."""
    def run(name, steps, **kw):
        return pixels(processing.process_images(tiny_model, txt2img(sampler_name=name, steps=steps, **kw)).images)

    solution = run("DPM++ 2M", 40)
    two_s = np.abs(run("DPM++ 2S a", 10, eta=0.0) - solution).mean()
    euler = np.abs(run("Euler", 10, scheduler="Karras") - solution).mean()
    assert two_s < 0.5 and two_s < euler / 2
    assert np.abs(run("DPM++ 2S a", 10) - solution).mean() > 2.0  # eta 1 (the default) adds fresh noise


def test_eta_goes_into_the_infotext_where_the_sampler_uses_it(tiny_model):
    def info(**kw):
        return processing.process_images(tiny_model, txt2img(steps=2, **kw)).infotexts[0]

    assert "Eta: 0.0," in info(sampler_name="DPM++ 2S a", eta=0.0)
    assert "Eta" not in info(sampler_name="Euler a") and "Eta" not in info(sampler_name="Euler a", eta=1.0)
    assert "Eta DDIM: 0.5," in info(sampler_name="DDIM", eta=0.5)
    assert "Eta" not in info(sampler_name="DPM++ 2M", eta=0.5)  # DPM++ 2M has no eta
    fields = images.infotext_to_fields(images.parse_generation_parameters(info(sampler_name="Euler a", eta=0.0)))
    assert fields["eta"] == 0.0


@pytest.mark.parametrize("name", [s.name for s in sd_samplers.all_samplers if s.schedule_types])
def test_every_schedule_type_the_sampler_offers_runs(tiny_model, name):
    labels = {s.name: s.label for s in sd_samplers.all_schedulers}
    images_ = []
    for schedule in sd_samplers.find_sampler_config(name).schedule_types:
        seen = []
        result = processing.process_images(tiny_model, txt2img(sampler_name=name, scheduler=labels[schedule], steps=3),
                                           hooks=[lambda info: seen.append(info.step)])
        assert seen == [0, 1, 2]
        assert f"Schedule type: {labels[schedule]}," in result.infotexts[0]
        images_.append(pixels(result.images))
        assert np.isfinite(images_[-1]).all()
    # the schedule type changes the result; Normal is Uniform on a discrete schedule (A1111's formulas agree there)
    distinct = [a for schedule, a in zip(sd_samplers.find_sampler_config(name).schedule_types, images_)
                if schedule != "normal"]
    assert all(np.abs(a - distinct[0]).mean() > 0 for a in distinct[1:])
