"""The text encoders of SD 2.x and SDXL under their checkpoint names (`cond_stage_model.model.*`;
`conditioner.embedders.N.*`), what each family takes from them (SD 2.x: penultimate layer + final norm;
SDXL: penultimate layers of CLIP-L and bigG without it, and bigG's pooled embedding), and SDXL's
vector conditioning: pooled text + sinusoidal embeddings of sizes, crop and aesthetic score (Podell et al. 2023)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import SIZE_EMBEDDING_DIM, CLIPTextConfig, ModelConfig, OpenCLIPTextConfig
from ..errors import ParameterError
from .clip import CLIPTextModel
from .open_clip import OpenCLIPTextModel
from .unet import timestep_embedding


class SD2TextEncoder(nn.Module):
    """SD 2.x's `cond_stage_model` (ldm `FrozenOpenCLIPEmbedder`, layer "penultimate"): ids (k, 77) ->
    context (k, 77, width). Clip skip n takes layer −(n + 1) of the original tower: 1, the default, is SD 2.x's
    penultimate layer, which is the last one stored when the tower was converted from a diffusers folder."""

    checkpoint_prefix = "cond_stage_model."
    pad_id = 0  # OpenCLIP pads with 0 after the end-of-text token

    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.model = OpenCLIPTextModel(config)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        dropped, stored = self.model.config.dropped_last_layers, self.model.config.layers
        from_end = clip_skip + 1 - dropped  # counted from the last stored layer
        if not 1 <= from_end <= stored:
            raise ParameterError(f"clip skip must be between {max(1, dropped)} and {stored + dropped - 1} for this "
                                 f"text encoder ({stored} layers stored of {stored + dropped}), got {clip_skip}")
        return self.model(input_ids, clip_skip=from_end, final_norm=True)


class _CLIPEmbedder(nn.Module):
    """sgm's `FrozenCLIPEmbedder` slot: the transformers-layout CLIP text model under `transformer.`."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.transformer = CLIPTextModel(config)

    def forward(self, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        # Layer −(clip_skip + 1) without the final layer norm (SDXL's "hidden" layer 11 of 12 by default).
        text = self.transformer.text_model
        layers = text.encoder.layers
        if not 1 <= clip_skip <= len(layers):
            raise ValueError(f"clip_skip must be between 1 and {len(layers)}, got {clip_skip}")
        x = text.embeddings(input_ids)
        for layer in layers[: len(layers) - clip_skip]:
            x = layer(x)
        return x


class _OpenCLIPEmbedder(nn.Module):
    """sgm's `FrozenOpenCLIPEmbedder2` slot (layer "penultimate", no final norm, pooled output)."""

    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.model = OpenCLIPTextModel(config)

    def forward(self, input_ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids, clip_skip=clip_skip + 1, final_norm=False, return_pooled=True)


class SDXLTextEncoders(nn.Module):
    """SDXL's `conditioner` text embedders: CLIP ViT-L then OpenCLIP bigG (base), or bigG alone (refiner).
    Both see the same chunks; CLIP-L pads with end-of-text, bigG with 0."""

    checkpoint_prefix = "conditioner."

    def __init__(self, clip: CLIPTextConfig | None, open_clip: OpenCLIPTextConfig):
        super().__init__()
        slots = ([_CLIPEmbedder(clip)] if clip is not None else []) + [_OpenCLIPEmbedder(open_clip)]
        self.embedders = nn.ModuleList(slots)

    def forward(self, eos_padded: torch.Tensor, zero_padded: torch.Tensor, clip_skip: int = 1
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-embedder contexts [(k, 77, 768), (k, 77, 1280)] and bigG's pooled embedding (k, 1280)."""
        hidden = []
        for embedder in self.embedders[:-1]:
            hidden.append(embedder(eos_padded, clip_skip))
        last, pooled = self.embedders[-1](zero_padded, clip_skip)
        return hidden + [last], pooled


def text_encoder_for(config: ModelConfig) -> nn.Module:
    """The text-encoder module of a model family (built on the current default device)."""
    if config.family == "sd1":
        return CLIPTextModel(config.text)
    if config.family == "sd2":
        return SD2TextEncoder(config.open_clip)
    return SDXLTextEncoders(config.text, config.open_clip)


def size_vector(pooled: torch.Tensor, numbers: list[float]) -> torch.Tensor:
    """SDXL's `y`: pooled text (B, P) joined with each number embedded in 256 sinusoidal channels
    ([cos | sin], as the timestep): base (original h, w, crop top, left, target h, w), refiner
    (original h, w, crop top, left, aesthetic score)."""
    values = torch.tensor(numbers, dtype=torch.float32, device=pooled.device)
    embedded = timestep_embedding(values, SIZE_EMBEDDING_DIM).reshape(1, -1)
    return torch.cat([pooled.float(), embedded.expand(pooled.shape[0], -1)], dim=1).to(pooled.dtype)
