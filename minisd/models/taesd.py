"""Tiny AutoEncoder for Stable Diffusion (TAESD / TAESDXL, Ollin Boer Bohan 2023): plain conv+ReLU blocks that
encode and decode the diffusion model's own (scaled) latents, ~100× cheaper than the KL autoencoder. Modules are
`nn.Sequential`s whose indices are the published `taesd_encoder`/`taesd_decoder` keys; diffusers' AutoencoderTiny
(`encoder.layers.N`, `decoder.layers.N−1`) and ComfyUI's (`taesd_encoder.N`) layouts are renamed on load."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError


@dataclass(frozen=True)
class TAESDConfig:
    """Width, latent channels, and residual blocks per resolution (encoder: full to 1/8; decoder: 1/8 to full)."""
    latent_channels: int = 4
    channels: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    image_channels: int = 3


def conv(n_in: int, n_out: int, **options) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **options)


class Clamp(nn.Module):
    """Soft clamp of the latents to (−3, 3): 3·tanh(x/3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """ReLU(three 3×3 convs + skip)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESDEncoder(nn.Sequential):
    """Image in [−1, 1] (B, 3, H, W) -> latents (B, C, H/8, W/8) in the diffusion model's scale."""

    def __init__(self, config: TAESDConfig = TAESDConfig()):
        c = config.channels
        layers: list[nn.Module] = []
        for level, blocks in enumerate(config.encoder_blocks):
            layers.append(conv(config.image_channels, c) if level == 0 else conv(c, c, stride=2, bias=False))
            layers.extend(Block(c, c) for _ in range(blocks))
        layers.append(conv(c, config.latent_channels))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x + 1) / 2)  # the published network works on images in [0, 1]


class TAESDDecoder(nn.Sequential):
    """Latents (B, C, h, w) in the diffusion model's scale -> image in [−1, 1] (B, 3, 8h, 8w)."""

    def __init__(self, config: TAESDConfig = TAESDConfig()):
        c = config.channels
        layers: list[nn.Module] = [Clamp(), conv(config.latent_channels, c), nn.ReLU()]
        last = len(config.decoder_blocks) - 1
        for level, blocks in enumerate(config.decoder_blocks):
            layers.extend(Block(c, c) for _ in range(blocks))
            if level < last:
                layers.extend([nn.Upsample(scale_factor=2), conv(c, c, bias=False)])
        layers.append(conv(c, config.image_channels))
        super().__init__(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z) * 2 - 1  # the published network yields [0, 1]


class TinyAutoencoder(nn.Module):
    """TAESD's encoder and/or decoder (the published files hold one each); they work on the UNet's latents."""

    def __init__(self, config: TAESDConfig = TAESDConfig(), encoder: bool = True, decoder: bool = True):
        super().__init__()
        self.config = config
        self.encoder = TAESDEncoder(config) if encoder else None
        self.decoder = TAESDDecoder(config) if decoder else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise CheckpointError("this TAESD file has no encoder (taesd_decoder only)")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise CheckpointError("this TAESD file has no decoder (taesd_encoder only)")
        return self.decoder(z)


# ---- reading the published, diffusers and ComfyUI layouts --------------------------------------------------

# (prefix in the file, part, index shift to the published numbering). diffusers' decoder has no Clamp module.
LAYOUTS = [("encoder.layers.", "encoder", 0), ("decoder.layers.", "decoder", 1), ("taesd_encoder.", "encoder", 0),
           ("taesd_decoder.", "decoder", 0), ("encoder.", "encoder", 0), ("decoder.", "decoder", 0)]
IGNORED = {"vae_scale", "vae_shift"}  # ComfyUI's latent-scale buffers: the defaults of the model they come with
_INDEX = re.compile(r"^(\d+)\.(.+)$")


