"""Loading Stable Diffusion weights: single-file .safetensors (memory-mapped) and .ckpt (restricted
unpickler), diffusers folders; EMA choice, a prefix split and a strict load into modules built on the
`meta` device, so no random initialisation and no second copy of the weights ever exists."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import (TEXT_PREFIX, TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, ModelConfig, infer_config,
                     supported_variant)
from .config_limits import check_config, check_tensor_counts, config_from_json
from .diffusers_format import is_diffusers_folder, read_diffusers_folder, write_diffusers_folder
from .errors import CheckpointError
from .models.conditioner import text_encoder_for
from .models.unet import UNetModel
from .models.vae import AutoencoderKL
from .pickle_file import CONVERT_HINT, read_pickle_checkpoint
from .precision import STORED, default_dtype, memory_format
from .safetensors_file import SafetensorsFile, write_safetensors

CONFIG_METADATA_KEY = "minisd_config"
DEMO_MODEL = Path(__file__).parent / "assets" / "demo.safetensors"

# Root buffers of the CompVis `LatentDiffusion` (the training schedule, recomputed by schedule.py) and other
# entries known to be harmless; everything else that is not a component weight is an error.
IGNORED_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
                "model_ema.decay", "model_ema.num_updates",
                # SDXL: sgm's discrete σ table (recomputed); ComfyUI's markers of v-prediction / zero terminal SNR
                "denoiser.sigmas", "v_pred", "ztsnr"}
PREDICTIONS = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
POSITION_IDS = "text_model.embeddings.position_ids"
OPEN_CLIP_LINEAR_PROJECTION = "model.text_projection.weight"
EMA_PREFIX = "model_ema."
MAX_NESTING = 8  # levels of {"state_dict": {...}} unwrapped in pickle checkpoints
LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"


@dataclass
class Components:
    """The three networks of one checkpoint, loaded, with the config they were built from."""
    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: nn.Module  # CLIPTextModel (SD 1.x), SD2TextEncoder, SDXLTextEncoders (models/conditioner.py)
    has_ema: bool
    source: Path | None


def no_release(tensor: torch.Tensor) -> None:
    """For weights that are not memory-mapped: nothing to give back."""


def read_weights_file(path: str | os.PathLike, allow_pickle: bool = True
                      ) -> tuple[dict[str, torch.Tensor], dict, Callable[[torch.Tensor], None]]:
    """Tensors, safetensors metadata and a page-release function of one weights file, its format sniffed
    from its first bytes."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, but not a diffusers model (no model_index.json)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(len(LFS_MAGIC))
    if head.startswith(LFS_MAGIC):
        raise CheckpointError(f"{path}: a Git LFS pointer, not the weights (fetch them with `git lfs pull`)")
    if head.startswith(b"PK\x03\x04"):
        if not allow_pickle:
            raise CheckpointError(f"{path}: a pickle checkpoint and allow_pickle=False; {CONVERT_HINT}")
        state = read_pickle_checkpoint(path)
        for _ in range(MAX_NESTING):  # bounded: a pickle can hold a dict that is its own "state_dict"
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise CheckpointError(f"{path}: the checkpoint holds no state dict of tensors")
        return state, {}, no_release
    if head[:1] == b"\x80" and head[8:9] != b"{":  # a safetensors header's length can start with 0x80 too
        raise CheckpointError(f"{path}: a legacy (non-zip) pickle, refused because it cannot be loaded safely; "
                              f"re-save it with a current PyTorch, or {CONVERT_HINT}")
    file = SafetensorsFile(path)
    return file.tensors(), file.metadata, file.release


def _clip_name(name: str) -> str | None:
    """A CLIP-L key below its `transformer.` level, normalised; None for the `position_ids` to drop."""
    # Newer transformers and NovelAI-era files drop the `text_model.` level.
    name = name if name.startswith("text_model.") else "text_model." + name
    return None if name == POSITION_IDS else name  # recomputed: community files store it as float or corrupt it


