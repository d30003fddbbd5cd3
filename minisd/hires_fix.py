"""A1111's "Hires. fix": txt2img at the first size, upscale (the latents, or the decoded images with a resampler),
then img2img at the target size with the same seeds, `strength` and exactly hr_steps (or steps) steps."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .params import GenerationParams

LATENT_SCALE = 8
# A1111's latent upscale modes: hires upscaler label -> (F.interpolate mode, antialias).
LATENT_MODES = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
# Image upscalers: PIL resampling of the decoded first pass ("None" only resizes, with Lanczos, as A1111).
IMAGE_RESAMPLERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                    "Nearest": Image.Resampling.NEAREST}


def target_size(p: GenerationParams) -> tuple[int, int, int, int]:
    """(width, height) the first pass is upscaled to and the (x, y) latent columns/rows cropped off in total
    (A1111's rule: "Hires resize" with both sides set keeps the aspect ratio and crops the excess)."""
    if not p.hr_resize_x and not p.hr_resize_y:
        return int(p.width * p.hr_scale), int(p.height * p.hr_scale), 0, 0
    if not p.hr_resize_y:
        return p.hr_resize_x, p.hr_resize_x * p.height // p.width, 0, 0
    if not p.hr_resize_x:
        return p.hr_resize_y * p.width // p.height, p.hr_resize_y, 0, 0
    if p.width / p.height < p.hr_resize_x / p.hr_resize_y:
        width, height = p.hr_resize_x, p.hr_resize_x * p.height // p.width
    else:
        width, height = p.hr_resize_y * p.width // p.height, p.hr_resize_y
    return width, height, (width - p.hr_resize_x) // LATENT_SCALE, (height - p.hr_resize_y) // LATENT_SCALE


def upscale_latents(latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    mode, antialias = LATENT_MODES[upscaler]
    return F.interpolate(latents, size=(height // LATENT_SCALE, width // LATENT_SCALE), mode=mode,
                         antialias=antialias)


def upscale_images(decoded: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """Decoded images in [-1, 1] -> 8-bit images (A1111 truncates) resized with PIL -> [-1, 1] at the new size."""
    out = []
    for image in ((decoded.float().cpu() + 1) / 2).clamp(0, 1):
        pixels = (255.0 * image.permute(1, 2, 0).numpy()).astype(np.uint8)
        resized = Image.fromarray(pixels).resize((width, height), IMAGE_RESAMPLERS[upscaler])
        out.append(torch.from_numpy(np.asarray(resized).astype(np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out) * 2 - 1


def hires_fix(sd, p: GenerationParams, noise: torch.Tensor | None = None,
              callback: Callable[[dict], None] | None = None):
    """The two passes for validated params `p` with enable_hr; returns what `sd.generate` returns."""
    first = dataclasses.replace(p, enable_hr=False, output="latent")
    width, height, crop_x, crop_y = target_size(p)
    second = dataclasses.replace(p, enable_hr=False, width=width // LATENT_SCALE * LATENT_SCALE,
                                 height=height // LATENT_SCALE * LATENT_SCALE, steps=p.hr_steps or p.steps)
    second_latents = []
    for iteration in range(p.n_iter):
        offset = iteration * p.batch_size  # batch `iteration` continues the seeds (or the variation seeds)
        one = dataclasses.replace(first, n_iter=1, seed=p.seed + (0 if p.subseed_strength else offset),
                                  subseed=p.subseed + offset)
        batch_noise = None if noise is None else noise[iteration * p.batch_size:(iteration + 1) * p.batch_size]
        latents = sd.generate(one, noise=batch_noise, callback=callback)
        if p.hr_upscaler in LATENT_MODES:
            upscaled = upscale_latents(latents, width, height, p.hr_upscaler)
        else:
            with torch.inference_mode():
                images = upscale_images(sd.decode_latents(latents), width, height, p.hr_upscaler)
                upscaled = sd.encode_latents(images)
        if crop_x or crop_y:
            upscaled = upscaled[:, :, crop_y // 2:upscaled.shape[2] - (crop_y + 1) // 2,
                                crop_x // 2:upscaled.shape[3] - (crop_x + 1) // 2]
            second = dataclasses.replace(second, width=upscaled.shape[3] * LATENT_SCALE,
                                         height=upscaled.shape[2] * LATENT_SCALE)
        hr_pass = dataclasses.replace(second, n_iter=1, seed=one.seed, subseed=one.subseed, output=p.output)
        result = sd.generate(hr_pass, init_latents=upscaled, callback=callback, fix_steps=True)
        second_latents.append(result)
    if p.output == "latent":
        return torch.cat(second_latents)
    images = [image for batch in second_latents for image in batch]
    for image in images:  # the infotext of the whole request: first-pass size and the hires fields
        image.info["parameters"] = _hires_infotext(sd, p, image)
    return images


def _hires_infotext(sd, p: GenerationParams, image: Image.Image) -> str:
    from .image import parse_infotext
    fields = parse_infotext(image.info["parameters"])[2]
    subseed = int(fields.get("Variation seed", p.subseed))
    return dataclasses.replace(p, subseed=subseed).infotext(
        image.info["seed"], model_hash=sd.model_hash, model_name=sd.model_name,
        version=fields.get("Version", "minisd"))
