"""Samplers: walk a denoiser D(x, σ) down a descending sigma schedule in the σ-space of Karras et al. 2022
(x = x0 + σ ε), covering k-diffusion's solvers, DPM-Solver++ (Lu et al. 2022), DDPM, DDIM, PLMS, UniPC and LCM.

Every sampler is `sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x0`, where x
is the starting latent already at noise level sigmas[0] (x = noise · sigmas[0] for txt2img).

Noise. Each fresh Gaussian is drawn in float32 from `generator` on the generator's own device, then moved to x's
device and dtype, so a CPU generator gives the same images on any device and in any precision. `generator` may be
one torch.Generator (draws of x's full shape) or one generator per batch item (each draws its item's shape, so item
i equals a batch-of-one run with that generator: A1111's per-seed scheme). Draws happen exactly where k-diffusion
calls its noise sampler (e.g. ancestral samplers draw on every step whose next σ is > 0, even with η = 0).
The SDE samplers take a `noise_sampler(σ, σ_next)` when given one (the pipeline passes A1111's Brownian tree,
brownian.py); without one they use the same generator: dpmpp_2m_sde and dpmpp_3m_sde need
one increment per step, over disjoint intervals, so independent N(0, I) draws are exact Brownian increments.
dpmpp_sde asks for W over [σ_i → σ_mid] and then over the whole [σ_i → σ_{i+1}]; we draw z₁, z₂ ~ N(0, I) for the
two sub-intervals and return z₁ and (sqrt(σ_i − σ_mid) z₁ + sqrt(σ_mid − σ_{i+1}) z₂) / sqrt(σ_i − σ_{i+1}),
the normalised increments of one Brownian path in σ (the time variable A1111's BrownianTreeNoiseSampler uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import rng
from .schedule import DiscreteSchedule, get_sigmas, resolve_schedule

__all__ = [
    "Generators",
    "Callback",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_lms",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_ddpm",
    "sample_ddim",
    "sample_plms",
    "sample_unipc",
    "sample_lcm",
    "SamplerSpec",
    "SAMPLERS",
    "resolve_sampler",
    "sampler_names",
]

DenoiserFn = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None  # or rng.CudaGenerator(s)
NoiseSampler = Callable[[float, float], Tensor] | None  # (σ, σ_next) -> N(0, I), e.g. brownian.BrownianTreeNoise
Callback = Callable[[dict[str, Any]], None] | None


# --------------------------------------------------------------------------------------------------- helpers


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    """N(0, I) shaped like x: float32 on the generator's device, then moved to x (see module docstring)."""
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=torch.float32).to(x.dtype)
    if isinstance(generator, torch.Generator) or hasattr(generator, "randn"):  # rng.CudaGenerator has randn
        return rng.draw(generator, x.shape).to(x.device, x.dtype)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}")
    draws = [rng.draw(g, x.shape[1:]).to(x.device) for g in gens]
    return torch.stack(draws).to(x.dtype)


def _sigma_list(sigmas: Tensor | Sequence[float]) -> list[float]:
    s = [float(v) for v in torch.as_tensor(sigmas).reshape(-1).tolist()]
    if len(s) < 2:
        raise ValueError("sigmas needs at least two values (one step)")
    return s


def _denoise(denoiser: DenoiserFn, x: Tensor, sigma: float) -> Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device))


def _report(callback: Callback, i: int, sigma: float, sigma_hat: float, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigma, "sigma_hat": sigma_hat, "x": x, "denoised": denoised})


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """Split a step σ_from → σ_to into a deterministic part down to σ_down and fresh noise σ_up with
    σ_down² + σ_up² = σ_to²; η = 1 gives the DDPM posterior variance σ_to²(σ_from² − σ_to²)/σ_from²."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _churn(
    x: Tensor, sigma: float, steps: int, generator: Generators, s_churn: float, s_tmin: float, s_tmax: float,
    s_noise: float,
) -> tuple[Tensor, float]:
    """Karras et al. 2022, Algorithm 2 lines 4–6: raise σ to σ̂ = σ (1 + γ) by adding noise."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + randn_like(x, generator) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