def _open_clip_entry(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """An OpenCLIP tower's key and tensor, normalised; None for a buffer to drop. Single files written from
    diffusers folders (diffusers' `convert_diffusers_to_original_sdxl.py`) keep transformers' names for two
    entries: the projection as a Linear weight (`text_projection.weight` = OpenCLIP's `text_projection`ᵀ) and,
    from older transformers, the `position_ids` buffer (recomputed)."""
    if name.endswith(OPEN_CLIP_LINEAR_PROJECTION):
        return name[:-len(".weight")], value.T.contiguous()
    if name.endswith(POSITION_IDS):
        return None
    return name, value


def split_components(state: dict[str, torch.Tensor], use_ema: bool = True, text_prefix: str = TEXT_PREFIX
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
    """UNet, VAE and text-encoder state dicts (original names, prefixes removed) and whether EMA weights
    were used. Raises on any key that belongs to none of them and is not known to be harmless.
    `text_prefix` is the family's (config.TEXT_PREFIXES): SD 2.x and SDXL keep their encoders elsewhere."""
    unet, vae, text, ema, unexpected = {}, {}, {}, {}, []
    sdxl_clip = "embedders.0.transformer."
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX):]] = value
        elif key.startswith(text_prefix):
            name = key[len(text_prefix):]
            if text_prefix == TEXT_PREFIX:
                name = _clip_name(name)
            elif name.startswith(sdxl_clip):
                inner = _clip_name(name[len(sdxl_clip):])
                name = None if inner is None else sdxl_clip + inner
            elif entry := _open_clip_entry(name, value):
                name, value = entry
            else:
                name = None
            if name is not None:
                text[name] = value
        elif key in IGNORED_KEYS:
            continue
        elif key.startswith(EMA_PREFIX):
            ema[key[len(EMA_PREFIX):]] = value
        else:
            unexpected.append(key)
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise CheckpointError(f"unexpected keys {', '.join(unexpected[:3])}{more}")
    # EMA copies are named after the parameter of `model` with its dots removed (CompVis `LitEma`):
    # model.diffusion_model.out.0.weight -> model_ema.diffusion_modelout0weight.
    def ema_name(name: str) -> str:
        return ("diffusion_model." + name).replace(".", "")

    use = use_ema and bool(ema) and all(ema_name(name) in ema for name in unet)
    if use:
        unet = {name: ema[ema_name(name)] for name in unet}
    return unet, vae, text, use


