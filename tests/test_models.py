"""The three networks: exact key manifests of the real SD 1.x checkpoints, and numerical parity with
diffusers/transformers loading the very same original-layout file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import minisd
from minisd.checkpoint import IGNORED_KEYS, original_state_dict
from minisd.config import PRESETS, ModelConfig, UNetConfig, infer_config
from minisd.models.clip import CLIPTextModel
from minisd.models.unet import UNetModel
from minisd.models.vae import AutoencoderKL
from minisd.testing import reference_components, write_checkpoint

from conftest import DATA

# Entries of the real files that minisd deliberately does not hold: the training schedule (recomputed)
# and CLIP's position ids (recomputed, since community files corrupt them).
IGNORED = IGNORED_KEYS | {"cond_stage_model.transformer.text_model.embeddings.position_ids"}


def manifest(name: str) -> dict[str, list[int]]:
    return json.loads((DATA / f"{name}.json").read_text())["keys"]


def meta_model_keys(config: ModelConfig) -> dict[str, list[int]]:
    with torch.device("meta"):
        state = original_state_dict(UNetModel(config.unet), AutoencoderKL(config.vae), CLIPTextModel(config.text))
    return {k: list(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name, preset", [("sd1", "sd1"), ("sd1-ema", "sd1"), ("sd1-inpaint", "sd1-inpaint")])
def test_keys_and_shapes_equal_the_real_checkpoints(name, preset):
    real = manifest(name)
    meta = {k: torch.empty(v, device="meta") for k, v in real.items()}
    config = infer_config(meta)
    assert config == PRESETS[preset]
    expected = {k: v for k, v in real.items() if k not in IGNORED and not k.startswith("model_ema.")}
    assert meta_model_keys(config) == expected
    if name == "sd1-ema":  # every UNet parameter has its EMA copy, named with the dots removed
        ema = {k for k in real if k.startswith("model_ema.")} - IGNORED
        assert ema == {"model_ema." + k.removeprefix("model.").replace(".", "")
                       for k in expected if k.startswith("model.diffusion_model.")}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_parity(path: Path, config: ModelConfig, tmp: Path, latent: tuple[int, int], image: tuple[int, int]):
    ours = minisd.load(path, dtype=torch.float32)
    unet, vae, text, _ = reference_components(path, config, tmp)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = torch.randn(2, config.unet.in_channels, *latent, generator=g)
        t = torch.tensor([1.0, 981.0])
        context = torch.randn(2, 9, config.unet.context_dim, generator=g)
        assert relative_error(ours.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample) <= 1e-4

        pixels = torch.rand(1, 3, *image, generator=g) * 2 - 1
        assert relative_error(ours.vae.encode(pixels), vae.encode(pixels).latent_dist.mean) <= 1e-4
        z = torch.randn(1, config.vae.latent_channels, image[0] // 8, image[1] // 8, generator=g)
        assert relative_error(ours.vae.decode(z), vae.decode(z).sample) <= 1e-4

        ids = torch.randint(0, config.text.vocab_size, (2, 77), generator=g)
        reference = text(ids, output_hidden_states=True)
        assert relative_error(ours.text_encoder(ids), reference.last_hidden_state) <= 1e-4
        final_norm = getattr(text, "text_model", text).final_layer_norm
        penultimate = final_norm(reference.hidden_states[-2])
        assert relative_error(ours.text_encoder(ids, clip_skip=2), penultimate) <= 1e-4


def test_tiny_parity_with_diffusers_and_transformers(tmp_path, tiny_config):
    path = tmp_path / "tiny.safetensors"
    write_checkpoint(path, tiny_config, seed=3)
    check_parity(path, tiny_config, tmp_path, latent=(16, 24), image=(64, 48))


def test_tiny_inpainting_unet_parity(tmp_path, tiny_config):
    config = ModelConfig(variant="sd1-inpaint", unet=UNetConfig(**{**tiny_config.unet.__dict__, "in_channels": 9}),
                         vae=tiny_config.vae, text=tiny_config.text)
    path = tmp_path / "inpaint.safetensors"
    write_checkpoint(path, config, seed=4)
    check_parity(path, config, tmp_path, latent=(8, 8), image=(32, 32))


@pytest.mark.parametrize("latent", [(9, 7), (5, 13), (1, 1)])
def test_sizes_that_are_not_multiples_of_64(tmp_path, latent):
    """Latents whose size halves to odd numbers: upsampled tensors must match their skip connections
    (diffusers handles these with its forwarded upsample size; both must agree)."""
    config = ModelConfig(unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), attention_levels=(1, 2),
                                         num_heads=2, context_dim=32, norm_groups=8),
                         vae=PRESETS["tiny"].vae, text=PRESETS["tiny"].text)
    path = tmp_path / "odd.safetensors"
    write_checkpoint(path, config, seed=5)
    ours = minisd.load(path, dtype=torch.float32)
    unet, _, _, _ = reference_components(path, config, tmp_path)
    x, context = torch.randn(1, 4, *latent), torch.randn(1, 5, 32)
    with torch.no_grad():
        out = ours.unet(x, torch.tensor([10.0]), context)
        assert out.shape == x.shape
        assert relative_error(out, unet(x, torch.tensor([10.0]), encoder_hidden_states=context).sample) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd1", "sd1-inpaint"])
def test_full_sd15_parity(tmp_path, preset):
    """The full SD 1.5 configuration (fp16 file, fp32 compute) at a small latent and a short text."""
    config = PRESETS[preset]
    path = tmp_path / f"{preset}.safetensors"
    write_checkpoint(path, config, seed=6, dtype=torch.float16, record_config=False)
    check_parity(path, config, tmp_path, latent=(16, 16), image=(64, 64))
