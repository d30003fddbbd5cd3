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

from .config import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ModelConfig, infer_config, supported_variant
from .diffusers_format import is_diffusers_folder, read_diffusers_folder, write_diffusers_folder
from .errors import CheckpointError
from .models.clip import CLIPTextModel
from .models.unet import UNetModel
from .models.vae import AutoencoderKL
from .pickle_file import CONVERT_HINT, read_pickle_checkpoint
from .safetensors_file import SafetensorsFile, write_safetensors

CONFIG_METADATA_KEY = "minisd_config"
DEMO_MODEL = Path(__file__).parent / "assets" / "demo.safetensors"

# Root buffers of the CompVis `LatentDiffusion` (the training schedule, recomputed by schedule.py) and other
# entries known to be harmless; everything else that is not a component weight is an error.
IGNORED_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
                "model_ema.decay", "model_ema.num_updates"}
POSITION_IDS = "text_model.embeddings.position_ids"
EMA_PREFIX = "model_ema."
LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"


@dataclass
class Components:
    """The three networks of one checkpoint, loaded, with the config they were built from."""
    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    has_ema: bool
    source: Path | None


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles that PyTorch can use (its bf16 matmuls then run several times faster)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)() and getattr(cpu, "_init_amx", lambda: False)())


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; on CPUs bf16 where AMX makes it fast, fp32 elsewhere: measured, on a CPU with AVX-512-BF16
    but no AMX a bf16 UNet step was 1.3× slower than fp32 (bench/README.md)."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else torch.float32


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
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: the checkpoint holds no state dict of tensors")
        return state, {}, no_release
    if head[:1] == b"\x80":
        raise CheckpointError(f"{path}: a legacy (non-zip) pickle, refused because it cannot be loaded safely; "
                              f"re-save it with a current PyTorch, or {CONVERT_HINT}")
    file = SafetensorsFile(path)
    return file.tensors(), file.metadata, file.release


def split_components(state: dict[str, torch.Tensor], use_ema: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
    """UNet, VAE and text-encoder state dicts (original names, prefixes removed) and whether EMA weights
    were used. Raises on any key that belongs to none of them and is not known to be harmless."""
    unet, vae, text, ema, unexpected = {}, {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX):]] = value
        elif key.startswith(TEXT_PREFIX):
            name = key[len(TEXT_PREFIX):]
            # Newer transformers and NovelAI-era files drop the `text_model.` level.
            name = name if name.startswith("text_model.") else "text_model." + name
            if name != POSITION_IDS:  # recomputed: community files store it as float or corrupt it
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
                    dtype: torch.dtype | None = None, use_ema: bool = True, allow_pickle: bool = True,
                    config: ModelConfig | None = None) -> Components:
    """Read a checkpoint file or diffusers folder and build its three networks on `device` in `dtype`."""
    path = resolve_source(source)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    release = no_release
    if path.is_dir() and is_diffusers_folder(path):
        state, found_config = read_diffusers_folder(path, lambda p: read_weights_file(p, allow_pickle)[0])
    else:
        state, metadata, release = read_weights_file(path, allow_pickle)
        found_config = ModelConfig.from_json(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else None
    try:
        if config is None and found_config is None:
            supported_variant(state)  # names another architecture before its keys are called unexpected
        unet_sd, vae_sd, text_sd, used_ema = split_components(state, use_ema)
        del state
        config = config or found_config or infer_config(
            {UNET_PREFIX + k: v for k, v in unet_sd.items()} | {VAE_PREFIX + k: v for k, v in vae_sd.items()}
            | {TEXT_PREFIX + k: v for k, v in text_sd.items()})
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None

    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=False)
        # A sum is NaN/Inf iff some element is (SD weights are far too small to overflow fp32), and it is
        # several times cheaper than an elementwise isfinite over a billion weights.
        if out.is_floating_point() and not torch.isfinite(out.sum(dtype=torch.float32)):
            raise CheckpointError(f"{path}: {name} contains NaN or Inf values (a damaged checkpoint)")
        if out.data_ptr() != tensor.data_ptr():
            release(tensor)
        return out

    with torch.device("meta"):
        unet, vae, text_encoder = UNetModel(config.unet), AutoencoderKL(config.vae), CLIPTextModel(config.text)
    try:
        assign_weights(unet, unet_sd, "unet", convert)
        assign_weights(vae, vae_sd, "vae", convert)
        assign_weights(text_encoder, text_sd, "text_encoder", convert)
    except CheckpointError as e:
        raise type(e)(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    return Components(config, unet, vae, text_encoder, used_ema, path)


def original_state_dict(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The three networks' weights under the original single-file key names."""
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    state.update({TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()})
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
        unet, vae, text, _ = split_components(state, use_ema=False)
        write_diffusers_folder(path, unet, vae, text, config, lambda t, p: write_safetensors(t, p))