def assign_weights(module: nn.Module, weights: dict[str, torch.Tensor], component: str,
                   convert: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Strictly load `weights` into `module` (built on `meta`), converting each tensor as it goes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing:
        raise CheckpointError(f"{component}: missing {len(missing)} keys, e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise CheckpointError(f"{component}: unexpected keys {', '.join(unexpected[:3])}")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise CheckpointError(f"{component}: shape mismatch for {key}: checkpoint has "
                                  f"{list(weights[key].shape)}, the model expects {list(shape)}")
    module.load_state_dict({k: convert(f"{component}.{k}", v) for k, v in weights.items()}, strict=True, assign=True)
    module.eval().requires_grad_(False)


def resolve_source(source: str | os.PathLike) -> Path:
    if str(source) == "demo":
        if not DEMO_MODEL.exists():
            raise CheckpointError("the bundled demo model is not part of this build yet; pass a checkpoint path")
        return DEMO_MODEL
    return Path(source).expanduser()


def load_components(source: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, use_ema: bool = True, allow_pickle: bool = True,
                    config: ModelConfig | None = None, prediction: str | None = None) -> Components:
    """Read a checkpoint file or diffusers folder and build its three networks on `device` in `dtype`: None is
    this machine's compute precision (`precision.default_dtype`), `precision.STORED` keeps each tensor's own.
    `prediction` ("eps" or "v") overrides what the file says or what is inferred (`prediction_type`)."""
    if prediction is not None and prediction not in PREDICTIONS:
        raise CheckpointError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    path = resolve_source(source)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = default_dtype(device)
    release = no_release
    if path.is_dir() and is_diffusers_folder(path):
        state, found_config = read_diffusers_folder(path, lambda p: read_weights_file(p, allow_pickle)[0])
    else:
        state, metadata, release = read_weights_file(path, allow_pickle)
        found_config = config_from_json(metadata[CONFIG_METADATA_KEY], str(path)) if CONFIG_METADATA_KEY in metadata \
            else None
    if found_config is not None and config is None:
        check_tensor_counts(found_config, state, str(path))  # before building networks of the config's size
    try:
        known = config or found_config
        # names another architecture before its keys are called unexpected
        family = known.family if known is not None else supported_variant(state).split("-")[0]
        v_marker = "v_pred" in state  # ComfyUI's marker of a v-prediction file
        text_prefix = TEXT_PREFIXES[family]
        unet_sd, vae_sd, text_sd, used_ema = split_components(state, use_ema, text_prefix)
        del state
        inferred = known is None
        config = known or infer_config(
            {UNET_PREFIX + k: v for k, v in unet_sd.items()} | {VAE_PREFIX + k: v for k, v in vae_sd.items()}
            | {text_prefix + k: v for k, v in text_sd.items()})
        check_config(config, "model config")  # e.g. inferred widths that SD's 32 norm groups do not divide
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None

    # The convolutions' layout for this precision (precision.memory_format), set in the same copy as the cast.
    layout = torch.contiguous_format if dtype == STORED else memory_format(device, dtype)

    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
        keep = dtype == STORED or not tensor.is_floating_point()
        out = tensor.to(device=device, dtype=tensor.dtype if keep else dtype, copy=False,
                        memory_format=layout if tensor.ndim == 4 else torch.preserve_format)
        # min and max propagate NaN and show ±Inf; in the tensor's own dtype they run at memory speed, 20-50×
        # faster than an elementwise isfinite or an fp32 sum (and, unlike a sum, they cannot overflow).
        if out.is_floating_point() and out.numel() and not all(map(torch.isfinite, torch.aminmax(out))):
            raise CheckpointError(f"{path}: {name} contains NaN or Inf values (a damaged checkpoint)")
        if out.data_ptr() != tensor.data_ptr():
            release(tensor)
        return out

    with torch.device("meta"):
        unet, vae, text_encoder = UNetModel(config.unet), AutoencoderKL(config.vae), text_encoder_for(config)
    try:
        assign_weights(unet, unet_sd, "unet", convert)
        assign_weights(vae, vae_sd, "vae", convert)
        assign_weights(text_encoder, text_sd, "text_encoder", convert)
    except CheckpointError as e:
        raise type(e)(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    chosen = PREDICTIONS[prediction] if prediction else None
    if chosen is None and inferred:
        chosen = ("v_prediction" if v_marker or _yaml_says_v(path) or
                  (config.variant == "sd2" and _looks_like_v_prediction(unet)) else None)
    if chosen is not None and chosen != config.schedule.prediction_type:
        config = with_prediction(config, chosen)
    return Components(config, unet, vae, text_encoder, used_ema, path)


def with_prediction(config: ModelConfig, prediction_type: str) -> ModelConfig:
    """`config` with ε- or v-prediction; an SD 2.x v-model's native size is 768 (the 768-v release)."""
    import dataclasses
    size = config.image_size
    if config.variant == "sd2" and size in (512, 768):
        size = 768 if prediction_type == "v_prediction" else 512
    return dataclasses.replace(config, image_size=size,
                               schedule=dataclasses.replace(config.schedule, prediction_type=prediction_type))


def _yaml_says_v(path: Path) -> bool:
    """A1111 reads the model's config from a `.yaml` beside the file: `parameterization: "v"` marks v-models."""
    import re
    yaml = path.with_suffix(".yaml")
    try:
        text = yaml.read_text(errors="replace") if path.is_file() and yaml.is_file() else ""
    except OSError:
        return False
    return re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.MULTILINE) is not None


def _looks_like_v_prediction(unet: UNetModel) -> bool:
    """A1111's test for SD 2.x files that do not say: at t = 999 on a constant latent, a v-model's output lies
    far below its input (v ≈ −x0 there), an ε-model's does not (mean(out − x) < −1, A1111's threshold)."""
    weight = next(unet.parameters())
    with torch.no_grad():
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=weight.device, dtype=weight.dtype)
        context = torch.full((1, 2, unet.config.context_dim), 0.5, device=weight.device, dtype=weight.dtype)
        out = unet(x, torch.tensor([999.0], device=weight.device), context)
    return (out[:, :4].float() - x[:, :4].float()).mean().item() < -1


def original_state_dict(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The three networks' weights under the original single-file key names."""
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    prefix = getattr(text_encoder, "checkpoint_prefix", TEXT_PREFIX)
    state.update({prefix + k: v for k, v in text_encoder.state_dict().items()})
    return state


def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], config: ModelConfig,
                    dtype: torch.dtype | None = None) -> None:
    """Write an original-layout .safetensors (config recorded in its metadata) or, for a path without a
    file suffix, a diffusers folder. Refuses to overwrite an existing file or folder."""
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path}: already exists; not overwriting it")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    state = {k: cast(v) for k, v in state.items()}
    if path.suffix in (".safetensors", ".sft"):
        write_safetensors(state, path, {CONFIG_METADATA_KEY: config.to_json(), "format": "pt"})
    elif path.suffix:
        raise CheckpointError(f"{path}: can only write .safetensors files or diffusers folders (no suffix)")
    else:
        unet, vae, text, _ = split_components(state, use_ema=False, text_prefix=TEXT_PREFIXES[config.family])
        write_diffusers_folder(path, unet, vae, text, config, lambda t, p: write_safetensors(t, p))
