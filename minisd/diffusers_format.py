"""The diffusers folder layout (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, SDXL's `text_encoder_2/`):
key names mapped to and from the original checkpoint names by a few structural rules (OpenCLIP towers: see
open_clip_keys.py), and configs to and from `config.json`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import (SIZE_EMBEDDING_DIM, TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, CLIPTextConfig, ModelConfig,
                     OpenCLIPTextConfig, ScheduleConfig, UNetConfig, VAEConfig)
from .config_limits import check_config
from .errors import CheckpointError, UnsupportedModelError
from .open_clip_keys import to_open_clip, to_transformers
from .tokenizer import EOS_TOKEN, write_hf_files

RESNET_UNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
               ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]
RESNET_VAE = [("conv_shortcut.", "nin_shortcut.")]
ATTENTION_VAE = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")]
# Names of diffusers < 0.14, still found in old folders; read-only.
ATTENTION_VAE_LEGACY = [("query.", "q."), ("key.", "k."), ("value.", "v."), ("proj_attn.", "proj_out.")]


def _with_inner(pairs: list[tuple[str, str]], outer: tuple[str, str], inner: list[tuple[str, str]]) -> None:
    pairs.append(outer)
    pairs.extend((outer[0] + a, outer[1] + b) for a, b in inner)


def unet_prefixes(config: UNetConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for every block of a UNet of this shape."""
    levels, blocks = len(config.channel_mult), config.num_res_blocks + 1
    pairs = [("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1."),
             # SDXL's vector conditioning
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]
    _with_inner(pairs, ("mid_block.resnets.0.", "middle_block.0."), RESNET_UNET)
    _with_inner(pairs, ("mid_block.resnets.1.", "middle_block.2."), RESNET_UNET)
    for i in range(levels):
        for j in range(config.num_res_blocks):
            block = 1 + i * blocks + j
            _with_inner(pairs, (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0."), RESNET_UNET)
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1."))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * blocks}.0.op."))
    for i in range(levels):
        level = levels - 1 - i  # up_blocks run from the deepest level upwards
        for j in range(blocks):
            _with_inner(pairs, (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * blocks + j}.0."), RESNET_UNET)
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * blocks + j}.1."))
        if level:
            slot = 2 if level in config.attention_levels else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * blocks + blocks - 1}.{slot}.conv."))
    return pairs


