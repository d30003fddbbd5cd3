"""The denoising UNet of latent diffusion (Rombach et al. 2022): ResBlocks conditioned on the timestep,
spatial transformers with self- and cross-attention to the text, skip connections between the down
and up paths. Attribute names follow the CompVis `openaimodel.UNetModel` checkpoints."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .attention_precision import upcast_if_float16


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, [cos | sin] as in the CompVis code (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens to `context` (itself for self-attention).

    `probe`, when set on an instance, is called as probe(module, q, k) with q, k of shape (B, heads, n, d):
    minisd.explain reads the attention probabilities softmax(q kᵀ/√d) there; unset it costs one `if`."""

    probe = None

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        if self.probe is not None:
            self.probe(self, q, k)
        q, k, v = upcast_if_float16(q, k, v)  # SD 2.1's q·kᵀ overflows float16 (attention_precision.py)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.to(x.dtype).transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives both the values and their gates."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Pixels as tokens: project in, transformer blocks, project out, residual."""

    def __init__(self, channels: int, config: UNetConfig, depth: int | None = None):
        super().__init__()
        depth = config.depth(0) if depth is None else depth
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=1e-6)
        # SD 1.x projects with 1×1 convolutions, SD 2.x/XL with linear layers (same maths, other shape).
        project = (lambda: nn.Linear(channels, channels)) if config.use_linear_projection \
            else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = project()
        heads = config.heads(channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, config.context_dim) for _ in range(depth))
        self.proj_out = project()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, H·W, C); a 1×1 convolution is the same matmul as a linear layer on the tokens,
        # and done as one (a free view for channels-last x) it avoids the slow 1×1 conv path and two copies.
        y = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        y = F.linear(y, self.proj_in.weight.reshape(c, c), self.proj_in.bias)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = F.linear(y, self.proj_out.weight.reshape(c, c), self.proj_out.bias)
        return x + y.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Upsample to the skip connection's size, not blindly ×2: sizes that are odd at some level
        # (latents that are multiples of 8 but not of 64) then still line up.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A block of the UNet: passes each layer the input it needs (timestep embedding, context, size)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """(noisy latent (B, C, h, w), timestep (B,), text context (B, L, D)[, SDXL vector y (B, adm)]) -> ε or v
    (B, 4, h, w)."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c, g = config.model_channels, config.norm_groups
        emb = 4 * c
        self.time_embed = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        if config.adm_in_channels:  # SDXL: the pooled-text + size vector joins the timestep embedding
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(config.adm_in_channels, emb), nn.SiLU(),
                                                         nn.Linear(emb, emb)))

        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(config.in_channels, c, 3, padding=1))])
        skip_widths, width = [c], c
        levels = len(config.channel_mult)
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [ResBlock(width, c * mult, emb, g)]
                width = c * mult
                if level in config.attention_levels:
                    layers.append(SpatialTransformer(width, config, config.depth(level)))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_widths.append(width)
            if level != levels - 1:
                self.input_blocks.append(TimestepSequential(Downsample(width)))
                skip_widths.append(width)

        self.middle_block = TimestepSequential(ResBlock(width, width, emb, g),
                                               SpatialTransformer(width, config, config.middle_depth),
                                               ResBlock(width, width, emb, g))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(width + skip_widths.pop(), c * mult, emb, g)]
                width = c * mult
                if level in config.attention_levels:
                    layers.append(SpatialTransformer(width, config, config.depth(level)))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(width))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(g, width), nn.SiLU(), nn.Conv2d(width, config.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        skips = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            skips.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)
            # The next skip's size is what an Upsample at the end of this block must produce.
            x = block(x, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(x)
