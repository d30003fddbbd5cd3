"""Random-weight checkpoints in the original single-file layout, and the reference (diffusers/transformers)
models built on the very same file, offline: what the parity tests and the benchmarks stand on. The reference
packages are test/bench-only dependencies and are imported only when a reference is built."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import original_state_dict, save_checkpoint
from .config import ModelConfig
from .diffusers_format import text_config_json, unet_config_json, vae_config_json
from .models.clip import CLIPTextModel
from .models.unet import UNetModel
from .models.vae import AutoencoderKL


def random_state_dict(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                      ) -> dict[str, torch.Tensor]:
    """Original-layout weights drawn at random with every tensor perturbed, so that norm scales are not 1,
    biases not 0, and a swapped key cannot hide. Weights get a fan-in scale so activations stay sane."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in original_state_dict(
            UNetModel(config.unet), AutoencoderKL(config.vae), CLIPTextModel(config.text)).items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if len(shape) == 1:
            value = 1 + 0.2 * noise if "norm" in key and key.endswith("weight") else 0.1 * noise
        else:
            fan_in = shape[1:].numel()
            value = noise * (0.02 if "embedding" in key else fan_in ** -0.5)
        out[key] = value.to(dtype)
    return out


def write_checkpoint(path: Path, config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                     record_config: bool = True) -> dict[str, torch.Tensor]:
    """Write random weights as an original-layout .safetensors and return them."""
    state = random_state_dict(config, seed, dtype)
    if record_config:
        save_checkpoint(path, state, config)
    else:  # as a real SD file: no minisd metadata, the config must be inferred from the shapes
        from safetensors.torch import save_file
        save_file(state, str(path))
    return state


def diffusers_config_folder(path: Path, config: ModelConfig) -> Path:
    """A folder of diffusers/transformers configs (no weights) for `from_single_file(config=...)`."""
    for sub, content in (("unet", unet_config_json(config.unet)), ("vae", vae_config_json(config.vae)),
                         ("text_encoder", text_config_json(config.text))):
        (path / sub).mkdir(parents=True, exist_ok=True)
        (path / sub / "config.json").write_text(json.dumps(content))
    return path


SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, prediction_type="epsilon")


def reference_components(path: Path, config: ModelConfig, tmp: Path):
    """diffusers' UNet and VAE through `from_single_file` with local configs (offline) and transformers' CLIP
    text model with the file's text weights, all on the very same original-layout file; and the config folder."""
    import diffusers
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig as RefTextConfig, CLIPTextModel as RefText

    folder = diffusers_config_folder(tmp / "reference-configs", config)
    unet = diffusers.UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet")
    vae = diffusers.AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae")
    text = RefText(RefTextConfig(**json.loads((folder / "text_encoder" / "config.json").read_text())))
    prefix = "cond_stage_model.transformer.text_model."
    # transformers 5 dropped the `text_model.` level that the checkpoints (and older versions) have.
    level = "" if "embeddings.token_embedding.weight" in text.state_dict() else "text_model."
    missing, unexpected = text.load_state_dict({level + k[len(prefix):]: v.float() for k, v in
                                                load_file(str(path)).items() if k.startswith(prefix)}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return unet.eval(), vae.eval(), text.eval(), folder


def reference_pipeline(kind: str, path: Path, config: ModelConfig, tmp: Path, scheduler):
    """A diffusers Stable Diffusion pipeline (`kind` = its class name) on the very same original-layout file,
    with transformers' tokenizer built from our vocabulary files."""
    import diffusers
    from transformers import CLIPTokenizer as RefTokenizer

    from .tokenizer import write_hf_files

    unet, vae, text, folder = reference_components(path, config, tmp)
    write_hf_files(folder / "tokenizer")
    pipeline = getattr(diffusers, kind)(vae=vae, text_encoder=text, unet=unet,
                                        tokenizer=RefTokenizer.from_pretrained(str(folder / "tokenizer")),
                                        scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
