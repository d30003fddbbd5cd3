"""A1111's inpainting with an ordinary (4-channel) model, offered when reproducing an A1111 infotext: a binary latent
mask (the blurred mask resized bicubically to the latent size, rounded), "Masked content" applied to the init
latent, the original blended into the *denoised* prediction only (the sampler's x is left alone), the same blend
on the final latents, and the original pasted over the result with alpha 1 − min(2·mask, 1)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from .errors import ParameterError

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
INPAINT_MODES = ("minisd", "a1111")


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) blurred mask in [0, 1] -> (1, 1, h, w) of 0/1: A1111 resizes the 8-bit mask with PIL's
    default (bicubic) filter and rounds."""
    pixels = (mask[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    small = Image.fromarray(pixels).resize((latent_size[1], latent_size[0]))
    return torch.from_numpy(np.around(np.asarray(small, dtype=np.float32) / 255))[None, None]


class A1111Inpainting:
    """The pieces of A1111's inpainting for one request; `nmask` is 1 where the image is repainted."""

    def __init__(self, mask: torch.Tensor, latent_size: tuple[int, int], masked_content: str, device):
        if masked_content not in MASKED_CONTENT:
            raise ParameterError(f"masked content must be one of {', '.join(MASKED_CONTENT)}, got {masked_content!r}")
        if masked_content == "fill":
            raise ParameterError("masked content 'fill' (A1111's pixel-space colour fill) is not supported; "
                                 "use original, latent noise or latent nothing")
        self.masked_content = masked_content
        self.nmask = latent_mask(mask, latent_size).to(device)
        self.overlay_alpha = (mask * 2).clamp(0, 1)  # A1111's mask_for_overlay: clip(2 · blurred mask)

    def init_latent(self, original: torch.Tensor, seed_noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The init latent after "Masked content": latent noise puts the seeds' noise in the masked part,
        latent nothing zeros it."""
        keep = 1 - self.nmask
        if self.masked_content == "latent noise":
            return original * keep + seed_noise().to(original.device) * self.nmask
        if self.masked_content == "latent nothing":
            return original * keep
        return original

    def denoiser(self, inner: Callable, init_latent: torch.Tensor) -> Callable:
        keep, nmask = 1 - self.nmask, self.nmask

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return init_latent * keep + nmask * inner(x, sigma)
        return denoise

    def finish(self, latents: torch.Tensor, init_latent: torch.Tensor) -> torch.Tensor:
        return latents * self.nmask + init_latent * (1 - self.nmask)
