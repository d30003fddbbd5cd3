"""DeepCache (Ma et al. 2023, arXiv 2312.00858): the UNet's deep features change little from one step to the
next, so a full pass every N-th call caches them and the calls in between recompute only the shallow branch
(the first input blocks and the last output blocks), reusing the cached deep features in the skip join."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .models.unet import UNetModel, timestep_embedding

# DeepCache's setting for SD 1.5 (its "cache layer 0, block 0"): recompute the stem convolution and the first
# block of the highest resolution, input_blocks[0..1], and the two output blocks that join their skips.
DEFAULT_BRANCH = 1


@dataclass
class _Entry:
    """What one stream of calls (same latent shape, same text context) has cached."""
    shape: torch.Size
    context: Tensor
    y: Tensor | None
    deep: Tensor | None = None
    calls: int = 0


class DeepCacheUNet:
    """`unet(x, t, context)` with DeepCache: call 0, N, 2N, ... of each stream is a full pass that caches the
    input of output_blocks[-(branch + 1)] (everything below the shallow branch); the other calls run only
    input_blocks[:branch + 1] and output_blocks[-(branch + 1):] on it. A stream is keyed by the latent's shape
    and the text context, so cond/uncond called separately, or the single pass outside a CFG interval, each
    keep their own cache. interval = 1 runs the full pass every time (the UNet's own result, bit for bit).
    Make one per image: the cache belongs to one sampling trajectory."""

    def __init__(self, unet: torch.nn.Module, interval: int, branch: int = DEFAULT_BRANCH):
        self.unet: UNetModel = getattr(unet, "_orig_mod", unet)  # the modules under a torch.compile wrapper
        blocks = len(self.unet.input_blocks)
        if interval < 1:
            raise ValueError(f"cache interval must be at least 1, got {interval}")
        if not 0 <= branch < blocks - 1 or len(self.unet.output_blocks) != blocks:
            raise ValueError(f"branch must be between 0 and {blocks - 2}, got {branch}")
        self.interval, self.branch = interval, branch
        self.join = blocks - 1 - branch  # the first output block of the shallow branch
        self.entries: list[_Entry] = []
        self.full_passes = self.partial_passes = 0

    def _entry(self, x: Tensor, context: Tensor, y: Tensor | None) -> _Entry:
        def same(a: Tensor | None, b: Tensor | None) -> bool:
            return a is b or a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)
        for entry in self.entries:
            if entry.shape == x.shape and same(entry.context, context) and same(entry.y, y):
                return entry
        self.entries.append(_Entry(x.shape, context, y))
        return self.entries[-1]

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        unet = self.unet
        entry = self._entry(x, context, y)
        full = entry.calls % self.interval == 0 or entry.deep is None
        entry.calls += 1
        # As UNetModel.forward: the timestep embedding, then the input blocks keeping their outputs as skips.
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = unet.time_embed(timestep_embedding(t, unet.config.model_channels).to(x.dtype))
        if y is not None:  # SDXL's pooled-text and size vector
            emb = emb + unet.label_emb(y.to(emb.dtype))
        skips = []
        for block in unet.input_blocks if full else unet.input_blocks[:self.branch + 1]:
            x = block(x, emb, context)
            skips.append(x)
        if full:
            self.full_passes += 1
            x = unet.middle_block(x, emb, context)
            blocks = enumerate(unet.output_blocks)
        else:
            self.partial_passes += 1
            x = entry.deep
            blocks = enumerate(unet.output_blocks[self.join:], start=self.join)
        for index, block in blocks:
            if index == self.join and full:
                entry.deep = x
            x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, context, skips[-1].shape[-2:] if skips else None)
        return unet.out(x)
