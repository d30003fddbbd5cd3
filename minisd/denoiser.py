"""Denoisers D(x, σ) ≈ E[x0 | x0 + σ ε = x] built from an ε- or v-predicting UNet (Karras et al. 2022, Table 1
preconditioning), classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023, §3.4),
and the LCM boundary condition (Luo et al. 2023).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import Tensor

from .schedule import DiscreteSchedule

__all__ = [
    "Denoiser",
    "UNetFn",
    "EpsDenoiser",
    "VDenoiser",
    "make_denoiser",
    "CFGDenoiser",
    "guidance_interval",
    "LCMDenoiser",
    "RefinerSwitch",
    "rescale_guidance",
]

# unet(x: (B, C, h, w), t: (B,) float timesteps, context: (B, L, D)) -> ε or v, (B, 4, h, w)
UNetFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class Denoiser(Protocol):
    """What every sampler calls: D(x, σ) -> predicted x0, σ of shape (B,) (a scalar is broadcast)."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


def _batch_sigma(x: Tensor, sigma: Tensor | float) -> Tensor:
    """σ as a (B,) tensor on x's device, at least float32 even for half-precision x."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma = torch.as_tensor(sigma, device=x.device).to(dtype)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


def _dims(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) to broadcast a per-sample scalar over x, in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class _UNetDenoiser:
    """Shared part of the ε and v wrappers: input scaling, σ → t, optional extra input channels."""

    prediction_type = "epsilon"

    def __init__(self, unet: UNetFn, schedule: DiscreteSchedule, *, quantize: bool = False) -> None:
        self.unet = unet
        self.schedule = schedule
        self.quantize = quantize

    def model_output(
        self, x: Tensor, sigma: Tensor, context: Tensor | None = None, concat: Tensor | None = None
    ) -> Tensor:
        """Raw UNet output (ε or v) at noise level σ for the σ-space sample x = x0 + σ ε."""
        sigma = _batch_sigma(x, sigma)
        # c_in = 1/sqrt(σ² + 1) maps x0 + σ ε back to the model's training input sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε.
        x_in = x * _dims((sigma**2 + 1).rsqrt(), x)
        if concat is not None:
            # Inpainting / depth models: extra conditioning channels join unscaled, as in LDM's c_concat.
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize)
        return self.unet(x_in, t, context)

    def output_to_denoised(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError

    def denoised_to_output(self, x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(
        self, x: Tensor, sigma: Tensor | float, context: Tensor | None = None, concat: Tensor | None = None
    ) -> Tensor:
        sigma = _batch_sigma(x, sigma)
        return self.output_to_denoised(x, sigma, self.model_output(x, sigma, context, concat))


class EpsDenoiser(_UNetDenoiser):
    """ε-prediction UNet (SD 1.x, SD 2.x base): D(x, σ) = x − σ ε(x / sqrt(σ² + 1), t(σ))."""

    prediction_type = "epsilon"

    def output_to_denoised(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        return x - _dims(sigma, x) * out.to(x.dtype)

    def denoised_to_output(self, x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
        return (x - denoised) / _dims(sigma, x)


class VDenoiser(_UNetDenoiser):
    """v-prediction UNet (SD 2.x 768, Salimans & Ho 2022): v = α ε − s x0 with α = 1/sqrt(1 + σ²),
    s = σ/sqrt(1 + σ²), so D(x, σ) = x/(σ² + 1) − σ/sqrt(σ² + 1) · v."""

    prediction_type = "v_prediction"

    def output_to_denoised(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        c_skip = _dims(1 / (sigma**2 + 1), x)
        c_out = _dims(-sigma * (sigma**2 + 1).rsqrt(), x)
        return x * c_skip + out.to(x.dtype) * c_out

    def denoised_to_output(self, x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
        s = _dims(sigma, x)
        eps = (x - denoised) / s
        return (eps - s * denoised) * _dims((sigma**2 + 1).rsqrt(), x)


def make_denoiser(unet: UNetFn, schedule: DiscreteSchedule, *, quantize: bool = False) -> _UNetDenoiser:
    """The wrapper matching `schedule.prediction_type`."""
    cls = VDenoiser if schedule.prediction_type == "v_prediction" else EpsDenoiser
    return cls(unet, schedule, quantize=quantize)


def rescale_guidance(guided: Tensor, positive: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, §3.4: scale the guided prediction to the per-sample std of the conditional one,
    then blend: φ · guided · std(pos)/std(guided) + (1 − φ) · guided."""
    dims = list(range(1, guided.ndim))
    factor = positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (phi * factor + (1 - phi))


