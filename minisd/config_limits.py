"""Checks on a model config read from a file (safetensors `minisd_config` metadata, diffusers `config.json`):
every field of its declared type and within limits far above any real SD model, so that a hostile file gets
one clear `CheckpointError` instead of a crash, or a request for a billion layers, when the model is built."""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing

from .config import PRESETS, ModelConfig
from .errors import CheckpointError

# (low, high) per integer field, and per item of the tuple fields. Real models: SD 1.x/2.x UNets have 4 levels
# of 2 res blocks and depth 1, SDXL 3 levels and depth up to 10; CLIP/OpenCLIP text encoders 12-32 layers.
INT_LIMITS = {
    "in_channels": (1, 64), "out_channels": (1, 64), "latent_channels": (1, 64),
    "model_channels": (1, 4096), "channels": (1, 4096), "channel_mult": (1, 64), "num_res_blocks": (1, 8),
    "num_heads": (1, 1024), "head_channels": (1, 4096), "transformer_depth": (0, 64),
    "transformer_depth_middle": (0, 64), "context_dim": (1, 16384), "adm_in_channels": (0, 16384),
    "norm_groups": (1, 4096), "vocab_size": (1, 1_000_000), "max_position_embeddings": (1, 4096),
    "context_length": (1, 4096), "hidden_size": (1, 16384), "width": (1, 16384), "intermediate_size": (1, 65536),
    "mlp_width": (1, 65536), "projection_dim": (1, 16384), "num_hidden_layers": (1, 128), "layers": (1, 128),
    "num_attention_heads": (1, 1024), "heads": (1, 1024), "num_train_timesteps": (1, 100_000),
    "image_size": (8, 16384),
}
DEFAULT_INT_LIMITS = (0, 65536)  # a field added to config.py later, until it gets its own line above
MAX_LEVELS = 8
FLOAT_LIMITS = {"scaling_factor": (0.0, 100.0), "layer_norm_eps": (0.0, 1.0), "beta_start": (0.0, 1.0),
                "beta_end": (0.0, 1.0)}  # open at the low end: each must be positive
DEFAULT_FLOAT_LIMITS = (-1e6, 1e6)
# The values schedule.py and models/clip.py implement.
CHOICES = {"beta_schedule": ("scaled_linear", "linear"), "prediction_type": ("epsilon", "v_prediction"),
           "hidden_act": ("quick_gelu", "gelu")}


def _value_error(name: str, value, kind) -> str | None:
    """Why `value` is not a valid `name` of type `kind` (an annotation of config.py), or None if it is."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        reasons = [_value_error(name, value, option) for option in typing.get_args(kind)]
        return None if None in reasons else " or ".join(reasons)
    if kind is type(None):
        return None if value is None else "null"
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        low, high = INT_LIMITS.get(name, DEFAULT_INT_LIMITS)
        ok = not isinstance(value, bool) and isinstance(value, int) and low <= value <= high
        return None if ok else f"an integer from {low} to {high}"
    if kind is float:
        low, high = FLOAT_LIMITS.get(name, DEFAULT_FLOAT_LIMITS)
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
            and low < value <= high
        return None if ok else f"a number above {low} and at most {high}"
    if kind is str:
        if name in CHOICES:
            return None if value in CHOICES[name] else f"one of {', '.join(CHOICES[name])}"
        return None if isinstance(value, str) and len(value) <= 256 else "a string"
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        least = 1 if name == "channel_mult" else 0
        if not isinstance(value, tuple) or not least <= len(value) <= MAX_LEVELS \
                or any(_value_error(name, v, item) for v in value):
            return f"a list of {least} to {MAX_LEVELS} items, each " + _value_error(name, None, item)
        return None
    return f"a value of a kind minisd does not read ({kind})"


def _check_section(where: str, section) -> None:
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        reason = _value_error(f.name, value, hints[f.name])
        if reason:
            raise CheckpointError(f"{where}: {type(section).__name__}.{f.name} must be {reason}, "
                                  f"got {json.dumps(value, default=repr)[:60]}")


def sections(config: ModelConfig) -> dict[str, object]:
    """The network and schedule configs of `config` by field name (unet, vae, text, ...), None where absent."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if dataclasses.is_dataclass(getattr(config, f.name)) or getattr(config, f.name) is None}


