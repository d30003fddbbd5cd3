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
class OpenCLIPTextConfig:
    """OpenCLIP text transformer (SD 2.x: ViT-H/14, 1024 wide, 24 layers; SDXL: ViT-bigG/14, 1280 wide,
    32 layers): exact-GELU MLPs, fused `in_proj` attention, `text_projection` for the pooled output."""
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    projection_dim: int = 1024
    # A tower converted to transformers' layout (diffusers' SD 2.x `text_encoder/`, and files written from one)
    # lacks the original's last `dropped_last_layers` layers: SD 2.x conditions on the penultimate layer, so
    # diffusers keeps 23 of ViT-H's 24. Without the last layer there is no pooled output, so no `text_projection`.
    dropped_last_layers: int = 0
    has_logit_scale: bool = True  # CLIP's unused temperature: transformers' CLIP text models have no place for it


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
    transformer_depth: int | tuple[int, ...] = 1  # per level for SDXL (0, 2, 10)
    context_dim: int = 768
    use_linear_projection: bool = False
    norm_groups: int = 32
    transformer_depth_middle: int | None = None  # None: the deepest level's depth
    adm_in_channels: int = 0  # SDXL: width of the pooled-text + size vector fed through `label_emb`

    def heads(self, channels: int) -> int:
        return channels // self.head_channels if self.head_channels else self.num_heads

    def depth(self, level: int) -> int:
        """Transformer blocks per spatial transformer at down-sampling `level`."""
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]

    @property
    def middle_depth(self) -> int:
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return self.depth(len(self.channel_mult) - 1)


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
    """A whole latent diffusion model: the three networks and their schedule. The text encoders: `text` (CLIP
    ViT-L) for SD 1.x, `open_clip` for SD 2.x, both for SDXL base, `open_clip` alone for the SDXL refiner."""
    variant: str = "sd1"
    image_size: int = 512  # the resolution it was trained at: the default width and height of its images
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig | None = field(default_factory=CLIPTextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    open_clip: OpenCLIPTextConfig | None = None

    @property
    def family(self) -> str:
        """sd1, sd2 or sdxl: which text conditioning the model takes (`variant` names the exact kind)."""
        return self.variant.split("-")[0]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)

        def build(kind, values):
            known = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})

        text, open_clip = raw.get("text", {}), raw.get("open_clip")
        return cls(variant=raw.get("variant", "sd1"), image_size=raw.get("image_size", 512),
                   unet=build(UNetConfig, raw.get("unet", {})),
                   vae=build(VAEConfig, raw.get("vae", {})),
                   text=None if text is None else build(CLIPTextConfig, text),
                   schedule=build(ScheduleConfig, raw.get("schedule", {})),
                   open_clip=None if open_clip is None else build(OpenCLIPTextConfig, open_clip))


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


# SD 2.x: linear projections, 64-channel heads, OpenCLIP ViT-H context (1024 wide).
SD2_UNET = UNetConfig(head_channels=64, context_dim=1024, use_linear_projection=True)
V_PREDICTION = ScheduleConfig(prediction_type="v_prediction")
# SDXL: three levels, transformers only at the lower two (2 and 10 blocks deep), CLIP-L + bigG context (2048),
# pooled bigG text + 6 size numbers (256 channels each) added to the timestep embedding.
OPEN_CLIP_BIGG = OpenCLIPTextConfig(width=1280, layers=32, heads=20, mlp_width=5120, projection_dim=1280)
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
SIZE_EMBEDDING_DIM = 256  # channels of each sinusoidally embedded SDXL size/crop/score number
SDXL_UNET = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), head_channels=64, transformer_depth=(0, 2, 10),
                       context_dim=2048, use_linear_projection=True, adm_in_channels=1280 + 6 * SIZE_EMBEDDING_DIM)
# The refiner: 384 channels, four levels, 4-deep transformers at levels 1 and 2 and in the middle, bigG context
# alone; its vector has pooled text + 5 numbers (original size, crop, aesthetic score).
SDXL_REFINER_UNET = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(1, 2), head_channels=64,
                               transformer_depth=4, context_dim=1280,
                               use_linear_projection=True, adm_in_channels=1280 + 5 * SIZE_EMBEDDING_DIM)

