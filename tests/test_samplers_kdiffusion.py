"""The samplers AUTOMATIC1111 1.10 has beyond the first ones: DPM++ 2M SDE Heun, DPM++ 3M SDE, DPM fast,
DPM adaptive, Restart, DDIM CFG++, LCM.

Each is checked against its algorithm written out here from the papers / k-diffusion's published math
(Lu et al. 2022 for DPM-Solver(++), Xu et al. 2023 for Restart, Chung et al. 2024 for CFG++, Luo et al. 2023
for LCM), on the tiny model's raw UNet with plain CFG: an independent few-line loop per sampler, not the
project's code. Then: reports per step, interrupt, batch-size independence, Perp-Neg.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modules import images, processing, sd_samplers
from modules.errors import InterruptedException, InvalidParameter
from modules.processing import StableDiffusionProcessingTxt2Img

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

PROMPT, NEGATIVE, SEED, CFG = "a red circle", "blue square", 11, 7.0
NEW = ["DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++", "LCM"]
STOCHASTIC = ["DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM fast", "DPM adaptive", "LCM"]


def txt2img(**kw) -> StableDiffusionProcessingTxt2Img:
    defaults = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, cfg_scale=CFG, seed=SEED, width=64, height=64,
                    do_not_save_samples=True)
    return StableDiffusionProcessingTxt2Img(**{**defaults, **kw})


def pixels(images_) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images_]).astype(np.float64)


def run(model, hooks=(), **kw) -> np.ndarray:
    return pixels(processing.process_images(model, txt2img(**kw), hooks=list(hooks)).images)


def decode(model, latent: torch.Tensor) -> np.ndarray:
    return pixels(images.latents_to_pil(model.decode_first_stage(latent.to(model.dtype))))


# -- the reference: raw UNet, plain CFG, k-diffusion's CompVisDenoiser ---------------------------------------

class Reference:
    """denoised(x, sigma) = x - sigma * eps_cfg(x / sqrt(1 + sigma^2), t(sigma)); t by log-linear interpolation."""

    def __init__(self, model, scale: float = CFG):
        self.model, self.scale = model, scale
        self.c = model.get_learned_conditioning(PROMPT)
        self.uc = model.get_learned_conditioning(NEGATIVE)
        ac = model.alphas_cumprod.double()
        self.ac = ac
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.generator = torch.Generator("cpu").manual_seed(SEED)
        self.first = torch.randn((1, 4, 8, 8), generator=self.generator)
        self.accepted = 0

    def randn(self) -> torch.Tensor:
        return torch.randn((1, 4, 8, 8), generator=self.generator)

    def t_of(self, sigma: float) -> float:
        ls = math.log(sigma)
        k = int(torch.searchsorted(self.log_sigmas, torch.tensor(ls, dtype=torch.float64))) - 1
        k = min(max(k, 0), len(self.log_sigmas) - 2)
        lo, hi = float(self.log_sigmas[k]), float(self.log_sigmas[k + 1])
        return k + min(max((lo - ls) / (lo - hi), 0.0), 1.0)

    def t_to_sigma(self, t: float) -> float:
        lo = math.floor(t)
        hi = min(lo + 1, len(self.log_sigmas) - 1)
        return math.exp((1 - (t - lo)) * float(self.log_sigmas[lo]) + (t - lo) * float(self.log_sigmas[hi]))

    def eps(self, x_in: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.apply_model(torch.cat([x_in, x_in]), t, torch.cat([self.uc, self.c]))
        e_u, e_c = out.chunk(2)
        return e_u + self.scale * (e_c - e_u), e_u

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        e, _ = self.eps(x / (1 + sigma ** 2) ** 0.5, self.t_of(sigma))
        return x - sigma * e

    # schedules, written out (k-diffusion's get_sigmas / get_sigmas_karras / get_sigmas_exponential)
    def uniform(self, n):
        return [self.t_to_sigma(float(t)) for t in np.linspace(999, 0, n)] + [0.0]

    def karras(self, n, lo=None, hi=None, rho=7.0):
        lo, hi = lo or float(self.sigmas[0]), hi or float(self.sigmas[-1])
        return [(hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for r in np.linspace(0, 1, n)] + [0.0]

    def exponential(self, n):
        return [math.exp(v) for v in np.linspace(math.log(float(self.sigmas[-1])), math.log(float(self.sigmas[0])), n)] \
            + [0.0]


def brownian(seed: int, sigmas: list[float]):
    """k-diffusion's BrownianTreeNoiseSampler for one image: W(s_next) - W(s), normalised by sqrt|s_next - s|."""
    import torchsde

    positive = [s for s in sigmas if s > 0]
    lo, hi = torch.tensor(min(positive), dtype=torch.float32), torch.tensor(max(positive), dtype=torch.float32)
    tree = torchsde.BrownianTree(lo, torch.zeros(4, 8, 8), hi, entropy=seed)

    def draw(s, s_next):
        a, b = torch.tensor(s, dtype=torch.float32), torch.tensor(s_next, dtype=torch.float32)
        w = tree(b, a) * -1 if a > b else tree(a, b)
        return (w / (b - a).abs().sqrt())[None]

    return draw


