"""StableDiffusion: one loaded model (text encoder, UNet, autoencoder and their config). The generation
tasks (txt2img, img2img, inpaint) build on this class and share one sampling routine."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import Components, load_components, original_state_dict, save_checkpoint
from .config import ModelConfig
from .models.clip import CLIPTextModel
from .models.unet import UNetModel
from .models.vae import AutoencoderKL


class StableDiffusion:
    """A loaded Stable Diffusion model; `minisd.load()` makes one."""

    def __init__(self, config: ModelConfig, unet: UNetModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 source: Path | None = None, has_ema: bool = False):
        self.config, self.unet, self.vae, self.text_encoder = config, unet, vae, text_encoder
        self.source, self.has_ema = source, has_ema

    @classmethod
    def from_components(cls, c: Components) -> "StableDiffusion":
        return cls(c.config, c.unet, c.vae, c.text_encoder, c.source, c.has_ema)

    @property
    def device(self) -> torch.device:
        return self._any_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._any_weight.dtype

    @property
    def _any_weight(self) -> torch.Tensor:
        return next(self.unet.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under the original single-file key names."""
        return original_state_dict(self.unet, self.vae, self.text_encoder)

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write the model as an original-layout .safetensors, or a diffusers folder for a path with no suffix."""
        save_checkpoint(path, self.state_dict(), self.config, dtype)


def load(source: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         use_ema: bool = True, allow_pickle: bool = True, config: ModelConfig | None = None) -> StableDiffusion:
    """Load a checkpoint: an original-layout .safetensors or .ckpt file, a diffusers folder, or "demo".
    Raises `minisd.CheckpointError` with a one-line explanation for anything that cannot be loaded."""
    return StableDiffusion.from_components(
        load_components(source, device=device, dtype=dtype, use_ema=use_ema, allow_pickle=allow_pickle, config=config))
