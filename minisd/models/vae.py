"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3): an image is encoded to a
Gaussian over an 8× smaller latent and decoded back. Attribute names follow the CompVis checkpoints."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .attention_precision import upcast_if_float16


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1×1 convolutions as projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, H·W, C): one head whose tokens are the pixels. Contiguous, or attention falls
        # back to a kernel that materialises the (H·W)² score matrix (2 GiB at 1024×1024 pixels).
        q, k, v = (p(y).flatten(2).transpose(1, 2).contiguous().unsqueeze(1) for p in (self.q, self.k, self.v))
        # The encoder has no float32 retry (the decoder has, in pipeline.decode_latents): its scores must not overflow.
        out = F.scaled_dot_product_attention(*upcast_if_float16(q, k, v))
        return x + self.proj_out(out.to(x.dtype).squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only), as the original model was trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """The residual blocks of one resolution, plus the resampling to the next one."""

    def __init__(self, blocks: list[nn.Module], resample: str | None = None, resampler: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample:
            self.add_module(resample, resampler)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample)(x) if self.resample else x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> mean and log-variance (B, 2·latent, H/8, W/8) before `quant_conv`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        g, widths = config.norm_groups, [config.channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.channels, 3, padding=1)
        levels, width = [], config.channels
        for i, out in enumerate(widths):
            blocks = [ResnetBlock(width if j == 0 else out, out, g) for j in range(config.num_res_blocks)]
            last = i == len(widths) - 1
            levels.append(Level(blocks, None if last else "downsample", None if last else Downsample(out)))
            width = out
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(width, g)
        self.norm_out = group_norm(width, g)
        self.conv_out = nn.Conv2d(width, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) after `post_quant_conv` -> image (B, 3, 8h, 8w) in about [−1, 1]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        g, widths = config.norm_groups, [config.channels * m for m in config.channel_mult]
        width = widths[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, width, 3, padding=1)
        self.mid = MidBlock(width, g)
        levels = [None] * len(widths)
        # `up.i` works at the resolution of `encoder.down.i`; they run from the deepest level upwards.
        for i in reversed(range(len(widths))):
            out = widths[i]
            blocks = [ResnetBlock(width if j == 0 else out, out, g) for j in range(config.num_res_blocks + 1)]
            levels[i] = Level(blocks, "upsample" if i else None, Upsample(out) if i else None)
            width = out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width, g)
        self.conv_out = nn.Conv2d(width, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the latent posterior q(z|x) for an image in [−1, 1]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent mean (unscaled: multiply by `config.scaling_factor` for the diffusion model)."""
        return self.encode_moments(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image in about [−1, 1]."""
        return self.decoder(self.post_quant_conv(z))