def ancestral(s_from, s_to, eta=1.0):
    up = min(s_to, eta * (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5)
    return (s_to ** 2 - up ** 2) ** 0.5, up


# -- the algorithms -----------------------------------------------------------------------------------------

def ref_dpmpp_2m_sde_heun(ref, steps):
    """DPM-Solver++(2M) SDE with the Heun-type second-order correction, eta 1, Brownian noise, exponential."""
    s = ref.exponential(steps)
    noise = brownian(SEED, s)
    x, old, h_last = ref.first * s[0], None, None
    for i in range(steps):
        den = ref(x, s[i])
        if s[i + 1] == 0:
            x = den
        else:
            h = math.log(s[i] / s[i + 1])
            x = s[i + 1] / s[i] * math.exp(-h) * x + (1 - math.exp(-2 * h)) * den
            if old is not None:
                x = x + ((1 - math.exp(-2 * h)) / (2 * h) - 1) * -(h / h_last) * (den - old)
            x = x + noise(s[i], s[i + 1]) * s[i + 1] * (1 - math.exp(-2 * h)) ** 0.5
            h_last = h
        old = den
    return x


def ref_dpmpp_3m_sde(ref, steps):
    """DPM-Solver++(3M) SDE, eta 1, Brownian noise, exponential schedule for steps + 1 minus its next-to-last."""
    full = ref.exponential(steps + 1)
    s = full[:-2] + full[-1:]
    noise = brownian(SEED, s)
    x, hist = ref.first * s[0], []  # [(denoised, h)] of the previous steps, newest first
    for i in range(steps):
        den = ref(x, s[i])
        if s[i + 1] == 0:
            x = den
            break
        h = math.log(s[i] / s[i + 1])
        he = 2 * h
        x = math.exp(-he) * x + (1 - math.exp(-he)) * den
        phi2 = (math.exp(-he) - 1) / he + 1
        if len(hist) >= 2:
            (d1, h1), (d2, h2) = hist[0], hist[1]
            r0, r1 = h1 / h, h2 / h
            a, b = (den - d1) / r0, (d1 - d2) / r1
            x = x + phi2 * (a + (a - b) * r0 / (r0 + r1)) - (phi2 / he - 0.5) * (a - b) / (r0 + r1)
        elif hist:
            d1, h1 = hist[0]
            x = x + phi2 * (den - d1) / (h1 / h)
        x = x + noise(s[i], s[i + 1]) * s[i + 1] * (1 - math.exp(-2 * h)) ** 0.5
        hist.insert(0, (den, h))
    return x


def ref_dpm_solver(eps, x, t, t_next, order):
    """DPM-Solver-1/2/3 (Lu et al. 2022, noise-prediction form, lambda = -log sigma)."""
    sg = lambda v: math.exp(-v)  # noqa: E731
    h = t_next - t
    e0 = eps(x, t)
    if order == 1:
        return x - sg(t_next) * math.expm1(h) * e0, None
    r1 = 0.5 if order == 2 else 1 / 3
    e1 = eps(x - sg(t + r1 * h) * math.expm1(r1 * h) * e0, t + r1 * h)
    second = x - sg(t_next) * math.expm1(h) * e0 - sg(t_next) / (2 * r1) * math.expm1(h) * (e1 - e0)
    if order == 2:
        return second, x - sg(t_next) * math.expm1(h) * e0
    r2 = 2 / 3
    u2 = (x - sg(t + r2 * h) * math.expm1(r2 * h) * e0
          - sg(t + r2 * h) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0))
    e2 = eps(u2, t + r2 * h)
    third = x - sg(t_next) * math.expm1(h) * e0 - sg(t_next) / r2 * (math.expm1(h) / h - 1) * (e2 - e0)
    return third, second