_TINY_VAE = VAEConfig(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
_TINY_TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
_TINY_OPEN_CLIP = OpenCLIPTextConfig(width=32, layers=3, heads=2, mlp_width=64, projection_dim=32)

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
    "sd2": ModelConfig(variant="sd2", image_size=768, unet=SD2_UNET, text=None, open_clip=OpenCLIPTextConfig(),
                       schedule=V_PREDICTION),
    "sd2-base": ModelConfig(variant="sd2", unet=SD2_UNET, text=None, open_clip=OpenCLIPTextConfig()),
    "sd2-inpaint": ModelConfig(variant="sd2-inpaint", unet=dataclasses.replace(SD2_UNET, in_channels=9), text=None,
                               open_clip=OpenCLIPTextConfig()),
    "sdxl": ModelConfig(variant="sdxl", image_size=1024, unet=SDXL_UNET, vae=SDXL_VAE, open_clip=OPEN_CLIP_BIGG),
    "sdxl-refiner": ModelConfig(variant="sdxl-refiner", image_size=1024, unet=SDXL_REFINER_UNET, vae=SDXL_VAE,
                                text=None, open_clip=OPEN_CLIP_BIGG),
    # Tiny versions of each family for tests: every structural feature, millisecond widths.
    "tiny-sd2": ModelConfig(
        variant="sd2", unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), head_channels=8,
                                       context_dim=32, use_linear_projection=True, norm_groups=8),
        vae=_TINY_VAE, text=None, open_clip=_TINY_OPEN_CLIP),
    "tiny-sdxl": ModelConfig(
        variant="sdxl", unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(1, 2),
                                        head_channels=8, transformer_depth=(0, 1, 2), context_dim=64,
                                        use_linear_projection=True, norm_groups=8,
                                        adm_in_channels=32 + 6 * SIZE_EMBEDDING_DIM),
        vae=dataclasses.replace(_TINY_VAE, scaling_factor=0.13025), text=_TINY_TEXT, open_clip=_TINY_OPEN_CLIP),
    "tiny-sdxl-refiner": ModelConfig(
        variant="sdxl-refiner", unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), attention_levels=(1, 2),
                                                head_channels=8, transformer_depth=2, context_dim=32,
                                                use_linear_projection=True, norm_groups=8,
                                                adm_in_channels=32 + 5 * SIZE_EMBEDDING_DIM),
        vae=dataclasses.replace(_TINY_VAE, scaling_factor=0.13025), text=None, open_clip=_TINY_OPEN_CLIP),
}

# Checkpoint key prefixes of the original (CompVis) single-file layout.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# The text encoders' prefixes per family: SD 2.x keeps OpenCLIP under `cond_stage_model.model.`, SDXL its
# embedders (CLIP-L `0.transformer.`, bigG `1.model.`; the refiner's bigG `0.model.`) under `conditioner.`.
TEXT_PREFIXES = {"sd1": TEXT_PREFIX, "sd2": "cond_stage_model.", "sdxl": "conditioner."}

