"""A1111's per-image noise: the seed's first draw, blended with a variation seed's draw (slerp), optionally drawn at
another size and placed centred ("Seed resize from"), then the generators that feed the sampler's fresh noise
(reseeded with seed + ENSD, "eta noise seed delta", when one is set)."""
from __future__ import annotations

from typing import Sequence

import torch

from .rng import create_generator, draw, randn

LATENT_SCALE = 8


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two (C, H, W) noises: the vectors are the columns along dim 1 (height),
    each normalised; for ω = acos(<low, high>) the result is sin((1 − s)ω)/sin ω · low + sin(sω)/sin ω · high.
    When the columns are nearly parallel (mean cosine > 0.9995) A1111 falls back to s·low + (1 − s)·high."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    return ((torch.sin((1.0 - strength) * omega) / sin_omega).unsqueeze(1) * low
            + (torch.sin(strength * omega) / sin_omega).unsqueeze(1) * high)


def place_centered(target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`noise` (C, h, w) copied into the centre of `target` (C, H, W): cropped where larger, the rest of
    `target` kept where smaller (A1111's "Seed resize from")."""
    dx = (target.shape[2] - noise.shape[2]) // 2
    dy = (target.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out = target.clone()
    out[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return out


class ImageNoise:
    """The noise of one batch, as A1111's ImageRNG: `first()` is the starting noise (B, C, H, W); afterwards
    `generators` (one per image) give the sampler's fresh noise, each continuing its seed's stream, or a
    fresh stream seeded seed + `ensd` when `ensd` is set.

    `subseeds`/`subseed_strength`: variation seeds and their weight; `resize_from` (width, height) in pixels:
    the size the seed's noise is drawn at (0 or None: the image size)."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], source: str = "cpu",
                 subseeds: Sequence[int] | None = None, subseed_strength: float = 0.0,
                 resize_from: tuple[int, int] | None = None, ensd: int = 0):
        self.shape, self.seeds, self.source = tuple(shape), list(seeds), source
        self.subseeds, self.subseed_strength = subseeds, subseed_strength
        self.resize_from, self.ensd = resize_from, ensd
        self.generators = [create_generator(source, seed) for seed in self.seeds]

    def first(self) -> torch.Tensor:
        channels, height, width = self.shape
        noise_shape = self.shape
        if self.resize_from and self.resize_from[0] > 0 and self.resize_from[1] > 0:
            noise_shape = (channels, self.resize_from[1] // LATENT_SCALE, self.resize_from[0] // LATENT_SCALE)
        out = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            variation = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                variation = randn(self.source, subseed, noise_shape)
            # The image's own generator makes the first draw at the image size in both cases, so that the
            # sampler's later draws continue after it.
            if noise_shape != self.shape:
                noise = randn(self.source, seed, noise_shape)
            else:
                noise = draw(generator, self.shape)
            if variation is not None:
                noise = slerp(self.subseed_strength, noise, variation)
            if noise_shape != self.shape:
                noise = place_centered(draw(generator, self.shape), noise)
            out.append(noise)
        if self.ensd:
            self.generators = [create_generator(self.source, seed + self.ensd) for seed in self.seeds]
        return torch.stack(out)
