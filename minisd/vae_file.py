"""Standalone VAE files (what `--vae FILE` swaps in, e.g. the fine-tuned "MSE" VAE for SD 1.5): CompVis-named
.safetensors/.ckpt/.pt (keys `encoder.*`, `decoder.*`, optionally under `first_stage_model.`), diffusers-named
files and `vae/` folders; TAESD files are recognised by their keys and read by models/taesd.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import VAE_PREFIX, VAEConfig, infer_vae_config
from .errors import CheckpointError
from .models.taesd import TinyAutoencoder, is_taesd_state, load_taesd
from .models.vae import AutoencoderKL

# Training-time entries of full VAE checkpoints (the discriminator and loss of the fine-tune), never needed.
IGNORED_PREFIXES = ("loss.", "model_ema.")


def _diffusers_to_compvis(state: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    from .diffusers_format import _vae_attention_shapes, rename, vae_prefixes

    return _vae_attention_shapes(rename(state, vae_prefixes(config), to_original=True), to_original=True)


def read_vae(path: str | os.PathLike, like: VAEConfig, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> AutoencoderKL | TinyAutoencoder:
    """The autoencoder in a VAE file or diffusers `vae/` folder, on `device` in `dtype`. `like` is the config of
    the model's own VAE: diffusers-named files without a config.json are renamed by its layout."""
    from .checkpoint import read_weights_file
    from .diffusers_format import _vae_config

    path = Path(path)
    folder_config = None
    if path.is_dir():
        found = next((path / name for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                      if (path / name).is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: a folder without diffusion_pytorch_model.safetensors (not a VAE folder)")
        if (path / "config.json").is_file():
            raw = json.loads((path / "config.json").read_text())
            if raw.get("_class_name") == "AutoencoderTiny":
                folder_config = "taesd"
            else:
                folder_config = _vae_config(raw)
        path = found
    state, _, _ = read_weights_file(path, allow_pickle=True)
    if folder_config == "taesd" or is_taesd_state(state):
        return load_taesd(state, path, device, dtype)
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    if any(k.startswith(VAE_PREFIX) for k in state):  # a whole checkpoint: take its VAE
        state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in state):
        state = _diffusers_to_compvis(state, folder_config or like)
    if "encoder.conv_in.weight" not in state or "decoder.conv_out.weight" not in state:
        raise CheckpointError(f"{path}: not a VAE file (no encoder.conv_in / decoder.conv_out weights)")
    try:
        config = infer_vae_config(state, prefix="")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    config = VAEConfig(**{**like.__dict__, **{k: getattr(config, k) for k in
                                              ("in_channels", "out_channels", "channels", "channel_mult",
                                               "num_res_blocks", "latent_channels")}})
    if config.latent_channels != like.latent_channels:
        raise CheckpointError(f"{path}: a VAE with {config.latent_channels} latent channels; this model's have "
                              f"{like.latent_channels} (a VAE for another model family)")
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    expected = vae.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise CheckpointError(f"{path}: not a VAE of this layout ({detail})")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise CheckpointError(f"{path}: {key} has shape {list(state[key].shape)}, expected {list(value.shape)}")
    vae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)
