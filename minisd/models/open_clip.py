"""OpenCLIP text transformer (Cherti et al. 2023; the SD 2.x ViT-H/14 and SDXL ViT-bigG/14 text towers):
causal pre-norm transformer with exact GELU and fused `in_proj` attention, final layer norm, and the
projection of the end-of-text token for the pooled embedding. Attribute names follow OpenCLIP's `CLIP`
text tower as the checkpoints store it (`token_embedding`, `transformer.resblocks.N.attn.in_proj_weight` ...)."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OpenCLIPTextConfig
from .clip import Embedding


class FusedAttention(nn.Module):
    """Multi-head causal self-attention with q, k and v stacked in one (3·W, W) projection (the layout of
    `torch.nn.MultiheadAttention`, which OpenCLIP uses)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, n, 3·C) -> 3 × (B, heads, n, C/heads)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).permute(
            2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = FusedAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(config.width, config.mlp_width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(config.mlp_width, config.width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class OpenCLIPTextModel(nn.Module):
    """Token ids (B, L) -> hidden states (B, L, width) of a chosen layer, and optionally the pooled embedding
    (B, projection_dim): the last layer's normed end-of-text state times `text_projection`."""

    def __init__(self, config: OpenCLIPTextConfig = OpenCLIPTextConfig()):
        super().__init__()
        self.config = config
        self.token_embedding = Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(config)
        self.ln_final = nn.LayerNorm(config.width)
        if not config.dropped_last_layers:  # a truncated tower (config.py) has no pooled output to project
            self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))
        if config.has_logit_scale:
            self.logit_scale = nn.Parameter(torch.empty(()))  # CLIP's contrastive temperature: stored, unused here

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, final_norm: bool = True,
                return_pooled: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Hidden state of layer −`clip_skip` (1 = last, 2 = penultimate as SD 2.x and SDXL take it), through
        `ln_final` if `final_norm`; with `return_pooled` also the pooled embedding (which always comes from
        the last layer, so the remaining layers then run too)."""
        blocks = self.transformer.resblocks
        if not 1 <= clip_skip <= len(blocks):
            raise ValueError(f"clip_skip must be between 1 and {len(blocks)}, got {clip_skip}")
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
        keep = len(blocks) - clip_skip + 1
        for block in blocks[:keep]:
            x = block(x)
        hidden = self.ln_final(x) if final_norm else x
        if not return_pooled:
            return hidden
        if self.config.dropped_last_layers:
            raise ValueError("this text encoder lacks its last layers, so it has no pooled embedding")
        for block in blocks[keep:]:
            x = block(x)
        # The end-of-text token has the largest id, so argmax finds it (OpenCLIP's rule; padding is 0).
        eot = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        return hidden, eot @ self.text_projection
