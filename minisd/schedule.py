"""The discrete DDPM noise schedule of Stable Diffusion (Ho et al. 2020, eq. 4) seen as noise levels
σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) (Karras et al. 2022), the σ ↔ t maps, and the sigma schedules samplers walk.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# The config dataclass lives with the other model configs; re-exported here for schedule users.
from .config import ScheduleConfig

__all__ = [
    "ScheduleConfig",
    "DiscreteSchedule",
    "make_betas",
    "get_sigmas",
    "get_sigmas_uniform",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "get_sigmas_polyexponential",
    "get_sigmas_sgm_uniform",
    "get_sigmas_simple",
    "get_sigmas_ddim_uniform",
    "get_sigmas_normal",
    "get_sigmas_lcm",
    "SCHEDULES",
    "resolve_schedule",
    "img2img_sigmas",
]


def make_betas(config: ScheduleConfig) -> Tensor:
    """β_1..β_T in float64, as the original LDM code builds them (before its float32 buffers)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        # Linear in sqrt(β): LDM's "linear" schedule, called "scaled_linear" by diffusers.
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}; valid: 'scaled_linear', 'linear'")


class DiscreteSchedule:
    """ᾱ_t and σ_t of the T training timesteps, with log-σ interpolation between them.

    `sigmas[t]` ascends with t (index 0 is the least noisy level). All tables are float64 on CPU.
    """

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon") -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        self.alphas_cumprod = ac
        self.prediction_type = prediction_type
        # Eq. 4: x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε; dividing by sqrt(ᾱ) gives x0 + σ ε with this σ.
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_config(cls, config: ScheduleConfig | None = None) -> "DiscreteSchedule":
        """Builds ᾱ_t = Π_{s≤t} (1 − β_s) from a config (default: SD 1.x)."""
        config = ScheduleConfig() if config is None else config
        alphas_cumprod = torch.cumprod(1.0 - make_betas(config), dim=0)
        return cls(alphas_cumprod, config.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _tables(self, like: Tensor) -> Tensor:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return self.log_sigmas.to(like.device, dtype)

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Continuous timestep t of a noise level σ: linear in log σ between neighbouring discrete
        levels (clamped to [0, T−1]); `quantize` rounds to the nearest discrete level in log σ."""
        sigma = torch.as_tensor(sigma)
        if not sigma.is_floating_point() or sigma.dtype in (torch.float16, torch.bfloat16):
            sigma = sigma.float()
        log_sigmas = self._tables(sigma)
        log_sigma = sigma.to(log_sigmas.dtype).log()
        if quantize:
            return (log_sigma.reshape(-1, 1) - log_sigmas).abs().argmin(dim=1).view(sigma.shape).to(log_sigmas.dtype)
        # Index of the last level at or below σ, kept inside [0, T−2] so that low + 1 exists.
        low = torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous(), right=True) - 1
        low = low.clamp(0, log_sigmas.shape[0] - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        return (low.to(w.dtype) + w).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Noise level of a (fractional) timestep: log-linear interpolation of the discrete σ_t."""
        t = torch.as_tensor(t)
        if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
            t = t.to(torch.float64 if t.device.type == "cpu" else torch.float32)
        log_sigmas = self._tables(t)
        t = t.to(log_sigmas.dtype).clamp(0, log_sigmas.shape[0] - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_steps(steps: int) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _range(schedule: DiscreteSchedule, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
    hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
    return lo, hi


def get_sigmas_uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """`steps` noise levels evenly spaced in t from T−1 down to 0 (k-diffusion's DiscreteSchedule.get_sigmas),
    then 0."""
    _check_steps(steps)
    t = torch.linspace(schedule.num_train_timesteps - 1, 0, steps, dtype=torch.float64)
    return _append_zero(schedule.t_to_sigma(t))


def get_sigmas_karras(
    schedule: DiscreteSchedule,
    steps: int,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0."""
    _check_steps(steps)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv, max_inv = lo ** (1 / rho), hi ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def get_sigmas_exponential(
    schedule: DiscreteSchedule, steps: int, *, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """Noise levels evenly spaced in log σ from σ_max to σ_min, then 0."""
    _check_steps(steps)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64).exp())


def get_sigmas_polyexponential(
    schedule: DiscreteSchedule,
    steps: int,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 1.0,
) -> Tensor:
    """log σ a polynomial of degree ρ in the step position: log σ = r^ρ (log σ_max − log σ_min) + log σ_min
    with r going 1 → 0 (ρ = 1 is the exponential schedule), then 0."""
    _check_steps(steps)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    return _append_zero((ramp * (math.log(hi) - math.log(lo)) + math.log(lo)).exp())


def _timestep_linspace(schedule: DiscreteSchedule, count: int, drop_last: bool) -> Tensor:
    t_max = schedule.num_train_timesteps - 1
    if drop_last:
        return torch.linspace(t_max, 0, count + 1, dtype=torch.float64)[:-1]
    return torch.linspace(t_max, 0, count, dtype=torch.float64)


def get_sigmas_normal(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """ComfyUI "normal": σ at `steps` timesteps evenly spaced from t(σ_max) = T−1 to t(σ_min) = 0, then 0.
    (For SD's discrete schedule this is the same grid as "uniform".)"""
    _check_steps(steps)
    return _append_zero(schedule.t_to_sigma(_timestep_linspace(schedule, steps, drop_last=False)))


def get_sigmas_sgm_uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """ComfyUI "sgm_uniform": `steps + 1` timesteps evenly spaced from T−1 to 0 with the last (t = 0)
    dropped, i.e. the spacing SGM/SDXL code uses, then 0."""
    _check_steps(steps)
    return _append_zero(schedule.t_to_sigma(_timestep_linspace(schedule, steps, drop_last=True)))


def get_sigmas_simple(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """ComfyUI "simple": walk the T discrete levels from the top with stride T/steps (truncated), then 0."""
    _check_steps(steps)
    stride = schedule.num_train_timesteps / steps
    index = [schedule.num_train_timesteps - 1 - int(i * stride) for i in range(steps)]
    return _append_zero(schedule.sigmas[index])


def get_sigmas_ddim_uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """ComfyUI "ddim_uniform" (= the timesteps of CompVis/A1111 DDIM and of diffusers' "leading" spacing with
    steps_offset=1): t = 1, 1 + c, 1 + 2c, ... < T with c = T // steps, descending, then 0.

    When `steps` does not divide T this yields more than `steps` levels, exactly as those implementations do.
    """
    _check_steps(steps)
    stride = max(schedule.num_train_timesteps // steps, 1)
    index = list(range(1, schedule.num_train_timesteps, stride))[::-1]
    return _append_zero(schedule.sigmas[index])


def get_sigmas_lcm(schedule: DiscreteSchedule, steps: int, *, original_steps: int = 50) -> Tensor:
    """Latent Consistency Model timesteps (Luo et al. 2023) as diffusers' LCMScheduler picks them: of the
    `original_steps` distillation timesteps k·c − 1 (c = T // original_steps), take `steps` evenly spaced
    from the top (floor of a linspace over indices), then 0."""
    _check_steps(steps)
    if steps > original_steps:
        raise ValueError(f"LCM supports at most original_steps={original_steps} steps, got {steps}")
    c = schedule.num_train_timesteps // original_steps
    origin = [k * c - 1 for k in range(original_steps, 0, -1)]  # descending
    index = [math.floor(i * original_steps / steps) for i in range(steps)]
    return _append_zero(schedule.sigmas[[origin[i] for i in index]])


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "uniform": get_sigmas_uniform,
    "karras": get_sigmas_karras,
    "exponential": get_sigmas_exponential,
    "polyexponential": get_sigmas_polyexponential,
    "sgm_uniform": get_sigmas_sgm_uniform,
    "simple": get_sigmas_simple,
    "ddim_uniform": get_sigmas_ddim_uniform,
    "normal": get_sigmas_normal,
    "lcm": get_sigmas_lcm,
}

# A1111's "Schedule type" labels and a few spellings people use.
_SCHEDULE_ALIASES = {"ddim": "ddim_uniform", "sgmuniform": "sgm_uniform", "automatic_uniform": "uniform"}


def resolve_schedule(name: str) -> str:
    """Canonical schedule name for a name or A1111 label ("Karras", "SGM Uniform", "DDIM", ...)."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = _SCHEDULE_ALIASES.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    return key


def get_sigmas(name: str, schedule: DiscreteSchedule, steps: int, **options: float) -> Tensor:
    """Sigma schedule `name` for `steps` sampling steps: descending float64 CPU tensor ending in 0."""
    return SCHEDULES[resolve_schedule(name)](schedule, steps, **options)


def img2img_sigmas(
    sigmas_for: Callable[[int], Tensor], steps: int, strength: float, *, fix_steps: bool = False
) -> Tensor:
    """The tail of a schedule that img2img samples along, by A1111's rule (sd_samplers_common.setup_img2img_steps
    and KDiffusionSampler.sample_img2img).

    With s = min(strength, 0.999):
    - default: build the full `steps`-step schedule and run its last t_enc + 1 steps, t_enc = int(s · steps);
      that is `sigmas[steps − t_enc − 1:]`.
    - fix_steps (A1111's "img2img_fix_steps" option): build a schedule of int(steps / s) steps and run exactly
      `steps` of them (t_enc = steps − 1).
    The init latent is then noised to the first returned σ: x = x0 + noise · sigmas[0].
    `sigmas_for(n)` must return an n-step schedule (n + 1 values ending in 0).
    """
    _check_steps(steps)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    s = min(strength, 0.999)
    if fix_steps:
        if strength <= 0:
            raise ValueError("strength must be > 0 with fix_steps")
        total, t_enc = int(steps / s), steps - 1
    else:
        total, t_enc = steps, int(s * steps)
    sigmas = sigmas_for(total)
    return sigmas[total - t_enc - 1 :]
