"""Model configurations: frozen dataclasses with SD 1.x defaults, presets, and inference of a config
from a checkpoint's keys and shapes (hyperparameters the weights do not show follow SD's conventions)."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP ViT-L/14 text transformer (the SD 1.x text encoder)."""
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class VAEConfig:
    """KL-regularised autoencoder (ldm `AutoencoderKL`, f=8, 4 latent channels)."""
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215


@dataclass(frozen=True)
class UNetConfig:
    """ldm `UNetModel` with spatial transformers; `attention_levels` are the down-sampling levels that
    carry a transformer (SD's attention_resolutions 4, 2, 1 = levels 0, 1, 2)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int = 8                 # SD 1.x: a fixed head count ...
    head_channels: int | None = None   # ... SD 2.x/XL: a fixed head width (64) instead
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_projection: bool = False
    norm_groups: int = 32

    def heads(self, channels: int) -> int:
        return channels // self.head_channels if self.head_channels else self.num_heads


@dataclass(frozen=True)
class ScheduleConfig:
    """The discrete DDPM noise schedule the model was trained with (scaled-linear betas)."""
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: the three networks and their schedule."""
    variant: str = "sd1"
    image_size: int = 512  # the resolution it was trained at: the default width and height of its images
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)

        def build(kind, values):
            known = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})

        return cls(variant=raw.get("variant", "sd1"), image_size=raw.get("image_size", 512),
                   unet=build(UNetConfig, raw.get("unet", {})),
                   vae=build(VAEConfig, raw.get("vae", {})), text=build(CLIPTextConfig, raw.get("text", {})),
                   schedule=build(ScheduleConfig, raw.get("schedule", {})))


# The bundled demo model (minisd/train): a small SD 1.x-layout model for 64×64 images.
# f = 8 like SD: 64×64 images <-> 4×8×8 latents. Three down-samplings need four levels.
DEMO_VAE = VAEConfig(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=8)
# CLIP's 64-channel heads (one head at width 64). The 49408×64 token table keeps the standard vocabulary
# although the grammar uses a few dozen ids: the file stays an ordinary SD 1.x checkpoint.
DEMO_TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1)
# Three levels (8×8, 4×4 and 2×2 latents), attention at all of them and in the middle block. SD's UNet has no
# positional embedding, zero padding is its only sense of place, and a 2×2 level makes the quadrants plain to
# it (alone this did not teach "on the left"; the text encoder's initialisation did, see train/diffusion.py).
DEMO_UNET = UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=2, attention_levels=(0, 1, 2),
                       num_heads=4, context_dim=DEMO_TEXT.hidden_size, norm_groups=32)
DEMO = ModelConfig(variant="sd1", image_size=64, unet=DEMO_UNET, vae=DEMO_VAE, text=DEMO_TEXT)


PRESETS: dict[str, ModelConfig] = {
    "sd1": ModelConfig(),
    "sd1-inpaint": ModelConfig(variant="sd1-inpaint", unet=UNetConfig(in_channels=9)),
    "demo": DEMO,
    # Millisecond-sized networks for tests: every structural feature of SD 1.x, tiny widths.
    "tiny": ModelConfig(
        variant="sd1",
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_heads=2,
                        context_dim=32, norm_groups=8),
        vae=VAEConfig(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
        text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    ),
}

# Checkpoint key prefixes of the original (CompVis) single-file layout.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise UnsupportedModelError(f"missing key {key}: not a complete SD 1.x checkpoint")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct integers matched by the `(\\d+)` group of `pattern` over the keys."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := regex.match(k))})