# ------------------------------------------------------------------------------------- Karras-style ODE/SDE


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """Euler steps on the probability-flow ODE dx/dσ = (x − D(x, σ))/σ (Karras et al. 2022, Algorithm 2)."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, s[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _denoise(denoiser, x, sigma_hat)
        d = (x - denoised) / sigma_hat
        _report(callback, i, s[i], sigma_hat, x, denoised)
        x = x + d * (s[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """Euler step down to σ_down, then fresh noise σ_up ("Euler a")."""
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i])
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        _report(callback, i, s[i], s[i], x, denoised)
        x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        if s[i + 1] > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler on the final step to σ = 0."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, s[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _denoise(denoiser, x, sigma_hat)
        d = (x - denoised) / sigma_hat
        _report(callback, i, s[i], sigma_hat, x, denoised)
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - _denoise(denoiser, x_2, s[i + 1])) / s[i + 1]
            x = x + (d + d_2) / 2 * dt  # trapezoidal rule
    return x


def _log_midpoint(a: float, b: float) -> float:
    return math.exp(0.5 * (math.log(a) + math.log(b)))


@torch.no_grad()
def sample_dpm_2(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """Midpoint method with the midpoint taken in log σ (DPM-Solver-2 flavour, k-diffusion's "DPM2")."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, s[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _denoise(denoiser, x, sigma_hat)
        d = (x - denoised) / sigma_hat
        _report(callback, i, s[i], sigma_hat, x, denoised)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma_hat)
        else:
            sigma_mid = _log_midpoint(sigma_hat, s[i + 1])
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = (x_2 - _denoise(denoiser, x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (s[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM2 midpoint step down to σ_down, then fresh noise σ_up."""
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i])
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        _report(callback, i, s[i], s[i], x, denoised)
        d = (x - denoised) / s[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - s[i])
        else:
            sigma_mid = _log_midpoint(s[i], sigma_down)
            x_2 = x + d * (sigma_mid - s[i])
            d_2 = (x_2 - _denoise(denoiser, x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_down - s[i])
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


def _lms_coefficient(order: int, s: list[float], i: int, j: int) -> float:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ for the Lagrange basis polynomial ℓ_j through σ_i, σ_{i−1}, ..., σ_{i−order+1}.
    Gauss–Legendre with `order` nodes is exact for this degree-(order−1) polynomial."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = s[i], s[i + 1]
    total = 0.0
    for node, weight in zip(nodes.tolist(), weights.tolist()):
        tau = 0.5 * (b - a) * node + 0.5 * (a + b)
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - s[i - k]) / (s[i - j] - s[i - k])
        total += weight * prod
    return 0.5 * (b - a) * total


@torch.no_grad()
def sample_lms(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams–Bashforth in σ with exact coefficients for uneven steps), order ≤ `order`."""
    s = _sigma_list(sigmas)
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i])
        ds.append((x - denoised) / s[i])
        if len(ds) > order:
            ds.pop(0)
        _report(callback, i, s[i], s[i], x, denoised)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(cur_order, s, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


# ----------------------------------------------------------------------------------------------- DPM-Solver++
# In λ = −log σ the ODE's exact solution is x_t = (σ_t/σ_s) x_s + σ_t ∫ e^λ D dλ (Lu et al. 2022, DPM-Solver++);
# the solvers below approximate D inside the integral, so −expm1(−h) = 1 − σ_t/σ_s multiplies D.


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S) single-step second order (Lu et al. 2022, Algorithm 1) to σ_down, then noise σ_up."""
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i])
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        _report(callback, i, s[i], s[i], x, denoised)
        if sigma_down == 0:
            x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        else:
            h = math.log(s[i] / sigma_down)
            sigma_mid = math.exp(-(-math.log(s[i]) + 0.5 * h))  # r = 1/2 in λ
            x_2 = (sigma_mid / s[i]) * x - math.expm1(-0.5 * h) * denoised
            denoised_2 = _denoise(denoiser, x_2, sigma_mid)
            x = (sigma_down / s[i]) * x - math.expm1(-h) * denoised_2
        if s[i + 1] > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
    return x


def _expm1_log_ratio(a: float, b: float) -> float:
    """expm1(log(a/b)) = a/b − 1, accurate when a ≈ b; −1 for a = 0."""
    return math.expm1(math.log(a / b)) if a > 0 else -1.0


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, noise_sampler: NoiseSampler = None,
) -> Tensor:
    """DPM-Solver++ SDE (stochastic two-stage, intermediate point at fraction r of the step in λ).
    The two noise draws per step are consistent Brownian increments (module docstring), or come from
    `noise_sampler(σ, σ_s)` and `noise_sampler(σ, σ_next)` (A1111's Brownian tree)."""
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, sigma, sigma, x, denoised)
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
            continue
        t = -math.log(sigma)
        h = -math.log(sigma_next) - t
        sigma_s = math.exp(-(t + h * r))
        fac = 1 / (2 * r)
        # Brownian increments over [σ → σ_s] and [σ_s → σ_next], each normalised to unit variance.
        if noise_sampler is None:
            z_1 = randn_like(x, generator)
            z_2 = randn_like(x, generator)
            a, b = sigma - sigma_s, sigma_s - sigma_next
            z_total = (a**0.5 * z_1 + b**0.5 * z_2) / (a + b) ** 0.5
        else:
            # The Brownian tree rounds its query times to 1e-6, so they must carry k-diffusion's bits: σ, σ_s and
            # σ_next as exp(−t) of t = −log σ, s = t + h·r in the schedule's dtype (float32 in A1111).
            dtype = getattr(noise_sampler, "sigma_dtype", torch.float64)
            t_, t_next_ = (-torch.tensor(v, dtype=dtype).log() for v in (sigma, sigma_next))
            noise_t, noise_s, noise_next = (float((-v).exp()) for v in (t_, t_ + (t_next_ - t_) * r, t_next_))
            z_1 = noise_sampler(noise_t, noise_s)

        # Stage 1: first-order step to σ_s (as an ancestral step with η).
        sd, su = _ancestral_step(sigma, sigma_s, eta)
        x_2 = (sd / sigma) * x - _expm1_log_ratio(sd, sigma) * denoised
        x_2 = x_2 + z_1 * s_noise * su
        denoised_2 = _denoise(denoiser, x_2, sigma_s)

        # Stage 2: full step with D extrapolated from the two evaluations.
        sd, su = _ancestral_step(sigma, sigma_next, eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / sigma) * x - _expm1_log_ratio(sd, sigma) * denoised_d
        if noise_sampler is not None:
            z_total = noise_sampler(noise_t, noise_next)
        x = x + z_total * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
) -> Tensor:
    """DPM-Solver++(2M) multistep second order (Lu et al. 2022, Algorithm 2)."""
    s = _sigma_list(sigmas)
    old_denoised: Tensor | None = None
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i])
        _report(callback, i, s[i], s[i], x, denoised)
        if s[i + 1] == 0:
            x = denoised  # the first-order step to σ = 0 lands exactly on D
        else:
            h = math.log(s[i] / s[i + 1])
            d = denoised
            if old_denoised is not None:
                r = math.log(s[i - 1] / s[i]) / h  # h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint", noise_sampler: NoiseSampler = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE: the SDE form of Lu et al. 2022's multistep solver (exact noise term, second-order
    correction from the previous D); `solver_type` "midpoint" or "heun" picks that correction's coefficient."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    s = _sigma_list(sigmas)
    old_denoised: Tensor | None = None
    h_last: float | None = None
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i])
        _report(callback, i, s[i], s[i], x, denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            eta_h = eta * h
            # Exact for the linear part and the noise; −expm1(−h − ηh) = 1 − (σ_t/σ_s) e^{−ηh}.
            x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if solver_type == "heun":
                    coef = -math.expm1(-h - eta_h) / (-h - eta_h) + 1
                else:
                    coef = 0.5 * -math.expm1(-h - eta_h)
                x = x + coef * (1 / r) * (denoised - old_denoised)
            if eta:
                noise_scale = s[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise
                z = randn_like(x, generator) if noise_sampler is None else noise_sampler(s[i], s[i + 1])
                x = x + z * noise_scale
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    eta: float = 1.0, s_noise: float = 1.0, noise_sampler: NoiseSampler = None,
) -> Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep in λ with the SDE's exact noise term."""
    s = _sigma_list(sigmas)
    denoised_1: Tensor | None = None
    denoised_2: Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i])
        _report(callback, i, s[i], s[i], x, denoised)
        h: float | None = None
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and denoised_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                noise_scale = s[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise
                z = randn_like(x, generator) if noise_sampler is None else noise_sampler(s[i], s[i + 1])
                x = x + z * noise_scale
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ------------------------------------------------------------------------------- DDPM-family (timestep) samplers
# These were written for the variance-preserving x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε; in σ-space ᾱ = 1/(1 + σ²)
# and x_t = x / sqrt(1 + σ²), so they run on any sigma schedule, including σ = 0 (ᾱ = 1) at the end.


@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
) -> Tensor:
    """Ancestral sampling with the DDPM posterior q(x_s | x_t, x0) (Ho et al. 2020, eq. 6–7, Algorithm 2):
    mean = sqrt(ᾱ_s) β/(1 − ᾱ_t) x0 + sqrt(α)(1 − ᾱ_s)/(1 − ᾱ_t) x_t, variance β̃ = (1 − ᾱ_s)/(1 − ᾱ_t) β,
    with α = ᾱ_t/ᾱ_s and β = 1 − α for the (possibly skipped) step t → s, as diffusers' DDPMScheduler."""
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, sigma, sigma, x, denoised)
        abar_t, abar_s = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        one_minus_abar_t = sigma**2 / (1 + sigma**2)  # closed forms avoid 1 − ᾱ cancellation at small σ
        one_minus_abar_s = sigma_next**2 / (1 + sigma_next**2)
        alpha = abar_t / abar_s
        beta = (sigma**2 - sigma_next**2) / (1 + sigma**2)
        x_t = x * abar_t**0.5
        mean = (abar_s**0.5 * beta / one_minus_abar_t) * denoised + (
            alpha**0.5 * one_minus_abar_s / one_minus_abar_t
        ) * x_t
        if sigma_next > 0:
            variance = one_minus_abar_s / one_minus_abar_t * beta
            mean = mean + variance**0.5 * randn_like(x, generator)
        x = mean / abar_s**0.5
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(ᾱ_s) x0 + sqrt(1 − ᾱ_s − σ_η²) ε + σ_η z with
    σ_η = η sqrt((1 − ᾱ_s)/(1 − ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_s) (eq. 16). Divided by sqrt(ᾱ_s) this is
    x_s = x0 + sqrt(σ_s² − σ'²) ε + σ' z with σ' = η σ_s sqrt(σ_t² − σ_s²)/σ_t; η = 0 is an Euler step."""
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, sigma, sigma, x, denoised)
        eps = (x - denoised) / sigma
        sigma_eta = min(sigma_next, eta * sigma_next * max(sigma**2 - sigma_next**2, 0.0) ** 0.5 / sigma)
        x = denoised + max(sigma_next**2 - sigma_eta**2, 0.0) ** 0.5 * eps
        if eta > 0 and sigma_next > 0:
            x = x + sigma_eta * randn_like(x, generator)
    return x


@torch.no_grad()
def sample_plms(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
) -> Tensor:
    """PLMS (Liu et al. 2022, PNDM; its transfer formula eq. 9 is an Euler step in σ): Adams–Bashforth on
    ε of orders 2, 3, 4 once history exists; the first step averages ε at both ends (a Heun step), as CompVis and
    diffusers (skip_prk_steps) do. N steps cost N + 1 denoiser calls."""
    s = _sigma_list(sigmas)
    history: list[Tensor] = []
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        _report(callback, i, sigma, sigma, x, denoised)
        eps = (x - denoised) / sigma
        if not history:
            e = eps
            if sigma_next > 0:
                x_pred = x + (sigma_next - sigma) * eps
                eps_next = (x_pred - _denoise(denoiser, x_pred, sigma_next)) / sigma_next
                e = (eps + eps_next) / 2
        elif len(history) == 1:
            e = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            e = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            e = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [eps])[-3:]
        x = x + (sigma_next - sigma) * e
    return x