def ref_dpm_fast(ref, steps, eta=1.0):
    """DPM-Solver-fast: `steps` evaluations, orders 3, ..., 3, steps mod 3, uniform in lambda, eta 1 (A1111's)."""
    smin, smax = float(ref.sigmas[0]), float(ref.sigmas[-1])
    t0, t1 = -math.log(smax), -math.log(smin)
    m = steps // 3 + 1
    ts = np.linspace(t0, t1, m + 1).tolist()
    orders = [3] * (m - 2) + [2, 1] if steps % 3 == 0 else [3] * (m - 1) + [steps % 3]
    eps = lambda x_, t: (x_ - ref(x_, math.exp(-t))) / math.exp(-t)  # noqa: E731
    x = ref.first * smax
    for k, order in enumerate(orders):
        sd, _ = ancestral(math.exp(-ts[k]), math.exp(-ts[k + 1]), eta)
        target = min(t1, -math.log(sd))
        up = (math.exp(-ts[k + 1]) ** 2 - math.exp(-target) ** 2) ** 0.5
        x, _ = ref_dpm_solver(eps, x, ts[k], target, order)
        if up:
            x = x + up * ref.randn()
    return x


def ref_dpm_adaptive(ref, eta=1.0, rtol=0.05, atol=0.0078, h=0.05, safety=0.81):
    """DPM-Solver-23 with an integral step-size controller (k-diffusion's defaults; order 1.5 with noise)."""
    smin, smax = float(ref.sigmas[0]), float(ref.sigmas[-1])
    s, t_end = -math.log(smax), -math.log(smin)
    eps = lambda x_, t: (x_ - ref(x_, math.exp(-t))) / math.exp(-t)  # noqa: E731
    x = ref.first * smax
    x_prev, errs, k = x, None, 1 / (1.5 if eta else 3)
    while s < t_end - 1e-5:
        t = min(t_end, s + h)
        sd, _ = ancestral(math.exp(-s), math.exp(-t), eta)
        t_ = min(t_end, -math.log(sd))
        up = (math.exp(-t) ** 2 - math.exp(-t_) ** 2) ** 0.5
        high, low = ref_dpm_solver(eps, x, s, t_, 3)
        delta = torch.maximum(torch.tensor(atol), rtol * torch.maximum(low.abs(), x_prev.abs()))
        inv = 1 / (float(torch.linalg.norm((low - high) / delta) / x.numel() ** 0.5) + 1e-8)
        errs = [inv, inv, inv] if errs is None else [inv, errs[1], errs[2]]
        factor = 1 + math.atan(errs[0] ** k - 1)
        if factor >= safety:
            errs = [errs[0], errs[0], errs[1]]
            x_prev, x, s = low, high + up * ref.randn(), t
            ref.accepted += 1
        h *= factor
    return x


