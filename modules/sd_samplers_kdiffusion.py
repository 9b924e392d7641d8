"""k-diffusion-style samplers: each a short function of (model, x, sigmas, noise, step), and their driver.

The functions follow k-diffusion's `k_diffusion/sampling.py` (Crowson) and AUTOMATIC1111's
additions (Restart from `sd_samplers_extra.py`, LCM from `sd_samplers_lcm.py`), in
k-diffusion's convention x = x0 + sigma * eps. Every function here takes:

    model(x, sigma, i) -> denoised     the guided pred_x0 at noise level sigma; `i` is the sampling step the
                                       call belongs to (prompt schedules and guidance windows switch on it)
    noise(sigma, sigma_next) -> tensor unit Gaussian noise for the move from sigma to sigma_next: each image's own
                                       generator, or (A1111's `brownian_noise`) each image's own Brownian tree
    step(i, x)                         sampling step i is complete and x is the latent after it (the hooks; may
                                       raise InterruptedException)

and returns the final latent. Each reports exactly once per sampling step, after the step
(second-order samplers call the model twice with the same `i`); DPM fast and DPM adaptive,
which are not given sigmas to walk, say in their docstrings what a step is for them.

`KDiffusionSampler` runs one of them for the registry: sigmas from `modules.sd_schedulers`,
the model called on the VP-scaled input x / sqrt(1 + sigma^2) at the timestep of sigma (as
k-diffusion's CompVisDenoiser does), through the project's CFG denoiser, so guidance
rules, AND, branches and stats work as for every other sampler.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch

from modules import rng as rng_module
from modules import sd_schedulers
from modules.errors import InterruptedException
from modules.sd_samplers_common import AfterSampleHook, Sampler, StepInfo, call_hooks, img2img_steps

# torchsde warns on every run when a query touches its float32-rounded ends (also in diffusers' pipeline).
warnings.filterwarnings("ignore", message=r"Should have t[ab]", category=UserWarning)


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion: split a step into a deterministic part to sigma_down and fresh noise of size sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _d(x, sigma, denoised):
    """The probability-flow ODE's dx/dsigma (Karras et al. 2022)."""
    return (x - denoised) / sigma


def sample_euler(model, x, sigmas, noise, step, **_):
    """Euler (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        x = x + _d(x, sigmas[i], model(x, sigmas[i], i)) * (sigmas[i + 1] - sigmas[i])
        step(i, x)
    return x


def sample_euler_ancestral(model, x, sigmas, noise, step, eta: float = 1.0, **_):
    """Euler a: an Euler step down to sigma_down, then fresh noise of size sigma_up."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + _d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        step(i, x)
    return x


def sample_heun(model, x, sigmas, noise, step, **_):
    """Heun (Karras et al. 2022, Algorithm 2 without churn): Euler, then the trapezoidal correction."""
    for i in range(len(sigmas) - 1):
        d = _d(x, sigmas[i], model(x, sigmas[i], i))
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1], i))
            x = x + (d + d_2) / 2 * dt
        step(i, x)
    return x


def _log_midpoint(a: float, b: float) -> float:
    return math.exp((math.log(a) + math.log(b)) / 2)


def sample_dpm_2(model, x, sigmas, noise, step, **_):
    """DPM2: the derivative taken at the log-sigma midpoint (DPM-Solver-2 in sigma)."""
    for i in range(len(sigmas) - 1):
        d = _d(x, sigmas[i], model(x, sigmas[i], i))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = _log_midpoint(sigmas[i], sigmas[i + 1])
            x_2 = x + d * (sigma_mid - sigmas[i])
            x = x + _d(x_2, sigma_mid, model(x_2, sigma_mid, i)) * (sigmas[i + 1] - sigmas[i])
        step(i, x)
    return x


def sample_dpm_2_ancestral(model, x, sigmas, noise, step, eta: float = 1.0, **_):
    """DPM2 a: a DPM2 step down to sigma_down, then fresh noise of size sigma_up."""
    for i in range(len(sigmas) - 1):
        d = _d(x, sigmas[i], model(x, sigmas[i], i))
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = _log_midpoint(sigmas[i], sigma_down)
            x_2 = x + d * (sigma_mid - sigmas[i])
            x = x + _d(x_2, sigma_mid, model(x_2, sigma_mid, i)) * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        step(i, x)
    return x


