"""`minisd explain noising IMAGE`: the forward process in closed form, q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
(Ho et al. 2020, eq. 4), applied to the image's latent at chosen timesteps: each frame decoded to pixels and
as its 4 raw channels, with ᾱ_t and the signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) under it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import ParameterError
from . import Explanation
from .drawing import labelled_grid
from .latents import channel_images, decode, encode_image

DEFAULT_TIMESTEPS = (0, 100, 250, 500, 750, 999)


@dataclass
class NoisedLatent:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε at timestep t, and its signal-to-noise ratio: the schedule's
    ᾱ/(1 − ᾱ) (for unit-variance x_0, which the scaling factor aims at) and the one measured on this draw,
    var(√ᾱ x_0) / var(√(1 − ᾱ) ε)."""
    t: int
    alpha_bar: float
    snr: float
    measured_snr: float
    latent: torch.Tensor  # (4, h, w)


def noise_latent(x0: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps, noise: torch.Tensor
                 ) -> list[NoisedLatent]:
    """The closed-form forward process (eq. 4) of the scaled latent x0 (any shape, e.g. (4, h, w)) at each
    timestep, all with the same ε (so the frames differ only by t)."""
    frames = []
    for t in timesteps:
        if not 0 <= t < len(alphas_cumprod):
            raise ParameterError(f"timestep {t} is outside 0..{len(alphas_cumprod) - 1}")
        a = float(alphas_cumprod[t])
        signal, noise_part = a**0.5 * x0, (1 - a) ** 0.5 * noise
        measured = float(signal.var() / noise_part.var())
        frames.append(NoisedLatent(t, a, a / (1 - a), measured, signal + noise_part))
    return frames


def snr_text(value: float) -> str:
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2e}"


def explain_noising(sd, image: Image.Image, *, timesteps=DEFAULT_TIMESTEPS, seed: int = 0,
                    width: int | None = None, height: int | None = None, cell: int = 96,
                    animate: bool = False, animation_timesteps=None) -> Explanation:
    """The frames of q(x_t | x_0) for `timesteps`; with `animate`, also an animation that walks
    `animation_timesteps` (default: every 50th)."""
    image, x0 = encode_image(sd, image, width, height)
    schedule = sd.schedule
    noise = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed))
    frames = noise_latent(x0[0], schedule.alphas_cumprod, timesteps, noise)
    # x_t is decoded as it is: the image the VAE would give for the model's input at that t.
    pixels = decode(sd, torch.stack([f.latent for f in frames]))
    columns = [[pixel, *channel_images(f.latent)] for pixel, f in zip(pixels, frames)]
    rows = [list(r) for r in zip(*columns)]
    captions = [[""] * len(frames) for _ in rows]
    captions[-1] = [f"t = {f.t}\nᾱ = {f.alpha_bar:.4f}\nSNR {snr_text(f.snr)}\nmeasured {snr_text(f.measured_snr)}"
                    for f in frames]
    h, w = x0.shape[-2:]
    variance = float(x0.var())
    picture = labelled_grid(rows, captions=captions, cell=cell,
                            row_labels=["decoded", "channel 0", "channel 1", "channel 2", "channel 3"],
                            title="forward process q(x_t | x_0): x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, one ε for all t\n"
                                  f"SNR = ᾱ_t / (1 − ᾱ_t) for unit-variance latents; measured: var(√ᾱ_t x_0) / "
                                  f"var(√(1 − ᾱ_t) ε)\nthis image's latent (4×{h}×{w}) has variance {variance:.2f}")
    animation = []
    steps = list(range(0, len(schedule.alphas_cumprod), 50)) + [len(schedule.alphas_cumprod) - 1] \
        if animation_timesteps is None else list(animation_timesteps)
    moving = noise_latent(x0[0], schedule.alphas_cumprod, steps if animate else [], noise)
    for pixel, f in zip(decode(sd, torch.stack([f.latent for f in moving])) if moving else [], moving):
        grid = labelled_grid([[pixel], channel_images(f.latent)], cell=cell, captions=[
            [f"t = {f.t}   ᾱ = {f.alpha_bar:.4f}   SNR = {snr_text(f.snr)}"], [""] * 4])
        animation.append(grid)
    facts = {"timesteps": [f.t for f in frames], "alpha_bar": [f.alpha_bar for f in frames],
             "snr": [f.snr for f in frames], "measured_snr": [f.measured_snr for f in frames]}
    return Explanation(picture, animation, facts)