def _unipc_coefficients(h: float, order: int, variant: str) -> tuple[float, float, list[float]]:
    """B(h), hφ₁(h) and the right-hand side b of UniPC's order conditions (Zhao et al. 2023) in data-prediction
    form (hh = −h); variant bh1 takes B(h) = hh, bh2 takes B(h) = e^hh − 1."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    factorial, b = 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, h_phi_1, b


def _solve(rks: list[float], b: list[float]) -> list[float]:
    """Solve Σ_j r_j^(k−1) ρ_j = b_k, k = 1..len(rks)."""
    R = torch.tensor([[r ** (k - 1) for r in rks] for k in range(1, len(rks) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(
    x: Tensor, sigmas: list[float], idx: list[int], outputs: list[Tensor], order: int, variant: str,
    model_t: Tensor | None,
) -> Tensor:
    """One UniP predictor step (model_t None) or UniC corrector step from σ_{idx[0]} to σ_target.

    idx = [target, source, source−1, ...]; outputs[k] is D at σ_{idx[k+1]} (newest first).
    """
    sigma_t, sigma_s0 = sigmas[idx[0]], sigmas[idx[1]]
    m0 = outputs[0]
    h = math.log(sigma_s0 / sigma_t)  # λ = −log σ
    rks, d1s = [], []
    for k in range(1, order):
        rk = math.log(sigma_s0 / sigmas[idx[k + 1]]) / h  # (λ_{s_k} − λ_{s_0}) / h
        rks.append(rk)
        d1s.append((outputs[k] - m0) / rk)
    rks.append(1.0)
    b_h, h_phi_1, b = _unipc_coefficients(h, order, variant)
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * m0
    if model_t is None:  # predictor UniP-p uses the p − 1 past differences
        if d1s:
            rhos = [0.5] if order == 2 else _solve(rks[:-1], b[:-1])
            x_t = x_t - b_h * sum(rho * d for rho, d in zip(rhos, d1s))
        return x_t
    # corrector UniC-p additionally uses D at the freshly predicted point
    rhos = [0.5] if order == 1 else _solve(rks, b)
    corr = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
    return x_t - b_h * (corr + rhos[-1] * (model_t - m0))


@torch.no_grad()
def sample_unipc(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
    order: int = 2, variant: str = "bh2", lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
) -> Tensor:
    """UniPC multistep predictor–corrector on D (Zhao et al. 2023) with diffusers' defaults (order 2, B(h) = bh2,
    lower order on the last steps). The corrector of step i reuses D(x_i), so each step costs one call.
    A step that reaches σ = 0 returns D (higher orders are undefined there, as r_k → 0)."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    outputs: list[Tensor] = []  # newest first
    last_x: Tensor | None = None
    last_order = 1
    for i in range(n):
        denoised = _denoise(denoiser, x, s[i])
        _report(callback, i, s[i], s[i], x, denoised)
        if i > 0 and last_x is not None and (i - 1) not in disable_corrector:
            idx = [i] + list(range(i - 1, i - 1 - last_order, -1))
            x = _unipc_update(last_x, s, idx, outputs, last_order, variant, denoised)
        outputs = ([denoised] + outputs)[:order]
        step_order = min(order, n - i) if lower_order_final else order
        step_order = min(step_order, i + 1)  # warm-up: only i + 1 evaluations exist
        last_x, last_order = x, step_order
        if s[i + 1] == 0:
            x = denoised
        else:
            idx = [i + 1] + list(range(i, i - step_order, -1))
            x = _unipc_update(x, s, idx, outputs, step_order, variant, None)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *, generator: Generators = None, callback: Callback = None,
) -> Tensor:
    """Multistep latent consistency sampling (Luo et al. 2023): jump to D, re-noise to the next σ.
    Use with an LCM model wrapped in denoiser.LCMDenoiser (its boundary condition)."""
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i])
        _report(callback, i, s[i], s[i], x, denoised)
        x = denoised
        if s[i + 1] > 0:
            x = x + s[i + 1] * randn_like(x, generator)
    return x