def linear_multistep_coeff(order: int, t: list[float], i: int, j: int) -> float:
    """The weight of the (i - j)-th derivative in an order-`order` Adams step from t[i] to t[i + 1]."""
    from scipy import integrate

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def sample_lms(model, x, sigmas, noise, step, order: int = 4, **_):
    """LMS: linear multistep (Adams-Bashforth) in sigma over the last `order` derivatives."""
    ds = []
    for i in range(len(sigmas) - 1):
        ds = (ds + [_d(x, sigmas[i], model(x, sigmas[i], i))])[-order:]
        cur = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur, sigmas, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        step(i, x)
    return x


def sample_dpmpp_2s_ancestral(model, x, sigmas, noise, step, eta: float = 1.0, **_):
    """DPM++ 2S a: a DPM-Solver++(2S) midpoint step in log sigma to sigma_down, then noise."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + _d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = math.exp(t - s) * x - math.expm1(-h / 2) * denoised
            denoised_2 = model(x_2, math.exp(-s), i)
            x = math.exp(t - t_next) * x - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        step(i, x)
    return x


def sample_dpmpp_sde(model, x, sigmas, noise, step, eta: float = 1.0, r: float = 0.5, **_):
    """DPM++ SDE: DPM-Solver++ with a stochastic midpoint at r of the log-sigma step (Brownian noise in A1111)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = x + _d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            s = t + (t_next - t) * r
            sd, su = get_ancestral_step(sigmas[i], math.exp(-s), eta)
            s_ = -math.log(sd)
            x_2 = math.exp(t - s_) * x - math.expm1(t - s_) * denoised
            x_2 = x_2 + noise(sigmas[i], math.exp(-s)) * su
            denoised_2 = model(x_2, math.exp(-s), i)
            sd, su = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
            t_next_ = -math.log(sd)
            fac = 1 / (2 * r)
            x = math.exp(t - t_next_) * x - math.expm1(t - t_next_) * ((1 - fac) * denoised + fac * denoised_2)
            x = x + noise(sigmas[i], sigmas[i + 1]) * su
        step(i, x)
    return x


def sample_dpmpp_2m(model, x, sigmas, noise, step, **_):
    """DPM++ 2M: DPM-Solver++(2M), second order from the previous step's prediction."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            d = denoised
            if old is not None:
                r = (math.log(sigmas[i - 1]) - math.log(sigmas[i])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        old = denoised
        step(i, x)
    return x


def sample_dpmpp_2m_sde(model, x, sigmas, noise, step, eta: float = 1.0, solver_type: str = "midpoint", **_):
    """DPM++ 2M SDE (Lu et al. 2022): multistep DPM-Solver++ SDE; `solver_type` "heun" is DPM++ 2M SDE Heun."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (denoised - old)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5
            h_last = h
        old = denoised
        step(i, x)
    return x


def sample_dpmpp_3m_sde(model, x, sigmas, noise, step, eta: float = 1.0, **_):
    """DPM++ 3M SDE: multistep DPM-Solver++ SDE of third order from the two previous predictions."""
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
        step(i, x)
    return x


def _dpm_solver_step(eps, x, t, t_next, order, between):
    """One DPM-Solver step of order 1, 2 (r1 = 1/2) or 3 (r1 = 1/3, r2 = 2/3) in t = -log sigma (Lu et al. 2022).

    `eps(x, t)` evaluates the model; `between()` is called between the step's evaluations.
    Returns the new x and, for order 3, also the order-2 (r1 = 1/3) estimate DPM adaptive compares with.
    """
    sig = lambda v: math.exp(-v)  # noqa: E731
    h = t_next - t
    e = eps(x, t)
    x_1 = x - sig(t_next) * math.expm1(h) * e
    if order == 1:
        return x_1, None
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = t + r1 * h
    between()
    e_1 = eps(x - sig(s1) * math.expm1(r1 * h) * e, s1)
    x_2 = x_1 - sig(t_next) / (2 * r1) * math.expm1(h) * (e_1 - e)
    if order == 2:
        return x_2, x_1
    r2 = 2 / 3
    s2 = t + r2 * h
    u_2 = x - sig(s2) * math.expm1(r2 * h) * e - sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e_1 - e)
    between()
    e_2 = eps(u_2, s2)
    return x_1 - sig(t_next) / r2 * (math.expm1(h) / h - 1) * (e_2 - e), x_2