def split_taesd_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"encoder": ..., "decoder": ...} in the published numbering, from any of the known layouts. A bare
    published file (keys "0.weight", ...) is an encoder if it starts with a convolution, else a decoder."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in IGNORED:
            continue
        layout = next(((p, part, shift) for p, part, shift in LAYOUTS if key.startswith(p)), None)
        rest = key[len(layout[0]):] if layout else key
        match = _INDEX.match(rest)
        if match is None:
            raise CheckpointError(f"not a TAESD file: unexpected key {key}")
        part = layout[1] if layout else ("encoder" if "0.weight" in state else "decoder")
        shift = layout[2] if layout else 0
        parts.setdefault(part, {})[f"{int(match.group(1)) + shift}.{match.group(2)}"] = value
    return parts


def is_taesd_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict looks like TAESD (numbered conv layers and Blocks, in any known layout)."""
    try:
        parts = split_taesd_state(state)
    except CheckpointError:
        return False
    return bool(parts) and all(any(".conv.0.weight" in k for k in p) for p in parts.values())


def _blocks_between_convs(keys: set[str], first: int, last: int) -> list[int]:
    """Count Blocks in each run between the plain convolutions of indices first..last."""
    runs, count = [], 0
    for i in range(first, last):
        if f"{i}.conv.0.weight" in keys:
            count += 1
        elif f"{i}.weight" in keys:
            runs.append(count)
            count = 0
    runs.append(count)
    return runs


def infer_taesd_config(parts: dict[str, dict[str, torch.Tensor]]) -> TAESDConfig:
    """The config of the parts' weights (widths from shapes, block counts from the layer indices)."""
    options: dict = {}
    if "encoder" in parts:
        enc = parts["encoder"]
        last = max(int(k.split(".")[0]) for k in enc)
        options.update(channels=enc["0.weight"].shape[0], image_channels=enc["0.weight"].shape[1],
                       latent_channels=enc[f"{last}.weight"].shape[0],
                       encoder_blocks=tuple(_blocks_between_convs(set(enc), 1, last)))
    if "decoder" in parts:
        dec = parts["decoder"]
        last = max(int(k.split(".")[0]) for k in dec)
        if "1.weight" not in dec:
            raise CheckpointError("not a TAESD decoder: no first convolution (1.weight)")
        options.update(channels=dec["1.weight"].shape[0], latent_channels=dec["1.weight"].shape[1],
                       image_channels=dec[f"{last}.weight"].shape[0],
                       decoder_blocks=tuple(_blocks_between_convs(set(dec), 3, last)))
    return TAESDConfig(**options)


def load_taesd(state: dict[str, torch.Tensor], source: str | os.PathLike = "TAESD",
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
    """A TinyAutoencoder holding the parts `state` has, loaded strictly."""
    parts = split_taesd_state(state)
    if not parts:
        raise CheckpointError(f"{source}: holds no TAESD weights")
    config = infer_taesd_config(parts)
    with torch.device("meta"):
        model = TinyAutoencoder(config, encoder="encoder" in parts, decoder="decoder" in parts)
    for name, weights in parts.items():
        module = getattr(model, name)
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if expected.keys() != weights.keys() or any(tuple(weights[k].shape) != s for k, s in expected.items()):
            odd = sorted(set(expected) ^ set(weights))[:3] or [k for k, s in expected.items()
                                                               if tuple(weights[k].shape) != s][:3]
            raise CheckpointError(f"{source}: TAESD {name} weights do not fit its layout (e.g. {', '.join(odd)})")
        module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in weights.items()}, assign=True)
    return model.eval().requires_grad_(False)


def read_taesd(path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
    """TAESD from a published file (taesd_decoder.safetensors/.pth), a diffusers AutoencoderTiny file or folder."""
    from ..checkpoint import read_weights_file

    path = Path(path)
    if path.is_dir():
        candidates = [path / "diffusion_pytorch_model.safetensors", path / "diffusion_pytorch_model.bin"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: a folder without diffusion_pytorch_model.safetensors")
        path = found
    state, _, _ = read_weights_file(path, allow_pickle=True)
    if not is_taesd_state(state):
        raise CheckpointError(f"{path}: not a TAESD file (its keys are not TAESD's numbered layers)")
    return load_taesd(state, path, device, dtype)