def detect_variant(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the architecture of an original-layout state dict: sd1, sd1-inpaint, sd2, sdxl, ..."""
    keys = sd.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys) or f"{UNET_PREFIX}label_emb.0.0.weight" in sd:
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    proj_in = f"{UNET_PREFIX}input_blocks.1.1.proj_in.weight"
    if proj_in in sd and len(sd[proj_in].shape) == 2:
        return "sd2"
    first = f"{UNET_PREFIX}input_blocks.0.0.weight"
    if first not in sd:
        raise UnsupportedModelError(
            "not a Stable Diffusion checkpoint: no UNet weights (model.diffusion_model.input_blocks.0.0.weight)")
    channels = sd[first].shape[1]
    if channels == 4:
        return "sd1"
    if channels == 9:
        return "sd1-inpaint"
    raise UnsupportedModelError(f"UNet with {channels} input channels is not a known SD 1.x variant")


def infer_unet_config(sd: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX) -> UNetConfig:
    """UNet hyperparameters from the shapes of its weights (heads and groups by SD 1.x convention)."""
    conv_in = _shape(sd, f"{prefix}input_blocks.0.0.weight")
    model_channels, in_channels = conv_in[0], conv_in[1]
    n_input_blocks = _count(sd, re.escape(prefix) + r"input_blocks\.(\d+)\.")
    n_output_blocks = _count(sd, re.escape(prefix) + r"output_blocks\.(\d+)\.")
    levels = _count(sd, re.escape(prefix) + r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    num_res_blocks = n_output_blocks // levels - 1
    if (num_res_blocks + 1) * levels != n_output_blocks or 1 + levels * num_res_blocks + levels - 1 != n_input_blocks:
        raise UnsupportedModelError("UNet block layout does not match the SD UNet")
    mult, attention = [], []
    for level in range(levels):
        block = 1 + level * (num_res_blocks + 1)
        mult.append(_shape(sd, f"{prefix}input_blocks.{block}.0.out_layers.3.weight")[0] // model_channels)
        if f"{prefix}input_blocks.{block}.1.proj_in.weight" in sd:
            attention.append(level)
    depth, context_dim, linear = 1, 768, False
    if attention:
        st = f"{prefix}input_blocks.{1 + attention[0] * (num_res_blocks + 1)}.1."
        depth = _count(sd, re.escape(st) + r"transformer_blocks\.(\d+)\.")
        context_dim = _shape(sd, st + "transformer_blocks.0.attn2.to_k.weight")[1]
        linear = len(_shape(sd, st + "proj_in.weight")) == 2
    return UNetConfig(in_channels=in_channels, out_channels=_shape(sd, f"{prefix}out.2.weight")[0],
                      model_channels=model_channels, channel_mult=tuple(mult), num_res_blocks=num_res_blocks,
                      attention_levels=tuple(attention), transformer_depth=depth, context_dim=context_dim,
                      use_linear_projection=linear)


def infer_vae_config(sd: Mapping[str, torch.Tensor], prefix: str = VAE_PREFIX) -> VAEConfig:
    """Autoencoder hyperparameters from its weight shapes."""
    channels = _shape(sd, f"{prefix}encoder.conv_in.weight")[0]
    levels = _count(sd, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    mult = tuple(_shape(sd, f"{prefix}encoder.down.{i}.block.0.conv2.weight")[0] // channels for i in range(levels))
    return VAEConfig(in_channels=_shape(sd, f"{prefix}encoder.conv_in.weight")[1],
                     out_channels=_shape(sd, f"{prefix}decoder.conv_out.weight")[0], channels=channels,
                     channel_mult=mult,
                     num_res_blocks=_count(sd, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\."),
                     latent_channels=_shape(sd, f"{prefix}post_quant_conv.weight")[0])


def infer_text_config(sd: Mapping[str, torch.Tensor], prefix: str = TEXT_PREFIX) -> CLIPTextConfig:
    """CLIP text-encoder hyperparameters from its weight shapes (64-channel heads by convention)."""
    vocab, hidden = _shape(sd, f"{prefix}text_model.embeddings.token_embedding.weight")
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden,
        max_position_embeddings=_shape(sd, f"{prefix}text_model.embeddings.position_embedding.weight")[0],
        intermediate_size=_shape(sd, f"{prefix}text_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=_count(sd, re.escape(prefix) + r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, hidden // 64))


def supported_variant(sd: Mapping[str, torch.Tensor]) -> str:
    """`detect_variant`, refusing the architectures minisd recognises but does not run yet."""
    variant = detect_variant(sd)
    if variant not in ("sd1", "sd1-inpaint"):
        name = {"sd2": "SD 2.x", "sdxl": "SDXL"}[variant]
        raise UnsupportedModelError(f"{name} checkpoints are not supported yet (minisd runs SD 1.x)")
    return variant


def infer_config(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The `ModelConfig` of an original-layout state dict (text-encoder keys already normalised)."""
    variant = supported_variant(sd)
    return ModelConfig(variant=variant, unet=infer_unet_config(sd), vae=infer_vae_config(sd),
                       text=infer_text_config(sd))