# Architectures recognised by marker keys and refused by name (with or without the `model.diffusion_model.`
# prefix, as single files and bare transformer files store them).
UNSUPPORTED_FAMILIES = [
    ("SD 3 / 3.5", ("joint_blocks.0.context_block.adaLN_modulation.1.bias",)),
    ("Flux", ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight")),
    ("Stable Cascade", ("clip_txt_mapper.weight", "down_blocks.1.0.channelwise.0.weight")),
    ("AuraFlow", ("double_layers.0.attn.w2q.weight",)),
    ("PixArt", ("t_block.1.weight", "blocks.0.cross_attn.q_linear.weight")),
    ("Hunyuan-DiT", ("mlp_t5.0.weight",)),
    ("Stable Video Diffusion", ("model.diffusion_model.input_blocks.1.0.time_stack.in_layers.0.weight",)),
]


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise UnsupportedModelError(f"missing key {key}: not a complete Stable Diffusion checkpoint")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct integers matched by the `(\\d+)` group of `pattern` over the keys."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := regex.match(k))})


def unsupported_family(keys) -> str | None:
    """The name of a known architecture that minisd does not run, recognised by its marker keys."""
    keys = set(keys)
    for name, markers in UNSUPPORTED_FAMILIES:
        if any(m in keys or UNET_PREFIX + m in keys for m in markers):
            return name
    return None


def detect_variant(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the architecture of an original-layout state dict: sd1, sd1-inpaint, sd2, sd2-inpaint, sdxl,
    sdxl-refiner; raises UnsupportedModelError naming other known families."""
    keys = sd.keys()
    other = unsupported_family(keys)
    if other:
        raise UnsupportedModelError(f"{other} checkpoints are not supported (minisd runs SD 1.x, SD 2.x and SDXL)")
    first = f"{UNET_PREFIX}input_blocks.0.0.weight"
    if first not in sd:
        raise UnsupportedModelError(
            "not a Stable Diffusion checkpoint: no UNet weights (model.diffusion_model.input_blocks.0.0.weight)")
    channels = sd[first].shape[1]
    if f"{UNET_PREFIX}label_emb.0.0.weight" in sd or any(k.startswith("conditioner.embedders.") for k in keys):
        # the refiner's first embedder is bigG (OpenCLIP `model.`), the base's is CLIP-L (`transformer.`)
        family = "sdxl-refiner" if any(k.startswith("conditioner.embedders.0.model.") for k in keys) else "sdxl"
        if channels != 4:
            raise UnsupportedModelError(f"SDXL UNet with {channels} input channels is not supported")
        return family
    proj_in = f"{UNET_PREFIX}input_blocks.1.1.proj_in.weight"
    sd2 = any(k.startswith("cond_stage_model.model.") for k in keys) or (proj_in in sd and len(sd[proj_in].shape) == 2)
    name = "SD 2.x" if sd2 else "SD 1.x"
    if channels == 4:
        return "sd2" if sd2 else "sd1"
    if channels == 9:
        return "sd2-inpaint" if sd2 else "sd1-inpaint"
    kind = {5: "a depth-conditioned model", 7: "the x4 upscaler", 8: "an instruct-pix2pix model"}.get(
        channels, f"a UNet with {channels} input channels")
    raise UnsupportedModelError(f"{kind} ({name}) is not supported")


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
    depths = [0] * levels
    for level in attention:
        st = f"{prefix}input_blocks.{1 + level * (num_res_blocks + 1)}.1."
        depths[level] = _count(sd, re.escape(st) + r"transformer_blocks\.(\d+)\.")
    middle = _count(sd, re.escape(prefix) + r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if attention:
        st = f"{prefix}input_blocks.{1 + attention[0] * (num_res_blocks + 1)}.1."
        context_dim = _shape(sd, st + "transformer_blocks.0.attn2.to_k.weight")[1]
        linear = len(_shape(sd, st + "proj_in.weight")) == 2
    if len({depths[level] for level in attention} | {middle}) == 1:
        depth, middle_override = middle, None  # SD 1.x/2.x: one depth everywhere
    else:
        depth = tuple(depths)
        middle_override = None if middle == depths[-1] else middle
    label = f"{prefix}label_emb.0.0.weight"
    return UNetConfig(in_channels=in_channels, out_channels=_shape(sd, f"{prefix}out.2.weight")[0],
                      model_channels=model_channels, channel_mult=tuple(mult), num_res_blocks=num_res_blocks,
                      attention_levels=tuple(attention), transformer_depth=depth, context_dim=context_dim,
                      use_linear_projection=linear, transformer_depth_middle=middle_override,
                      # SD 2.x and SDXL use 64-channel heads (their linear projections tell them from SD 1.x)
                      head_channels=64 if linear else None,
                      adm_in_channels=_shape(sd, label)[1] if label in sd else 0)


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


def infer_open_clip_config(sd: Mapping[str, torch.Tensor], prefix: str) -> OpenCLIPTextConfig:
    """OpenCLIP text-transformer hyperparameters from its weight shapes (64-channel heads, as ViT-H and bigG)."""
    vocab, width = _shape(sd, f"{prefix}token_embedding.weight")
    layers = _count(sd, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    # ViT-H with 23 layers: an SD 2.x file written back from a diffusers folder (diffusers' conversion script),
    # whose text encoder kept all but the last layer. A1111 runs such files: its default, the penultimate
    # layer of the 24, is the 23rd, the last one stored.
    dropped = 1 if (width, layers) == (1024, 23) else 0
    projection = f"{prefix}text_projection"
    return OpenCLIPTextConfig(
        vocab_size=vocab, width=width, context_length=_shape(sd, f"{prefix}positional_embedding")[0],
        layers=layers, heads=max(1, width // 64),
        mlp_width=_shape(sd, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight")[0],
        projection_dim=_shape(sd, projection)[1] if projection in sd or not dropped else width,
        dropped_last_layers=dropped, has_logit_scale=f"{prefix}logit_scale" in sd)


def supported_variant(sd: Mapping[str, torch.Tensor]) -> str:
    """`detect_variant`: the architecture, or UnsupportedModelError naming a family minisd does not run."""
    return detect_variant(sd)


def infer_config(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The `ModelConfig` of an original-layout state dict (text-encoder keys already normalised). SD 2.x is
    taken as ε-prediction here: the keys do not show v-prediction (checkpoint.py decides that)."""
    variant = supported_variant(sd)
    unet, vae = infer_unet_config(sd), infer_vae_config(sd)
    family = variant.split("-")[0]
    if family == "sd1":
        return ModelConfig(variant=variant, unet=unet, vae=vae, text=infer_text_config(sd))
    if family == "sd2":
        return ModelConfig(variant=variant, unet=unet, vae=vae, text=None,
                           open_clip=infer_open_clip_config(sd, "cond_stage_model.model."))
    vae = dataclasses.replace(vae, scaling_factor=SDXL_VAE.scaling_factor)
    if variant == "sdxl-refiner":
        return ModelConfig(variant=variant, image_size=1024, unet=unet, vae=vae, text=None,
                           open_clip=infer_open_clip_config(sd, "conditioner.embedders.0.model."))
    return ModelConfig(variant=variant, image_size=1024, unet=unet, vae=vae,
                       text=infer_text_config(sd, "conditioner.embedders.0.transformer."),
                       open_clip=infer_open_clip_config(sd, "conditioner.embedders.1.model."))