def vae_prefixes(config: VAEConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for every block of an autoencoder of this shape."""
    levels = len(config.channel_mult)
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        _with_inner(pairs, (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."), RESNET_VAE)
        _with_inner(pairs, (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."), RESNET_VAE)
        _with_inner(pairs, (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
                    ATTENTION_VAE + ATTENTION_VAE_LEGACY)
    for i in range(levels):
        for j in range(config.num_res_blocks):
            _with_inner(pairs, (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."), RESNET_VAE)
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        level = levels - 1 - i
        for j in range(config.num_res_blocks + 1):
            _with_inner(pairs, (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{level}.block.{j}."), RESNET_VAE)
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{level}.upsample.conv."))
    return pairs


def rename(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]], to_original: bool) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching prefix; keys that match none are the same in both layouts."""
    src, dst = (0, 1) if to_original else (1, 0)
    table = sorted(pairs, key=lambda p: -len(p[src]))
    if not to_original:  # the legacy names are for reading only
        table = [p for p in table if not any(p[0].endswith(old) for old, _ in ATTENTION_VAE_LEGACY)]
    out = {}
    for key, value in state.items():
        for pair in table:
            if key.startswith(pair[src]):
                key = pair[dst] + key[len(pair[src]):]
                break
        out[key] = value
    return out


def _vae_attention_shapes(state: dict[str, torch.Tensor], to_original: bool) -> dict[str, torch.Tensor]:
    """diffusers stores the mid-block attention projections as linear (C, C), CompVis as 1×1 conv (C, C, 1, 1)."""
    out = {}
    for key, value in state.items():
        if ".mid.attn_1." in key or ".mid_block.attentions." in key:
            if key.endswith(".weight") and not key.split(".")[-2].startswith(("norm", "group_norm")):
                value = value.reshape(*value.shape[:2], 1, 1) if to_original else value.reshape(value.shape[:2])
        out[key] = value
    return out


# ---- configs ------------------------------------------------------------------------------------------------

def unet_config_json(c: UNetConfig, sample_size: int = 64) -> dict:
    levels = range(len(c.channel_mult))
    # diffusers' mid block takes the last entry's depth; levels without attention ignore theirs.
    depths = [c.depth(i) if i in c.attention_levels else c.middle_depth for i in levels]
    depths[-1] = c.middle_depth
    extra = {}
    if c.adm_in_channels:
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": c.adm_in_channels}
    return extra | {
        "_class_name": "UNet2DConditionModel", "in_channels": c.in_channels, "out_channels": c.out_channels,
        "block_out_channels": [c.model_channels * m for m in c.channel_mult], "layers_per_block": c.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in reversed(levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": c.context_dim,
        # diffusers' historical misnomer: for SD 1.x "attention_head_dim" holds the number of heads.
        # SD 2.x/XL: fixed 64-channel heads are a head count per level there.
        "attention_head_dim": [c.heads(c.model_channels * m) for m in c.channel_mult] if c.head_channels
        else c.num_heads, "norm_num_groups": c.norm_groups,
        "use_linear_projection": c.use_linear_projection,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5, "center_input_sample": False,
        "sample_size": sample_size,  # latent size: diffusers' default image size is this × 8
    }


def vae_config_json(c: VAEConfig) -> dict:
    n = len(c.channel_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.out_channels,
            "block_out_channels": [c.channels * m for m in c.channel_mult], "layers_per_block": c.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "latent_channels": c.latent_channels, "norm_num_groups": c.norm_groups, "act_fn": "silu",
            "scaling_factor": c.scaling_factor, "sample_size": 512}


def text_config_json(c: CLIPTextConfig) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
            "layer_norm_eps": c.layer_norm_eps, "projection_dim": c.hidden_size,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def open_clip_config_json(c: OpenCLIPTextConfig, layers: int | None = None, with_projection: bool = False) -> dict:
    """transformers' CLIP text config of an OpenCLIP text tower, as diffusers' folders have it: SD 2.x's keeps
    `layers` = all but the last layer (its conditioning is the penultimate one), SDXL's bigG all of them."""
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": c.vocab_size, "hidden_size": c.width,
            "intermediate_size": c.mlp_width, "num_hidden_layers": c.layers if layers is None else layers,
            "num_attention_heads": c.heads, "max_position_embeddings": c.context_length, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "projection_dim": c.projection_dim, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1}


def scheduler_config_json(c: ScheduleConfig) -> dict:
    return {"_class_name": "PNDMScheduler", "beta_start": c.beta_start, "beta_end": c.beta_end,
            "num_train_timesteps": c.num_train_timesteps, "beta_schedule": c.beta_schedule,
            "prediction_type": c.prediction_type, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1}


def _unet_config(raw: dict) -> UNetConfig:
    widths = raw["block_out_channels"]
    attention = tuple(i for i, t in enumerate(raw["down_block_types"]) if "CrossAttn" in t)
    heads = raw.get("num_attention_heads") or raw.get("attention_head_dim", 8)
    num_heads, head_channels = (heads[0] if isinstance(heads, list) else heads), None
    if isinstance(heads, list) and len({w // h for w, h in zip(widths, heads)}) == 1:
        num_heads, head_channels = 8, widths[0] // heads[0]  # SD 2.x/XL: a head count per level, 64 channels each
    # per level (diffusers' mid block takes the last entry); levels without attention get 0, as a file's
    # inferred config has them (config.infer_unet_config)
    depths = raw.get("transformer_layers_per_block", 1)
    depths = depths if isinstance(depths, list) else [depths] * len(widths)
    middle = depths[-1]
    level_depths = [depths[i] if i in attention else 0 for i in range(len(widths))]
    same = len({level_depths[i] for i in attention} | {middle}) == 1
    adm = raw.get("projection_class_embeddings_input_dim") or 0
    if raw.get("addition_embed_type") not in (None, "text_time") or (
            adm and raw.get("addition_time_embed_dim", SIZE_EMBEDDING_DIM) != SIZE_EMBEDDING_DIM):
        raise ValueError(f"addition_embed_type {raw.get('addition_embed_type')!r} / addition_time_embed_dim "
                         f"{raw.get('addition_time_embed_dim')!r} is not SDXL's text_time with 256 channels")
    return UNetConfig(in_channels=raw.get("in_channels", 4), out_channels=raw.get("out_channels", 4),
                      model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
                      num_res_blocks=raw.get("layers_per_block", 2), attention_levels=attention,
                      num_heads=num_heads, head_channels=head_channels,
                      transformer_depth=middle if same else tuple(level_depths),
                      transformer_depth_middle=None if same or middle == level_depths[-1] else middle,
                      context_dim=raw.get("cross_attention_dim", 768),
                      use_linear_projection=bool(raw.get("use_linear_projection", False)),
                      norm_groups=raw.get("norm_num_groups", 32),
                      adm_in_channels=adm if raw.get("addition_embed_type") == "text_time" else 0)


def _vae_config(raw: dict) -> VAEConfig:
    widths = raw["block_out_channels"]
    return VAEConfig(in_channels=raw.get("in_channels", 3), out_channels=raw.get("out_channels", 3),
                     channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
                     num_res_blocks=raw.get("layers_per_block", 2), latent_channels=raw.get("latent_channels", 4),
                     norm_groups=raw.get("norm_num_groups", 32), scaling_factor=raw.get("scaling_factor", 0.18215))


def _text_config(raw: dict) -> CLIPTextConfig:
    defaults = CLIPTextConfig()
    return CLIPTextConfig(**{f: raw.get(f, getattr(defaults, f)) for f in defaults.__dataclass_fields__})


def _open_clip_config(raw: dict, dropped_last_layers: int) -> OpenCLIPTextConfig:
    """An OpenCLIP tower stored as a transformers CLIP text model; no `logit_scale` survives that layout."""
    width = raw["hidden_size"]
    return OpenCLIPTextConfig(vocab_size=raw.get("vocab_size", 49408),
                              context_length=raw.get("max_position_embeddings", 77), width=width,
                              layers=raw["num_hidden_layers"], heads=raw["num_attention_heads"],
                              mlp_width=raw["intermediate_size"],
                              projection_dim=raw.get("projection_dim", width) if not dropped_last_layers else width,
                              dropped_last_layers=dropped_last_layers, has_logit_scale=False)


# ---- folders ------------------------------------------------------------------------------------------------

WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
# The text encoders each family's folder holds: diffusers' component name -> (its class, where its weights go
# in the original layout, below the family's TEXT_PREFIXES entry).
SD1_TEXT = {"text_encoder": ("CLIPTextModel", "")}
SD2_TEXT = {"text_encoder": ("CLIPTextModel", "model.")}
SDXL_TEXT = {"text_encoder": ("CLIPTextModel", "embedders.0.transformer."),
             "text_encoder_2": ("CLIPTextModelWithProjection", "embedders.1.model.")}
SDXL_REFINER_TEXT = {"text_encoder_2": ("CLIPTextModelWithProjection", "embedders.0.model.")}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd1-inpaint": "StableDiffusionInpaintPipeline",
             "sd2": "StableDiffusionPipeline", "sd2-inpaint": "StableDiffusionInpaintPipeline",
             "sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# A diffusers SD 2.x `text_encoder` is the OpenCLIP tower without its last layer (config.OpenCLIPTextConfig).
SD2_FOLDER_DROPS = 1


def text_parts(variant: str) -> dict[str, tuple[str, str]]:
    return {"sd1": SD1_TEXT, "sd2": SD2_TEXT, "sdxl": SDXL_TEXT, "sdxl-refiner": SDXL_REFINER_TEXT}[
        variant.replace("-inpaint", "")]


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_bytes())  # bytes: json detects UTF-8/16/32 itself
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read diffusers config ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; deep nesting recurses
        raise CheckpointError(f"{path}: cannot read diffusers config ({type(e).__name__}: {e})"[:300]) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: diffusers config is not a JSON object")
    return raw


def _parse_config(path: Path, build):
    """`build(raw)` on the JSON object in `path`; a missing key or a value of the wrong kind is a CheckpointError
    (the values are then range-checked as a whole by `config_limits.check_config`)."""
    raw = _read_json(path)
    try:
        return build(raw)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{path}: unusable diffusers config ({type(e).__name__}: {e})"[:300]) from None


def _sharded_weights(index: Path, read_file) -> dict[str, torch.Tensor]:
    """The weights of a sharded component (`….safetensors.index.json` naming a file per key, as diffusers and
    transformers write large networks); only files beside the index are read."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: no weight_map of file names")
    state = {}
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or not (index.parent / name).is_file():
            raise CheckpointError(f"{index}: shard {name[:100]!r} is not a file beside the index")
        state.update(read_file(index.parent / name))
    return state


def _component_weights(folder: Path, name: str, read_file) -> dict[str, torch.Tensor]:
    stem = WEIGHT_FILES[name]
    candidates = [f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.json",
                  "pytorch_model.bin" if name.startswith("text_encoder") else f"{stem}.bin", f"{stem}.fp16.bin"]
    for candidate in candidates:
        if (folder / name / candidate).is_file():
            if candidate.endswith(".index.json"):
                return _sharded_weights(folder / name / candidate, read_file)
            return read_file(folder / name / candidate)
    raise CheckpointError(f"{folder}: diffusers folder has no weights in {name}/ (looked for {', '.join(candidates)})")


def _folder_family(folder: Path) -> str:
    """sd1, sd2 or sdxl, by the folder's text encoders: SDXL has a second one, SD 2.x's is OpenCLIP (exact GELU)."""
    if (folder / "text_encoder_2" / "config.json").is_file():
        return "sdxl"
    text = folder / "text_encoder" / "config.json"
    return "sd2" if text.is_file() and _read_json(text).get("hidden_act") == "gelu" else "sd1"


def read_diffusers_folder(folder: str | os.PathLike, read_file) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """An original-layout state dict (with component prefixes) and the config recorded in the folder.
    `read_file(path)` reads one weights file (safetensors or restricted pickle)."""
    folder = Path(folder)
    family = _folder_family(folder)
    if family == "sdxl":  # the refiner has no CLIP-L
        variant = "sdxl" if (folder / "text_encoder" / "config.json").is_file() else "sdxl-refiner"
    else:
        variant = family
    texts = text_parts(variant)
    for part in ("unet", "vae", *texts):
        if not (folder / part / "config.json").is_file():
            raise CheckpointError(f"{folder}: not a diffusers Stable Diffusion folder (no {part}/config.json)")
    unet_cfg = _parse_config(folder / "unet" / "config.json", _unet_config)
    vae_cfg = _parse_config(folder / "vae" / "config.json", _vae_config)
    text_cfg = open_clip_cfg = None
    if family != "sd2" and "text_encoder" in texts:
        text_cfg = _parse_config(folder / "text_encoder" / "config.json", _text_config)
    if family == "sd2":
        open_clip_cfg = _parse_config(folder / "text_encoder" / "config.json",
                                      lambda raw: _open_clip_config(raw, SD2_FOLDER_DROPS))
    elif family == "sdxl":
        open_clip_cfg = _parse_config(folder / "text_encoder_2" / "config.json", lambda raw: _open_clip_config(raw, 0))
    schedule = ScheduleConfig()
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        schedule = _parse_config(folder / "scheduler" / "scheduler_config.json", lambda raw: ScheduleConfig(
            **{f: raw[f] for f in schedule.__dataclass_fields__ if f in raw}))
    if unet_cfg.in_channels not in ((4,) if family == "sdxl" else (4, 9)):  # as config.detect_variant refuses files
        raise UnsupportedModelError(f"{folder}: a UNet with {unet_cfg.in_channels} input channels "
                                    f"({FAMILY_NAMES[family]}) is not supported")
    if unet_cfg.in_channels == 9:
        variant += "-inpaint"
    # the size it was trained at: the UNet's latent `sample_size` × 8 (SD 2.x 768-v: 96), else as for a single file
    sample_size = _read_json(folder / "unet" / "config.json").get("sample_size")
    image_size = sample_size * 8 if isinstance(sample_size, int) and not isinstance(sample_size, bool) else {
        "sd1": 512, "sd2": 768 if schedule.prediction_type == "v_prediction" else 512, "sdxl": 1024}[family]
    # checked before the key tables are built from it and the weights are read
    config = check_config(ModelConfig(variant=variant, image_size=image_size, unet=unet_cfg, vae=vae_cfg,
                                      text=text_cfg, schedule=schedule, open_clip=open_clip_cfg), str(folder))
    state = {}
    unet = rename(_component_weights(folder, "unet", read_file), unet_prefixes(unet_cfg), to_original=True)
    state.update({UNET_PREFIX + k: v for k, v in unet.items()})
    vae = _vae_attention_shapes(rename(_component_weights(folder, "vae", read_file), vae_prefixes(vae_cfg),
                                       to_original=True), to_original=True)
    state.update({VAE_PREFIX + k: v for k, v in vae.items()})
    for part, (kind, slot) in texts.items():
        weights = _component_weights(folder, part, read_file)
        if slot.endswith("model."):  # an OpenCLIP tower
            weights = to_open_clip(weights, f"{folder / part}")
        prefix = TEXT_PREFIXES[family] + slot
        state.update({prefix + k: v for k, v in weights.items()})
    return state, config


def scheduler_for(config: ModelConfig) -> tuple[str, dict]:
    """The scheduler a folder of this family names: SDXL's folders have Euler, SD 1.x/2.x's PNDM."""
    if config.family != "sdxl":
        return "PNDMScheduler", scheduler_config_json(config.schedule)
    c = config.schedule
    return "EulerDiscreteScheduler", {
        "_class_name": "EulerDiscreteScheduler", "beta_start": c.beta_start, "beta_end": c.beta_end,
        "num_train_timesteps": c.num_train_timesteps, "beta_schedule": c.beta_schedule,
        "prediction_type": c.prediction_type, "interpolation_type": "linear", "use_karras_sigmas": False,
        "timestep_spacing": "leading", "steps_offset": 1}


def write_diffusers_folder(folder: str | os.PathLike, unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor],
                           text: dict[str, torch.Tensor], config: ModelConfig, write_file) -> None:
    """Write component state dicts (original names, no prefixes; `text` below the family's TEXT_PREFIXES entry)
    as a diffusers folder. SD 2.x's text encoder keeps all but its last layer, as diffusers' own conversion."""
    folder = Path(folder)
    parts = {
        "unet": (rename(unet, unet_prefixes(config.unet), to_original=False),
                 unet_config_json(config.unet, sample_size=config.image_size // 8)),
        "vae": (_vae_attention_shapes(rename(vae, vae_prefixes(config.vae), to_original=False), to_original=False),
                vae_config_json(config.vae)),
    }
    index = {"_class_name": PIPELINES[config.variant], "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    tokenizers: dict[str, str] = {}  # tokenizer folder -> its pad token
    for part, (kind, slot) in text_parts(config.variant).items():
        weights = {k[len(slot):]: v for k, v in text.items() if k.startswith(slot)}
        if not slot.endswith("model."):  # CLIP-L: transformers' layout already
            parts[part] = (weights, text_config_json(config.text))
            tokenizers[part.replace("text_encoder", "tokenizer")] = EOS_TOKEN
            index[part] = ["transformers", kind]
            continue
        c = config.open_clip
        # SD 2.x conditions on the penultimate layer of the original tower: the folder keeps up to that layer
        keep = c.layers + c.dropped_last_layers - 1 if config.family == "sd2" else c.layers
        if keep > c.layers or config.family == "sdxl" and c.dropped_last_layers:
            raise CheckpointError(f"{folder}: this model's text encoder lacks {c.dropped_last_layers} of its last "
                                  "layers, more than a diffusers folder can do without; write a .safetensors file")
        with_projection = kind == "CLIPTextModelWithProjection"
        parts[part] = (to_transformers(weights, keep, with_projection),
                       open_clip_config_json(c, layers=keep, with_projection=with_projection))
        tokenizers[part.replace("text_encoder", "tokenizer")] = "!"
        index[part] = ["transformers", kind]
    for name, (weights, cfg) in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(cfg, indent=2))
        write_file(weights, folder / name / f"{WEIGHT_FILES[name]}.safetensors")
    for name, pad in tokenizers.items():
        write_hf_files(folder / name, pad_token=pad)
        index[name] = ["transformers", "CLIPTokenizer"]
    scheduler, scheduler_config = scheduler_for(config)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index["scheduler"] = ["diffusers", scheduler]
    if config.family == "sdxl":
        # minisd, as A1111, encodes an empty negative prompt as zeros (context and pooled) for both models
        index |= {"text_encoder": index.get("text_encoder", [None, None]),
                  "tokenizer": index.get("tokenizer", [None, None]), "image_encoder": [None, None],
                  "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True}
        if config.variant == "sdxl-refiner":
            index["requires_aesthetics_score"] = True
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