def check_config(config: ModelConfig, where: str) -> ModelConfig:
    """`config` itself if every value has its type and lies within the limits, and the networks it describes
    can be built (channel counts divisible by the group and head counts); else CheckpointError."""
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            _check_section(where, value)
        elif _value_error(f.name, value, hints[f.name]):
            raise CheckpointError(f"{where}: {f.name} must be {_value_error(f.name, value, hints[f.name])}")
    u, v = config.unet, config.vae

    def refuse(message: str):
        raise CheckpointError(f"{where}: {message}")

    # The variants minisd runs, each with the text encoders its presets have (present or None).
    layouts = {(p.variant, *(value is None for value in sections(p).values())) for p in PRESETS.values()}
    if (config.variant, *(value is None for value in sections(config).values())) not in layouts:
        refuse(f"variant {config.variant!r} with these networks is not one minisd runs "
               f"({', '.join(sorted({layout[0] for layout in layouts}))})")

    widths = [u.model_channels * m for m in u.channel_mult]
    levels = len(widths)
    if any(w % u.norm_groups for w in [u.model_channels, *widths]):
        refuse(f"UNet widths {widths} are not all divisible by norm_groups {u.norm_groups}")
    if len(set(u.attention_levels)) != len(u.attention_levels) or not set(u.attention_levels) <= set(range(levels)):
        refuse(f"attention_levels {list(u.attention_levels)} must be distinct levels of the {levels} UNet levels")
    depth = getattr(u, "transformer_depth", 1)
    if isinstance(depth, tuple) and len(depth) != levels:
        refuse(f"transformer_depth lists {len(depth)} depths for {levels} UNet levels")
    attention_widths = [widths[i] for i in u.attention_levels] + [widths[-1]]  # the middle block has attention
    per_head = u.head_channels or u.num_heads
    if any(w % per_head for w in attention_widths) or u.head_channels and min(attention_widths) < u.head_channels:
        refuse(f"UNet attention widths {attention_widths} are not divisible by "
               f"{'head_channels' if u.head_channels else 'num_heads'} {per_head}")
    vae_widths = [v.channels * m for m in v.channel_mult]
    if any(w % v.norm_groups for w in [v.channels, *vae_widths]):
        refuse(f"VAE widths {vae_widths} are not all divisible by norm_groups {v.norm_groups}")
    for text in (getattr(config, "text", None), getattr(config, "open_clip", None)):
        width, heads = (getattr(text, "hidden_size", getattr(text, "width", 0)),
                        getattr(text, "num_attention_heads", getattr(text, "heads", 1)))
        if text is not None and width % heads:
            refuse(f"text width {width} is not divisible by its {heads} attention heads")
    if getattr(getattr(config, "open_clip", None), "dropped_last_layers", 0) and config.family != "sd2":
        refuse("only an SD 2.x text encoder can lack its last layers (SDXL needs bigG's pooled output)")
    if not config.schedule.beta_start <= config.schedule.beta_end:
        refuse("beta_start must not exceed beta_end")
    return config


def config_from_json(text: object, where: str) -> ModelConfig:
    """The checked `ModelConfig` of the JSON text minisd records in a file's metadata (`ModelConfig.to_json`);
    unknown keys are ignored, as `ModelConfig.from_json` does."""
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: the recorded model config is not a JSON string")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise CheckpointError(f"{where}: the recorded model config is not valid JSON ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: the recorded model config is not a JSON object")
    hints = typing.get_type_hints(ModelConfig)
    for name in sections(ModelConfig()):
        value = raw.get(name, {})
        if not isinstance(value, dict) and not (value is None and _value_error(name, None, hints[name]) is None):
            raise CheckpointError(f"{where}: the recorded model config's {name!r} is not a JSON object")
    try:
        config = ModelConfig.from_json(text)
    except (TypeError, ValueError, AttributeError) as e:  # e.g. a required section missing
        raise CheckpointError(f"{where}: the recorded model config cannot be read ({e})") from None
    return check_config(config, where)


def min_tensor_counts(config: ModelConfig) -> dict[str, int]:
    """A lower bound on the number of weight tensors of each network (a res block has at least 8, a transformer
    block 20, a text-encoder layer 12): a file with fewer cannot fit the config, and is refused before the
    networks are built (building costs time proportional to the config, not to the file)."""
    u, v = config.unet, config.vae
    levels, per_level = len(u.channel_mult), 2 * u.num_res_blocks + 1  # res blocks per level, down and up
    depth = getattr(u, "depth", lambda level: u.transformer_depth)
    middle = getattr(u, "middle_depth", depth(levels - 1))
    blocks = sum(depth(level) for level in u.attention_levels) * per_level + middle
    transformers = len(u.attention_levels) * per_level + 1
    text_layers = sum(getattr(t, "num_hidden_layers", getattr(t, "layers", 0))
                      for t in (getattr(config, "text", None), getattr(config, "open_clip", None)) if t is not None)
    return {"unet": 8 * (levels * per_level + 2) + 20 * blocks + 6 * transformers,
            # resnets: per level the encoder's num_res_blocks and the decoder's one more; 2 mid blocks each
            "vae": 8 * (len(v.channel_mult) * (2 * v.num_res_blocks + 1) + 4),
            "text encoder": 12 * text_layers}


# Where each network's tensors live in an original-layout file.
PREFIXES = {"unet": ("model.diffusion_model.",), "vae": ("first_stage_model.",),
            "text encoder": ("cond_stage_model.", "conditioner.")}


def check_tensor_counts(config: ModelConfig, keys, where: str) -> None:
    """CheckpointError if some network of `config` needs more tensors than the original-layout `keys` hold."""
    counts = dict.fromkeys(PREFIXES, 0)
    for key in keys:
        for name, prefixes in PREFIXES.items():
            if key.startswith(prefixes):
                counts[name] += 1
    for name, needed in min_tensor_counts(config).items():
        if counts[name] < needed:
            raise CheckpointError(f"{where}: the model config needs at least {needed} {name} tensors, "
                                  f"the file has {counts[name]}")
