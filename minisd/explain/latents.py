"""`minisd explain latents IMAGE`: the autoencoder round trip (image -> 4-channel latent -> image), the latent
channels, and what the scaling factor does: it brings the latents to unit variance, the scale at which the
diffusion model's noise schedule was designed (Rombach et al. 2022, §4.3.2 and App. G)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..image import pil_to_tensor, resize_image, tensor_to_pil
from . import Explanation
from .drawing import heatmap, labelled_grid, new_figure, figure_image, side_by_side

CHANNEL_RANGE = 3.0  # latent channels are drawn from −3 (blue) to +3 (red): ±3 standard deviations


def encode_image(sd, image: Image.Image, width: int | None = None, height: int | None = None
                 ) -> tuple[Image.Image, torch.Tensor]:
    """The image cropped and resized to the model's size (or width × height), and its scaled latent
    z = scaling_factor · E(x) (B=1, 4, H/8, W/8), the posterior mean, as img2img encodes."""
    size = sd.config.image_size
    image = resize_image(image.convert("RGB"), width or size, height or size, "Crop and resize")
    with torch.inference_mode():
        latent = sd.encode_latents(pil_to_tensor(image))
    return image, latent.float().cpu()


def decode(sd, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents (B, 4, h, w) -> PIL images."""
    with torch.inference_mode():
        return tensor_to_pil(sd.decode_latents(latents.to(sd.device)))


def channel_images(latent: torch.Tensor) -> list[Image.Image]:
    """The channels of one latent (4, h, w) as blue-white-red maps over ±CHANNEL_RANGE."""
    return [heatmap(c, -CHANNEL_RANGE, CHANNEL_RANGE, "coolwarm") for c in latent]


def histogram(unscaled: torch.Tensor, scaled: torch.Tensor, factor: float, width: int, height: int) -> Image.Image:
    """Histograms of the latent values before and after scaling, against the N(0, 1) density."""
    figure = new_figure(width, height)
    ax = figure.add_subplot()
    values = [unscaled.flatten().numpy(), scaled.flatten().numpy()]
    lo = min(-4.0, float(min(v.min() for v in values)))
    hi = max(4.0, float(max(v.max() for v in values)))
    bins = np.linspace(lo, hi, 41)
    ax.hist(values[0], bins=bins, density=True, alpha=0.5, label=f"E(x): std {values[0].std():.3f}")
    ax.hist(values[1], bins=bins, density=True, alpha=0.5, label=f"{factor:g}·E(x): std {values[1].std():.3f}")
    grid = np.linspace(lo, hi, 200)
    ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), color="black", lw=1, label="N(0, 1)")
    ax.set_title(f"latent values; scaling factor {factor:g}", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    figure.tight_layout()
    return figure_image(figure)


def explain_latents(sd, image: Image.Image, *, width: int | None = None, height: int | None = None,
                    cell: int = 96) -> Explanation:
    """The round trip, the four channels and the scaling factor's effect for one image."""
    image, latent = encode_image(sd, image, width, height)
    factor = sd.config.vae.scaling_factor
    reconstruction = decode(sd, latent)[0]
    error = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(reconstruction, dtype=np.float64)).mean(-1)
    mae = float(error.mean())
    # The error map is drawn 4× brighter: a good autoencoder's errors are a few levels out of 255.
    error_image = Image.fromarray(np.clip(error * 4, 0, 255).astype(np.uint8))
    channels = channel_images(latent[0])
    h, w = latent.shape[-2:]
    top = [image, reconstruction, error_image]
    captions = [f"image {image.width}×{image.height}", "E then D", f"|error| ×4\nmean {mae:.2f}/255"]
    stds = latent[0].flatten(1).std(dim=1)
    means = latent[0].flatten(1).mean(dim=1)
    channel_captions = [f"channel {i}\nmean {float(m):+.2f}\nstd {float(s):.2f}"
                        for i, (m, s) in enumerate(zip(means, stds))]
    grid = labelled_grid([top, channels], captions=[captions, channel_captions], cell=cell,
                         row_labels=["round trip", f"latent\n4×{h}×{w}"],
                         title=f"the autoencoder: {image.width}×{image.height}×3 pixels -> 4×{h}×{w} latent "
                               f"(scaled, blue −{CHANNEL_RANGE:g} to red +{CHANNEL_RANGE:g})")
    plot = histogram(latent[0] / factor, latent[0], factor, 360, grid.height)
    # The animation flips between the image and its reconstruction: what the round trip loses blinks.
    frames = [labelled_grid([[im]], captions=[[text]], cell=2 * cell)
              for im, text in ((image, "image"), (reconstruction, "decoded from its latent"))]
    facts = {"scaling_factor": factor, "mae_255": mae, "latent_shape": tuple(latent.shape[1:]),
             "std_unscaled": float((latent / factor).std()), "std_scaled": float(latent.std())}
    return Explanation(side_by_side(grid, plot), frames, facts)