def sample_dpm_fast(model, x, sigmas, noise, step, eta: float = 0.0, s_noise: float = 1.0, **_):
    """DPM fast (DPM-Solver-fast, Lu et al. 2022): n = len(sigmas) - 1 model evaluations, uniform in log sigma
    from sigmas[0] down to sigmas[-2] (A1111 passes sigma_max, sigma_min and n so), in steps of order 3 with a
    last one of order n mod 3.

    Its sampling steps are its model evaluations, as A1111's progress counts them: each is
    reported (n in all); the report of a solver step's last evaluation carries the new x,
    the others the x the solver step started from. `i` is the evaluation's index.
    """
    n = len(sigmas) - 1
    t_start, t_end = -math.log(sigmas[0]), -math.log(sigmas[-2])
    m = n // 3 + 1
    ts = np.linspace(t_start, t_end, m + 1).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    calls = 0

    def eps(x_, t):
        nonlocal calls
        e = (x_ - model(x_, math.exp(-t), calls)) / math.exp(-t)
        calls += 1
        return e

    for k, order in enumerate(orders):
        t, t_next = ts[k], ts[k + 1]
        t_target, sigma_up = t_next, 0.0
        if eta:
            sd, _ = get_ancestral_step(math.exp(-t), math.exp(-t_next), eta)
            t_target = min(t_end, -math.log(sd))
            sigma_up = (math.exp(-t_next) ** 2 - math.exp(-t_target) ** 2) ** 0.5
        x_start = x
        x, _ = _dpm_solver_step(eps, x, t, t_target, order, lambda: step(calls - 1, x_start))
        if sigma_up:
            x = x + sigma_up * s_noise * noise(math.exp(-t), math.exp(-t_next))
        step(calls - 1, x)
    return x