def ref_restart(ref, steps):
    """Restart (Xu et al. 2023) with A1111's defaults at 20..35 steps: Heun on Karras over steps - 9, and at
    sigma ~0.1 one restart: renoise up to sigma ~2, then 9 Heun steps on a Karras segment back down."""
    given = ref.karras(steps)
    s = ref.karras(steps - 9, given[-2], given[0])
    lo = int(np.argmin([abs(v - 0.1) for v in s]))
    hi = int(np.argmin([abs(v - 2.0) for v in s]))
    segment = ref.karras(10, s[lo], s[hi])[:-1]
    pairs = list(zip(s[:lo], s[1:lo + 1])) + list(zip(segment[:-1], segment[1:])) + list(zip(s[lo:-1], s[lo + 1:]))
    x, last = ref.first * s[0], None
    for old, new in pairs:
        if last is not None and last < old:
            x = x + ref.randn() * (old ** 2 - last ** 2) ** 0.5
        d = (x - ref(x, old)) / old
        if new == 0:
            x = x + d * (new - old)
        else:
            x2 = x + d * (new - old)
            x = x + (d + (x2 - ref(x2, new)) / new) / 2 * (new - old)
        last = new
    return x


def ref_ddim_cfgpp(ref, steps):
    """CFG++ DDIM: x0 from the guided noise at lambda = cfg / 12.5, renoised along the unconditional noise."""
    ref.scale = CFG / 12.5
    ts = [i * (1000 // steps) + 1 for i in range(steps)][::-1]
    x = ref.first
    for k, t in enumerate(ts):
        a = float(ref.ac[t])
        a_prev = float(ref.ac[ts[k + 1]]) if k + 1 < steps else float(ref.ac[0])
        e, e_u = ref.eps(x, t)
        x0 = (x - (1 - a) ** 0.5 * e) / a ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e_u
    return x


def ref_lcm(ref, steps):
    """LCM as A1111 runs it: LCM's 50 timesteps 19, 39, ..., 999; the UNet at the nearest of them; the consistency
    boundary scalings (sigma_data 0.5, timestep x 10); x = prediction + sigma_next * noise."""
    table_t = [19 + 20 * k for k in range(50)]
    table = torch.tensor([float(ref.sigmas[t]) for t in table_t], dtype=torch.float64)
    log_table = table.log()

    def sigma_of(index):  # log-linear in the 50-entry table
        lo = math.floor(index)
        hi = min(lo + 1, 49)
        return math.exp((1 - (index - lo)) * float(log_table[lo]) + (index - lo) * float(log_table[hi]))

    s = [sigma_of((t - 19) / 20) for t in np.linspace(999, 19, steps)] + [0.0]
    x = ref.first * s[0]
    for i in range(steps):
        t = table_t[int((math.log(s[i]) - log_table).abs().argmin())]
        e, _ = ref.eps(x / (1 + s[i] ** 2) ** 0.5, t)
        den = x - s[i] * e
        c_skip, c_out = 0.25 / ((10 * t) ** 2 + 0.25), 10 * t / ((10 * t) ** 2 + 0.25) ** 0.5
        x = c_out * den + c_skip * x
        if s[i + 1] > 0:
            x = x + s[i + 1] * ref.randn()
    return x


REFERENCES = {
    "DPM++ 2M SDE Heun": (8, ref_dpmpp_2m_sde_heun),
    "DPM++ 3M SDE": (8, ref_dpmpp_3m_sde),
    "DPM fast": (8, ref_dpm_fast),
    "Restart": (21, ref_restart),
    "DDIM CFG++": (8, ref_ddim_cfgpp),
    "LCM": (6, ref_lcm),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_equals_the_algorithm_written_out(tiny_model, name):
    steps, algorithm = REFERENCES[name]
    with torch.no_grad():
        expected = decode(tiny_model, algorithm(Reference(tiny_model), steps))
    ours = run(tiny_model, sampler_name=name, steps=steps)
    assert np.abs(ours - expected).max() <= 1


def test_dpm_adaptive_equals_the_algorithm_and_reports_each_accepted_step(tiny_model):
    ref = Reference(tiny_model)
    with torch.no_grad():
        expected = decode(tiny_model, ref_dpm_adaptive(ref))
    seen = []
    ours = run(tiny_model, hooks=[seen.append], sampler_name="DPM adaptive", steps=8)
    assert np.abs(ours - expected).max() <= 1
    assert ref.accepted > 8 and [info.step for info in seen] == list(range(ref.accepted))
    assert all(info.steps == max(8, info.step + 1) for info in seen)


def test_dpm_adaptive_prompt_schedule_index_follows_the_noise_level(tiny_model, monkeypatch):
    """The denoiser's step index is the nominal step (of `steps` uniform ones) whose sigma interval holds the attempt."""
    from modules import sd_samplers_cfg_denoiser

    calls = []
    original = sd_samplers_cfg_denoiser.CFGDenoiser.__call__

    def recording(self, x, timestep, alpha, step):
        calls.append((float(timestep), step))
        return original(self, x, timestep, alpha, step)

    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "__call__", recording)
    run(tiny_model, sampler_name="DPM adaptive", steps=8)
    steps = [step for _, step in calls]
    # it integrates down to sigma_min, the nominal schedule's last nonzero sigma: nominal steps 0..6 of 8
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 6
    nominal_t = np.linspace(999, 0, 8)  # Uniform: the nominal steps' timesteps
    assert all(t <= nominal_t[step] + 1e-3 for t, step in calls)  # never above its nominal step's noise level
    firsts = {}
    for t, step in calls:
        firsts.setdefault(step, t)
    assert all(nominal_t[step + 1] - 1e-3 <= t for step, t in firsts.items())  # the step's first call is inside it


@pytest.mark.parametrize("name", [n for n in NEW if n != "DPM adaptive"])
def test_reports_every_step_once_and_stops_on_interrupt(tiny_model, name):
    seen = []
    run(tiny_model, hooks=[seen.append], sampler_name=name, steps=7)
    assert [info.step for info in seen] == list(range(7)) and all(info.steps == 7 for info in seen)
    assert all({"prompt", "negative"} <= set(info.branches) and "guidance" in info.stats for info in seen)

    def interrupt(info):
        if info.step == 2:
            raise InterruptedException()

    steps_seen = []
    result = processing.process_images(tiny_model, txt2img(sampler_name=name, steps=7),
                                       hooks=[lambda info: steps_seen.append(info.step), interrupt])
    assert steps_seen == [0, 1, 2] and len(result.images) == 1


def test_dpm_adaptive_stops_on_interrupt(tiny_model):
    steps_seen = []

    def interrupt(info):
        steps_seen.append(info.step)
        if info.step == 2:
            raise InterruptedException()

    result = processing.process_images(tiny_model, txt2img(sampler_name="DPM adaptive", batch_size=2),
                                       hooks=[interrupt])
    assert steps_seen == [0, 1, 2] and len(result.images) == 2


@pytest.mark.parametrize("name", STOCHASTIC + ["Restart"])
def test_stochastic_samplers_are_batch_size_independent(tiny_model, name):
    steps = 21 if name == "Restart" else 8  # Restart renoises from 20 steps on
    single = run(tiny_model, sampler_name=name, steps=steps)[0]
    batch = run(tiny_model, sampler_name=name, steps=steps, batch_size=3)
    assert np.abs(batch[0] - single).mean() < 0.5
    third = run(tiny_model, sampler_name=name, steps=steps, seed=SEED + 2)[0]
    assert np.abs(batch[2] - third).mean() < 0.5
    assert np.abs(batch[1] - single).mean() > 1.0  # other seeds, other noise


@pytest.mark.parametrize("name", NEW)
def test_perp_neg_works(tiny_model, name):
    cfg = run(tiny_model, sampler_name=name, steps=6)
    perp = run(tiny_model, sampler_name=name, steps=6, guidance="Perp-Neg")
    assert np.isfinite(perp).all() and np.abs(perp - cfg).mean() > 0


def test_ddim_cfgpp_under_perp_neg_renoises_along_the_empty_prompt(tiny_model):
    """With an empty negative, Perp-Neg is CFG against the empty prompt: its base (the empty prompt) is then
    CFG's uncond, so CFG++ gives the same image under both rules."""
    a = run(tiny_model, sampler_name="DDIM CFG++", guidance="Perp-Neg", negative_prompt="")
    b = run(tiny_model, sampler_name="DDIM CFG++", guidance="CFG", negative_prompt="")
    assert np.abs(a - b).max() <= 1


def test_ddim_cfgpp_differs_from_ddim_and_keeps_the_guidance_scale_of_the_job(tiny_model):
    from modules import sd_samplers_cfg_denoiser

    scales = []
    original = sd_samplers_cfg_denoiser.CFGDenoiser.__call__

    def recording(self, x, timestep, alpha, step):
        scales.append(self.guidance.scale)
        return original(self, x, timestep, alpha, step)

    import unittest.mock

    with unittest.mock.patch.object(sd_samplers_cfg_denoiser.CFGDenoiser, "__call__", recording):
        cfgpp = processing.process_images(tiny_model, txt2img(sampler_name="DDIM CFG++"))
    assert scales == [CFG / 12.5] * 8  # A1111: cond_scale * (1 / 12.5)
    assert "CFG scale: 7," in cfgpp.infotexts[0] and "Sampler: DDIM CFG++," in cfgpp.infotexts[0]
    assert np.abs(pixels(cfgpp.images) - run(tiny_model, sampler_name="DDIM")).mean() > 1


@pytest.mark.parametrize("given,name", [("k_dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"), ("k_dpmpp_3m_sde", "DPM++ 3M SDE"),
                                        ("k_dpm_fast", "DPM fast"), ("k_dpm_ad", "DPM adaptive"),
                                        ("restart", "Restart"), ("ddim_cfgpp", "DDIM CFG++"), ("k_lcm", "LCM"),
                                        ("DPM++ 3M SDE Karras", "DPM++ 3M SDE"), ("RESTART", "Restart")])
def test_names_and_aliases(given, name):
    assert sd_samplers.find_sampler_config(given).name == name


def test_registry_options_are_a1111s():
    options = {s.name: s.options for s in sd_samplers.all_samplers}
    assert options["DPM++ 2M SDE Heun"] == {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}
    assert options["DPM++ 3M SDE"] == {"scheduler": "exponential", "discard_next_to_last_sigma": True,
                                       "brownian_noise": True}
    assert options["DPM fast"] == options["DPM adaptive"] == {"uses_ensd": True}
    assert options["Restart"] == {"scheduler": "karras", "second_order": True}
    assert options["DDIM CFG++"] == options["LCM"] == {}


def test_schedule_types_the_new_samplers_take(tiny_model):
    for name in ("DPM fast", "DPM adaptive", "DDIM CFG++"):
        with pytest.raises(InvalidParameter) as err:
            sd_samplers.create_sampler(name, tiny_model, scheduler="Karras")
        assert err.value.field == "scheduler" and "Automatic" in str(err.value)
    for name in ("DPM++ 2M SDE Heun", "DPM++ 3M SDE", "Restart", "LCM"):
        for schedule in ("Beta", "Align Your Steps", "KL Optimal"):
            seen = []
            run(tiny_model, hooks=[seen.append], sampler_name=name, scheduler=schedule, steps=4)
            assert len(seen) == 4


def test_eta_of_the_new_samplers(tiny_model):
    info = lambda **kw: processing.process_images(tiny_model, txt2img(steps=3, **kw)).infotexts[0]  # noqa: E731
    assert "Eta: 0.0," in info(sampler_name="DPM fast", eta=0.0)
    assert "Eta DDIM: 0.5," in info(sampler_name="DDIM CFG++", eta=0.5)
    deterministic = run(tiny_model, sampler_name="DPM++ 3M SDE", eta=0.0)
    assert np.abs(deterministic - run(tiny_model, sampler_name="DPM++ 3M SDE")).mean() > 1
