"""σ schedules with A1111's float32 bits: the model's σ table from float32 ᾱ, and k-diffusion's Uniform ("Automatic"
of the k-samplers), Karras and Exponential schedules evaluated in float32. The SDE samplers need these exact bits:
their Brownian tree rounds its query times to 1e-6, and a float64-then-rounded schedule lands on a neighbouring
point at about a third of the steps."""
from __future__ import annotations

import math

import torch

from .schedule import DiscreteSchedule, resolve_schedule

A1111_FLOAT32_SCHEDULES = ("uniform", "karras", "exponential")


def model_sigmas(schedule: DiscreteSchedule) -> torch.Tensor:
    """k-diffusion's CompVisDenoiser table: sqrt((1 − ᾱ)/ᾱ) of the model's float32 ᾱ buffer, in float32."""
    alphas_cumprod = schedule.alphas_cumprod.float()
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _uniform(table: torch.Tensor, steps: int) -> torch.Tensor:
    """DiscreteSchedule.get_sigmas: t evenly spaced from T − 1 to 0, log σ interpolated linearly in t."""
    t = torch.linspace(len(table) - 1, 0, steps)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigmas = table.log()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def a1111_sigmas(schedule: DiscreteSchedule, name: str, steps: int, *, discard_penultimate: bool = False,
                 sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None
                 ) -> torch.Tensor:
    """The float32 schedule A1111 samples along (ending in 0), for the schedules in A1111_FLOAT32_SCHEDULES."""
    name = resolve_schedule(name)
    table = model_sigmas(schedule)
    lo = table[0].item() if sigma_min is None else sigma_min
    hi = table[-1].item() if sigma_max is None else sigma_max
    n = steps + 1 if discard_penultimate else steps
    if name == "uniform":
        sigmas = _uniform(table, n)
    elif name == "karras":
        rho = 7.0 if rho is None else rho
        ramp = torch.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = lo ** (1 / rho), hi ** (1 / rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    elif name == "exponential":
        sigmas = torch.linspace(math.log(hi), math.log(lo), n).exp()
    else:
        raise ValueError(f"no float32 A1111 form of the {name} schedule")
    sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard_penultimate else sigmas