# ---------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as users name it: function, fixed options, default schedule (A1111 1.10's "Automatic"),
    and whether A1111 drops the next-to-last σ for it (computes steps + 1 levels, removes σ_{n−1})."""

    key: str
    label: str
    fn: Callable[..., Tensor]
    schedule: str = "uniform"
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    discard_penultimate_sigma: bool = False
    aliases: tuple[str, ...] = ()

    def sigmas(self, schedule: DiscreteSchedule, steps: int, schedule_name: str | None = None, **opts: float) -> Tensor:
        """The σ schedule this sampler runs for `steps` steps (its default schedule unless one is named)."""
        automatic = schedule_name is None or schedule_name.strip().lower() in ("", "automatic")
        name = self.schedule if automatic else resolve_schedule(schedule_name)
        if self.discard_penultimate_sigma:
            full = get_sigmas(name, schedule, steps + 1, **opts)
            return torch.cat([full[:-2], full[-1:]])
        return get_sigmas(name, schedule, steps, **opts)

    def __call__(self, denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, **kwargs: Any) -> Tensor:
        return self.fn(denoiser, x, sigmas, **{**self.options, **kwargs})


def _spec(key: str, label: str, fn: Callable[..., Tensor], schedule: str = "uniform", *, discard: bool = False,
          aliases: tuple[str, ...] = (), **options: Any) -> SamplerSpec:
    return SamplerSpec(key, label, fn, schedule, MappingProxyType(options), discard, aliases)


# Default schedules follow A1111 1.10 ("Automatic"). DDIM, PLMS and DDPM default to the CompVis/A1111 timesteps
# (ddim_uniform) but, like every schedule here, end at σ = 0 where diffusers' set_alpha_to_one=False stops at σ_min;
# pass sigmas ending in σ_min to reproduce that. UniPC defaults to sgm_uniform, the unrounded form of diffusers'
# "linspace" spacing; LCM to diffusers' LCM timesteps.
SAMPLERS: dict[str, SamplerSpec] = {
    spec.key: spec
    for spec in [
        _spec("euler_a", "Euler a", sample_euler_ancestral, aliases=("euler_ancestral", "k_euler_ancestral")),
        _spec("euler", "Euler", sample_euler),
        _spec("lms", "LMS", sample_lms),
        _spec("heun", "Heun", sample_heun),
        _spec("dpm_2", "DPM2", sample_dpm_2, "karras", discard=True, aliases=("dpm2",)),
        _spec("dpm_2_a", "DPM2 a", sample_dpm_2_ancestral, "karras", discard=True,
              aliases=("dpm2_a", "dpm_2_ancestral")),
        _spec("dpmpp_2s_a", "DPM++ 2S a", sample_dpmpp_2s_ancestral, "karras", aliases=("dpmpp_2s_ancestral",)),
        _spec("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, "karras"),
        _spec("dpmpp_sde", "DPM++ SDE", sample_dpmpp_sde, "karras"),
        _spec("dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m_sde, "exponential"),
        _spec("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", sample_dpmpp_2m_sde, "exponential", solver_type="heun"),
        _spec("dpmpp_3m_sde", "DPM++ 3M SDE", sample_dpmpp_3m_sde, "exponential", discard=True),
        _spec("ddim", "DDIM", sample_ddim, "ddim_uniform"),
        _spec("plms", "PLMS", sample_plms, "ddim_uniform"),
        _spec("unipc", "UniPC", sample_unipc, "sgm_uniform"),
        _spec("lcm", "LCM", sample_lcm, "lcm"),
        _spec("ddpm", "DDPM", sample_ddpm, "ddim_uniform"),
    ]
}

_SUFFIXES = {"karras": ("Karras", "ka"), "exponential": ("Exponential", "exp")}


def _normalize(name: str) -> str:
    # "DPM++ 2M Karras" -> "dpmpp_2m_karras": A1111 labels and snake_case ids meet in one spelling.
    return "_".join(name.strip().lower().replace("++", "pp").replace("-", " ").replace("_", " ").split())


def _build_lookup() -> dict[str, SamplerSpec]:
    lookup: dict[str, SamplerSpec] = {}
    for spec in SAMPLERS.values():
        bases = {spec.key, _normalize(spec.label), *spec.aliases}
        for base in list(bases):
            lookup[base] = lookup["k_" + base] = spec
        for schedule, (word, short) in _SUFFIXES.items():
            variant = replace(spec, schedule=schedule, label=f"{spec.label} {word}")
            for base in bases:
                for name in (f"{base}_{schedule}", f"k_{base}_{schedule}", f"k_{base}_{short}", f"{base}_{short}"):
                    lookup[name] = variant
    return lookup


_LOOKUP = _build_lookup()


def sampler_names() -> list[str]:
    """The A1111 labels accepted (each also with " Karras" / " Exponential")."""
    return [spec.label for spec in SAMPLERS.values()]


def resolve_sampler(name: str) -> SamplerSpec:
    """Spec for an A1111 label ("Euler a", "DPM++ 2M Karras"), a snake id ("euler_a", "dpmpp_2m_karras") or a
    k-diffusion alias ("k_euler_a", "k_dpmpp_2m_ka"). Raises ValueError listing the valid labels."""
    spec = _LOOKUP.get(_normalize(name))
    if spec is None:
        valid = ", ".join(sampler_names())
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {valid} (optionally + ' Karras'/' Exponential')")
    return spec
