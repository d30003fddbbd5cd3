"""Rough memory needs of one generation, checked before starting so that an impossible request is refused
with a clear message instead of an out-of-memory crash halfway through."""
from __future__ import annotations

import torch

from .config import ModelConfig


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def estimate_vae_memory(config: ModelConfig, width: int, height: int, dtype: torch.dtype) -> int:
    """Peak activation bytes of one untiled VAE pass: a few full-resolution feature maps (the up-sampled input
    of the last level is twice as wide as its output)."""
    return width * height * config.vae.channels * 6 * torch.empty((), dtype=dtype).element_size()


def estimate_generation_memory(config: ModelConfig, width: int, height: int, batch: int, dtype: torch.dtype,
                               tiled_vae: bool = False) -> int:
    """Peak activation bytes beyond the weights: the larger of one guided UNet call (cond and uncond batched;
    the widest level holds a few copies of its feature map and the 8× GEGLU hidden layer; attention runs in
    memory-efficient kernels) and the VAE pass of one image (banded: about two thirds of it, measured)."""
    size = torch.empty((), dtype=dtype).element_size()
    unet = 2 * batch * (width // 8) * (height // 8) * config.unet.model_channels * 16 * size * 2
    vae = estimate_vae_memory(config, width, height, dtype)
    return max(unet, vae * 2 // 3 if tiled_vae else vae)