class CFGDenoiser:
    """Classifier-free guidance: D = D_u + s (D_c − D_u), cond and uncond in one batched UNet call.

    `model` is an EpsDenoiser/VDenoiser (anything with the call signature model(x, σ, context, concat)).
    cond/uncond are (B, L, D) or (1, L, D) text embeddings (SDXL: dicts {"context": ..., "y": (B or 1, adm)});
    `concat` optional extra input channels (B, c, h, w) shared by both halves. With scale 1 the uncond pass is
    skipped, with scale 0 (no rescale) the cond pass is: the same results from one UNet pass. For 0 < s < 1
    both passes are needed (D depends on both).
    Guidance rescale (φ = `rescale`) acts on the model's own output space (ε or v), as diffusers does.
    When cond and uncond differ in length (prompts of different chunk counts), or with `sequential` (half
    the activation memory for low-memory machines), cond and uncond take two UNet calls.
    `interval` = (σ_lo, σ_hi) guides only the calls at σ_lo < σ ≤ σ_hi (the guidance interval of Kynkäänniemi
    et al. 2024); elsewhere D = D_c, one UNet pass on the prompt alone (`guidance_interval` makes it from
    fractions of the steps).
    """

    def __init__(
        self,
        model: _UNetDenoiser,
        cond: Tensor,
        uncond: Tensor | None,
        scale: float,
        *,
        rescale: float = 0.0,
        concat: Tensor | None = None,
        sequential: bool = False,
        interval: tuple[float, float] | None = None,
    ) -> None:
        self.model = model
        self.interval = interval
        self.sequential = sequential
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self.rescale = float(rescale)
        self.concat = concat

    def _ctx(self, ctx: Tensor | dict, batch: int) -> Tensor | dict:
        if isinstance(ctx, dict):  # SDXL: {"context": (B, L, D), "y": (B, adm)}
            return {k: self._ctx(v, batch) for k, v in ctx.items()}
        return ctx.expand(batch, *ctx.shape[1:]) if ctx.shape[0] == 1 and batch != 1 else ctx

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = _batch_sigma(x, sigma)
        b = x.shape[0]
        cond = self._ctx(self.cond, b)
        # D_u + s (D_c − D_u) needs one pass at s = 1 (D_c; a rescale of D_c to its own std is the identity)
        # and at s = 0 without rescale (D_u): the Turbo/Lightning models' settings run at half the cost.
        if self.uncond is None or self.scale == 1.0:
            return self.model(x, sigma, cond, self.concat)
        if self.scale == 0.0 and self.rescale == 0.0:
            return self.model(x, sigma, self._ctx(self.uncond, b), self.concat)
        if self.interval is not None and not _inside(float(sigma[0]), self.interval):
            return self.model(x, sigma, cond, self.concat)
        uncond = self._ctx(self.uncond, b)
        if _same_shape(cond, uncond) and not self.sequential:
            concat = None if self.concat is None else torch.cat([self.concat, self.concat])
            both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), _cat(cond, uncond), concat)
            d_cond, d_uncond = both[:b], both[b:]
        else:
            d_cond = self.model(x, sigma, cond, self.concat)
            d_uncond = self.model(x, sigma, uncond, self.concat)
        # Guidance ε̃ = ε_u + s (ε_c − ε_u) is affine in ε, so the same combination holds for D = x − σ ε.
        guided = d_uncond + self.scale * (d_cond - d_uncond)
        if self.rescale == 0.0:
            return guided
        to_out, from_out = self.model.denoised_to_output, self.model.output_to_denoised
        out = rescale_guidance(to_out(x, sigma, guided), to_out(x, sigma, d_cond), self.rescale)
        return from_out(x, sigma, out)


