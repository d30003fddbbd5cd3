"""Low-memory VAE decode and encode for large images, computed in bands of rows. An untiled decode keeps
several full-resolution feature maps alive at once (a layer's input, its normalised and activated copies, the
convolution's output, the up-sampled input of the next level). Here each convolution reads its input band by
band, with one halo row above and below, and applies the GroupNorm, SiLU and up-sampling in front of it on the
band only, so a ResNet block holds just its input, its hidden map and its output. GroupNorm statistics are
reduced over the whole image first, so the result equals the untiled pass (no tile seams at all); the mid
block, whose attention is global, runs as usual at latent resolution."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models.vae import AutoencoderKL, Downsample, Level, ResnetBlock

Prologue = Callable[[torch.Tensor], torch.Tensor]


def group_statistics(norm: nn.GroupNorm, x: torch.Tensor, band: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and variance of x, reduced band by band in float64."""
    b, c, h, _ = x.shape
    total = torch.zeros(b, norm.num_groups, dtype=torch.float64, device=x.device)
    square = torch.zeros_like(total)
    for r in range(0, h, band):
        part = x[:, :, r:r + band].double().reshape(b, norm.num_groups, -1)
        total += part.sum(-1)
        square += part.square().sum(-1)
    count = c // norm.num_groups * x.shape[2] * x.shape[3]
    mean = total / count
    return mean, (square / count - mean.square()).clamp_min(0)


def norm_silu(norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> Prologue:
    """SiLU(GroupNorm(x)) of a band of rows, with the whole image's statistics."""
    mean, var = (s.to(dtype) for s in stats)
    rstd = torch.rsqrt(var + norm.eps)

    def apply(band: torch.Tensor) -> torch.Tensor:
        b, c = band.shape[:2]
        grouped = band.reshape(b, norm.num_groups, -1, *band.shape[2:])
        y = ((grouped - mean[:, :, None, None, None]) * rstd[:, :, None, None, None]).reshape_as(band)
        return F.silu(y * norm.weight[:, None, None] + norm.bias[:, None, None])

    return apply


def banded_conv(conv: nn.Conv2d, x: torch.Tensor, band: int, prologue: Prologue | None = None,
                upsample: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """conv(prologue(x)) — of nearest-up-sampled x if `upsample` — for a 3×3 (padding 1) or 1×1 convolution,
    written band by band into `out` (added to it when given: the residual connection)."""
    scale = 2 if upsample else 1
    height, width = x.shape[2] * scale, x.shape[3] * scale
    halo = conv.kernel_size[0] // 2
    result = out if out is not None else torch.empty(x.shape[0], conv.out_channels, height, width,
                                                     dtype=x.dtype, device=x.device)
    for r0 in range(0, height, band):
        r1 = min(r0 + band, height)
        lo, hi = max(r0 - halo, 0), min(r1 + halo, height)       # rows of the (up-sampled) input
        slab = x[:, :, lo // scale:(hi - 1) // scale + 1]
        slab = prologue(slab) if prologue else slab
        if upsample:
            slab = F.interpolate(slab, scale_factor=2.0, mode="nearest")[:, :, lo - lo // 2 * 2:][:, :, :hi - lo]
        # Zero rows where the convolution's own padding lies (the image's top and bottom), none inside.
        slab = F.pad(slab, (0, 0, halo - (r0 - lo), halo - (hi - r1)))
        y = F.conv2d(slab, conv.weight, conv.bias, padding=(0, conv.padding[1]))
        if out is not None:
            result[:, :, r0:r1] += y
        else:
            result[:, :, r0:r1] = y
    return result


def banded_downsample(down: Downsample, x: torch.Tensor, band: int) -> torch.Tensor:
    """The encoder's stride-2 convolution after right/bottom zero padding, band by band."""
    height = x.shape[2] // 2
    result = torch.empty(x.shape[0], down.conv.out_channels, height, x.shape[3] // 2, dtype=x.dtype, device=x.device)
    for r0 in range(0, height, band):
        r1 = min(r0 + band, height)
        slab = x[:, :, 2 * r0:2 * r1 + 1]
        slab = F.pad(slab, (0, 1, 0, 2 * (r1 - r0) + 1 - slab.shape[2]))
        result[:, :, r0:r1] = down.conv(slab)
    return result


def banded_resnet(block: ResnetBlock, x: torch.Tensor, band: int) -> torch.Tensor:
    """A ResNet block; an identity shortcut accumulates into `x` itself (the caller hands it over)."""
    h = banded_conv(block.conv1, x, band, norm_silu(block.norm1, group_statistics(block.norm1, x, band), x.dtype))
    shortcut = banded_conv(block.nin_shortcut, x, band) if hasattr(block, "nin_shortcut") else x
    del x
    return banded_conv(block.conv2, h, band, norm_silu(block.norm2, group_statistics(block.norm2, h, band), h.dtype),
                       out=shortcut)


def banded_level(level: Level, x: torch.Tensor, band: int) -> torch.Tensor:
    for block in level.block:
        x = banded_resnet(block, x, band)
    if level.resample == "upsample":
        return banded_conv(level.upsample.conv, x, band, upsample=True)
    if level.resample == "downsample":
        return banded_downsample(level.downsample, x, band)
    return x


def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, band: int = 64) -> torch.Tensor:
    """`vae.decode(z)` with the up path in bands of `band` rows (at each layer's own resolution)."""
    decoder = vae.decoder
    x = decoder.mid(decoder.conv_in(vae.post_quant_conv(z))).clone()  # ours to overwrite in place
    for level in reversed(decoder.up):
        x = banded_level(level, x, band)
    return banded_conv(decoder.conv_out, x, band,
                       norm_silu(decoder.norm_out, group_statistics(decoder.norm_out, x, band), x.dtype))


def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, band: int = 64) -> torch.Tensor:
    """`vae.encode(x)` (the latent mean) with the down path in bands of `band` rows."""
    encoder = vae.encoder
    x = banded_conv(encoder.conv_in, x, band)
    for level in encoder.down:
        x = banded_level(level, x, band)
    moments = vae.quant_conv(encoder.conv_out(F.silu(encoder.norm_out(encoder.mid(x)))))
    return moments.chunk(2, dim=1)[0]