class PIDStepSizeController:
    """k-diffusion's PID controller of the adaptive step size h."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1, self.b2, self.b3 = (pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order
        self.accept_safety, self.eps, self.errs = accept_safety, eps, []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(model, x, sigmas, noise, step, eta: float = 0.0, order: int = 3, rtol: float = 0.05,
                        atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0,
                        dcoeff: float = 0.0, accept_safety: float = 0.81, s_noise: float = 1.0, **_):
    """DPM adaptive (DPM-Solver-23 with adaptive steps, Lu et al. 2022) from sigmas[0] down to sigmas[-2].

    It chooses its own steps: an attempt is an order-3 step compared with an order-2 one, and
    a PID controller on their difference accepts it or shrinks h. Each *accepted* step is
    reported (numbered 0, 1, ...; how many there are depends on the image); rejected attempts
    are not. The `i` given with the model calls is the step of the nominal schedule `sigmas`
    whose interval holds the attempt's starting sigma, so prompt editing and guidance
    windows act at the same noise levels as with a fixed-step sampler of `len(sigmas) - 1` steps.
    """
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    n = len(sigmas) - 1
    nominal = lambda sigma: min(n - 1, sum(1 for v in sigmas[1:n] if v >= sigma))  # noqa: E731
    t_end = -math.log(sigmas[-2])
    s, x_prev, index = -math.log(sigmas[0]), x, 0
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    while s < t_end - 1e-5:
        t = min(t_end, s + pid.h)
        t_, sigma_up = t, 0.0
        if eta:
            sd, _ = get_ancestral_step(math.exp(-s), math.exp(-t), eta)
            t_ = min(t_end, -math.log(sd))
            sigma_up = (math.exp(-t) ** 2 - math.exp(-t_) ** 2) ** 0.5
        i = nominal(math.exp(-s))
        eps = lambda x_, t_eval: (x_ - model(x_, math.exp(-t_eval), i)) / math.exp(-t_eval)  # noqa: E731
        x_high, x_low = _dpm_solver_step(eps, x, s, t_, order, lambda: None)
        delta = torch.maximum(torch.tensor(atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + sigma_up * s_noise * noise(math.exp(-s), math.exp(-t)) if sigma_up else x_high
            s = t
            step(index, x)
            index += 1
    return x


def sample_restart(model, x, sigmas, noise, step, s_noise: float = 1.0, **_):
    """Restart (Xu et al. 2023), as A1111's `restart_sampler`: Heun steps; from 20 steps on, the main
    schedule becomes Karras over (steps - 9) steps between sigmas[0] and sigmas[-2], and on reaching
    sigma ~0.1 the latent is renoised up to sigma ~2 and re-solved in 9 Heun steps (from 36 steps on:
    steps // 4 steps, twice). Every Heun step is one reported step, so `len(sigmas) - 1` in all."""
    total = len(sigmas) - 1
    restarts: dict[float, tuple[int, int, float]] = {}
    if total >= 20:
        restart_steps, restart_times = (total // 4, 2) if total >= 36 else (9, 1)
        sigmas = sd_schedulers.karras(total - restart_steps * restart_times, sigmas[-2], sigmas[0])
        restarts = {0.1: (restart_steps + 1, restart_times, 2.0)}
    nearest = lambda v: int(np.argmin([abs(s - v) for s in sigmas]))  # noqa: E731
    at = {nearest(key): value for key, value in restarts.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            r_steps, r_times, r_max = at[i + 1]
            min_idx, max_idx = i + 1, nearest(r_max)
            if max_idx < min_idx:
                restart = sd_schedulers.karras(r_steps, sigmas[min_idx], sigmas[max_idx])[:-1]
                pairs.extend(list(zip(restart[:-1], restart[1:])) * r_times)
    last = None
    for k, (old, new) in enumerate(pairs):
        if last is not None and last < old:
            x = x + noise(old, last) * s_noise * (old ** 2 - last ** 2) ** 0.5
        d = _d(x, old, model(x, old, k))
        if new == 0:
            x = x + d * (new - old)
        else:
            x_2 = x + d * (new - old)
            x = x + (d + _d(x_2, new, model(x_2, new, k))) / 2 * (new - old)
        last = new
        step(k, x)
    return x


def sample_lcm(model, x, sigmas, noise, step, **_):
    """LCM (Luo et al. 2023): jump to the consistency model's prediction, renoise to the next sigma."""
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i], i)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
        step(i, x)
    return x


# -- noise --------------------------------------------------------------------------------------------

class BrownianNoise:
    """k-diffusion's BrownianTreeNoiseSampler with one torchsde tree per image, entropy = the image's seed
    (A1111's `brownian_noise`), over [smallest nonzero sigma, largest sigma] of the whole schedule."""

    def __init__(self, shape, seeds, sigma_min: float, sigma_max: float, device, dtype):
        import torchsde

        t0, t1 = torch.tensor(sigma_min, dtype=torch.float32), torch.tensor(sigma_max, dtype=torch.float32)
        self.trees = [torchsde.BrownianTree(t0, torch.zeros(shape), t1, entropy=int(seed)) for seed in seeds]
        self.device, self.dtype = device, dtype

    @staticmethod
    def _w(tree, sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_next, dtype=torch.float32)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        return tree(lo, hi) * sign / (b - a).abs().sqrt()

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        return torch.stack([self._w(tree, sigma, sigma_next) for tree in self.trees]).to(self.device, self.dtype)

    def image(self, j: int) -> Callable:
        return lambda sigma, sigma_next: self._w(self.trees[j], sigma, sigma_next)[None].to(self.device, self.dtype)


# -- the driver -----------------------------------------------------------------------------------------

class KDiffusionSampler(Sampler):
    """A k-diffusion-style sampler on the sigmas of its schedule type (modules/sd_schedulers.py).

    `options` are the function's own keywords (`solver_type`); `brownian` gives each image
    its own Brownian tree; `lcm` uses LCM's 50-timestep table and output scalings;
    `per_image` solves each image of a batch on its own (DPM adaptive, whose step-size
    control would otherwise couple the images of a batch; each of its model calls still
    evaluates the whole batch and keeps that image's row).
    """

    def __init__(self, model, name: str, function: Callable, schedule: str, eta: float = 1.0, *,
                 options: dict | None = None, brownian: bool = False, discard_next_to_last_sigma: bool = False,
                 lcm: bool = False, per_image: bool = False):
        self.model, self.name, self.function, self.schedule, self.eta = model, name, function, schedule, eta
        self.options = dict(options or {})
        self.brownian, self.discard, self.lcm, self.per_image = brownian, discard_next_to_last_sigma, lcm, per_image
        self._table = None

    @property
    def table(self) -> sd_schedulers.ModelSigmas:
        if self._table is None:
            cls = sd_schedulers.LCMSigmas if self.lcm else sd_schedulers.ModelSigmas
            self._table = cls(self.model.alphas_cumprod)
        return self._table

    def sigmas(self, steps: int) -> list[float]:
        return sd_schedulers.get_sigmas(self.schedule, steps, self.table, is_sdxl=bool(getattr(self.model, "is_sdxl", False)),
                                        discard_next_to_last_sigma=self.discard)

    def sample(self, denoiser, noise: torch.Tensor, steps: int, rng, hooks: list[AfterSampleHook]) -> torch.Tensor:
        sigmas = self.sigmas(steps)
        return self._run(denoiser, noise.float().to(self.model.device) * sigmas[0], sigmas, sigmas, rng, hooks)

    def sample_img2img(self, denoiser, init_latent, noise, steps, denoising_strength, rng, hooks, fix_steps=False):
        """A1111's k-diffusion img2img: the last t_enc + 1 steps, `sigmas[total - t_enc - 1:]`, from
        `init_latent + noise * sigma_sched[0]`; the Brownian trees span the whole schedule, as A1111's."""
        total, t_enc = img2img_steps(steps, denoising_strength, fix_steps)
        sigmas = self.sigmas(total)
        sched = sigmas[total - t_enc - 1:]
        device = self.model.device
        x = init_latent.float().to(device) + noise.float().to(device) * sched[0]
        return self._run(denoiser, x, sched, sigmas, rng, hooks)

    def _noise(self, sigmas: list[float], x: torch.Tensor, rng) -> Callable:
        if self.brownian:
            positive = [s for s in sigmas if s > 0]
            return BrownianNoise(x.shape[1:], rng.seeds, min(positive), max(positive), x.device, torch.float32)
        return lambda sigma, sigma_next: rng.next().float().to(x.device)

    def _run(self, denoiser, x: torch.Tensor, sched: list[float], all_sigmas: list[float], rng,
             hooks: list[AfterSampleHook]) -> torch.Tensor:
        dtype, table = self.model.dtype, self.table
        steps_run = len(sched) - 1
        last: dict = {}

        def model_fn(x_: torch.Tensor, sigma: float, i: int) -> torch.Tensor:
            alpha = 1.0 / (1.0 + sigma ** 2)
            t = table.model_timestep(sigma)
            out = denoiser((x_ * alpha ** 0.5).to(dtype), t, alpha, i)
            last.update(out=out, t=t)
            return table.scale_output(sigma, out.pred_x0.float(), x_)

        noise = self._noise(all_sigmas, x, rng)
        kwargs = {"eta": self.eta, **self.options}
        if self.per_image and x.shape[0] > 1:
            return self._run_per_image(model_fn, last, x, sched, noise, rng, hooks, kwargs).to(dtype)
        reports: list[StepInfo] = []

        def report(i: int, x_: torch.Tensor) -> None:
            out = last["out"]
            info = StepInfo(i, max(steps_run, i + 1), last["t"], x_, out.pred_x0, out.branches, out.stats)
            reports.append(info)
            call_hooks(hooks, info)

        try:
            x = self.function(model_fn, x, sched, noise, report, **kwargs)
        except InterruptedException:
            if not reports:  # stopped inside the first step: nothing to return here (process_images decides)
                raise
            info = reports[-1]
            return (info.pred_x0 if info.step < info.steps - 1 else info.x).to(dtype)
        return x.to(dtype)

    def _run_per_image(self, model_fn, last, x, sched, noise, rng, hooks, kwargs) -> torch.Tensor:
        """Solve image j alone for j = 0..n-1; reports carry the whole batch (rows not yet solved: their start)."""
        current, preds = x.clone(), x.clone()
        branches: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        count = 0
        for j in range(x.shape[0]):
            def model_j(x_j, sigma, i, j=j):
                batch = current.clone()
                batch[j:j + 1] = x_j
                return model_fn(batch, sigma, i)[j:j + 1]

            def report_j(i, x_j, j=j):
                nonlocal count
                out = last["out"]
                current[j:j + 1] = x_j
                preds[j:j + 1] = out.pred_x0[j:j + 1].float()
                for key, value in out.branches.items():
                    branches.setdefault(key, value.clone())[j:j + 1] = value[j:j + 1]
                for key, value in out.stats.items():
                    stats.setdefault(key, value.clone())[j] = value[j]
                info = StepInfo(count, max(len(sched) - 1, count + 1), last["t"], current.clone(), preds.clone(),
                                {k: v.clone() for k, v in branches.items()}, {k: v.clone() for k, v in stats.items()})
                count += 1
                call_hooks(hooks, info)

            if isinstance(noise, BrownianNoise):
                noise_j = noise.image(j)
            else:
                gen = rng.generators[j]
                noise_j = lambda s, s_next, gen=gen: rng_module.randn(rng.shape, gen)[None].to(x.device)  # noqa: E731
            try:
                current[j:j + 1] = self.function(model_j, x[j:j + 1], sched, noise_j, report_j, **kwargs)
            except InterruptedException:
                return torch.cat([current[:j], preds[j:j + 1], current[j + 1:]])
        return current