def _same_shape(a: Tensor | dict, b: Tensor | dict) -> bool:
    if isinstance(a, dict):
        return all(a[k].shape[1:] == b[k].shape[1:] for k in a)
    return a.shape[1:] == b.shape[1:]


def _cat(a: Tensor | dict, b: Tensor | dict) -> Tensor | dict:
    """cond and uncond as one batch (tensors or SDXL's dicts of tensors)."""
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


# Relative slack of the interval's ends: samplers pass σ as float32 or recompute it through log σ.
_SIGMA_SLACK = 1e-5


def _inside(sigma: float, interval: tuple[float, float]) -> bool:
    low, high = interval
    return low * (1 + _SIGMA_SLACK) < sigma <= high * (1 + _SIGMA_SLACK)


def guidance_interval(sigmas: Tensor | list[float], start: float, end: float) -> tuple[float, float]:
    """The σ interval of `CFGDenoiser(interval=...)` that guides the steps i (0-based, of N = len(sigmas) − 1)
    with start ≤ i/N < end: (σ_⌈end·N⌉, σ_⌈start·N⌉], σ_N being 0. One-evaluation samplers (Euler, DPM++ 2M,
    ...) are then guided on exactly those steps; a multi-evaluation sampler's inner calls (Heun's second one at
    σ_(i+1), ...) are guided when their σ lies in the interval."""
    s = [float(v) for v in torch.as_tensor(sigmas).reshape(-1).tolist()]
    n = len(s) - 1
    first, stop = (min(n, max(0, math.ceil(f * n - 1e-9))) for f in (start, end))
    if first >= stop:
        return (s[first], s[first])  # no step guided: the interval is empty
    return (s[stop], s[first])


class RefinerSwitch:
    """A1111's "Refiner, switch at" (and diffusers' denoising_end/denoising_start): the base model's denoiser
    while (999 − t(σ))/1000 < `switch_at`, t the nearest discrete timestep, and the refiner's from there on; with
    diffusers' rounding, switch 0.8 hands the timesteps t ≤ 199 to the refiner."""

    def __init__(self, base: Callable[[Tensor, Tensor], Tensor], refiner: Callable[[Tensor, Tensor], Tensor],
                 schedule: DiscreteSchedule, switch_at: float) -> None:
        self.base, self.refiner, self.schedule, self.switch_at = base, refiner, schedule, switch_at

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        t = float(self.schedule.sigma_to_t(_batch_sigma(x, sigma).max(), quantize=True))
        completed = (self.schedule.num_train_timesteps - 1 - t) / self.schedule.num_train_timesteps
        return (self.refiner if completed >= self.switch_at else self.base)(x, sigma)


class LCMDenoiser:
    """Latent Consistency Model boundary condition (Luo et al. 2023, as diffusers' LCMScheduler applies it):
    f(x, t) = c_skip(t) x_t + c_out(t) x̂0 with c_skip = σ_d²/((k t)² + σ_d²), c_out = k t/sqrt((k t)² + σ_d²),
    σ_d = 0.5, k = `timestep_scaling`, x_t = x/sqrt(σ² + 1) the model-space sample. Wraps any denoiser."""

    def __init__(
        self,
        inner: Callable[[Tensor, Tensor], Tensor],
        schedule: DiscreteSchedule,
        *,
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
    ) -> None:
        self.inner = inner
        self.schedule = schedule
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = _batch_sigma(x, sigma)
        scaled_t = self.schedule.sigma_to_t(sigma) * self.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled_t**2 + self.sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + self.sigma_data**2).sqrt()
        x_t = x * _dims((sigma**2 + 1).rsqrt(), x)
        return _dims(c_out, x) * self.inner(x, sigma) + _dims(c_skip, x) * x_t
