"""Random-weight checkpoints in the original single-file layout, and the reference (diffusers/transformers)
models built on the very same file, offline: what the parity tests and the benchmarks stand on. The reference
packages are test/bench-only dependencies and are imported only when a reference is built."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint import original_state_dict, save_checkpoint
from .config import ModelConfig
from .diffusers_format import open_clip_config_json, text_config_json, unet_config_json, vae_config_json
from .models.conditioner import text_encoder_for
from .models.unet import UNetModel
from .models.vae import AutoencoderKL


def random_state_dict(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                      ) -> dict[str, torch.Tensor]:
    """Original-layout weights drawn at random with every tensor perturbed, so that norm scales are not 1,
    biases not 0, and a swapped key cannot hide. Weights get a fan-in scale so activations stay sane."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in original_state_dict(
            UNetModel(config.unet), AutoencoderKL(config.vae), text_encoder_for(config)).items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if len(shape) == 1:
            norm = "norm" in key or ".ln_" in key  # OpenCLIP's layer norms are ln_1, ln_2, ln_final
            value = 1 + 0.2 * noise if norm and key.endswith("weight") else 0.1 * noise
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
    parts = [("unet", unet_config_json(config.unet)), ("vae", vae_config_json(config.vae))]
    if config.family == "sd1":
        parts.append(("text_encoder", text_config_json(config.text)))
    elif config.family == "sd2":  # diffusers keeps all but the last layer (SD 2.x conditions on the penultimate)
        parts.append(("text_encoder", open_clip_config_json(config.open_clip, layers=config.open_clip.layers - 1)))
    else:
        if config.text is not None:
            parts.append(("text_encoder", text_config_json(config.text)))
        parts.append(("text_encoder_2", open_clip_config_json(config.open_clip, with_projection=True)))
    for sub, content in parts:
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


# ---- SD 2.x and SDXL references ------------------------------------------------------------------------------

OPEN_CLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model.",
                      "sdxl-refiner": "conditioner.embedders.0.model."}


def reference_open_clip(path: Path, config: ModelConfig, folder: Path, subfolder: str):
    """transformers' CLIP text model with the file's OpenCLIP weights, converted by diffusers' own
    single-file code (`convert_open_clip_checkpoint`): SD 2.x's drops the last layer, as diffusers' does."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file
    import transformers

    raw = json.loads((folder / subfolder / "config.json").read_text())
    cls = getattr(transformers, raw["architectures"][0])
    model = cls(transformers.CLIPTextConfig(**{k: v for k, v in raw.items() if k != "architectures"}))
    checkpoint = {k: v.float() for k, v in load_file(str(path)).items()}
    converted = convert_open_clip_checkpoint(model, checkpoint, prefix=OPEN_CLIP_PREFIXES[config.variant.replace(
        "-inpaint", "")])
    wrapped = hasattr(model, "text_model") and "text_model.embeddings.token_embedding.weight" in model.state_dict()
    if not wrapped:
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    expected = model.state_dict().keys()
    dropped = {k for k in converted if k not in expected}
    assert all(f".layers.{raw['num_hidden_layers']}." in k for k in dropped), sorted(dropped)[:3]
    missing, unexpected = model.load_state_dict({k: v for k, v in converted.items() if k in expected}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


def reference_clip(path: Path, config: ModelConfig, folder: Path, prefix: str):
    """transformers' CLIP-L text model with the file's weights under `prefix` (…`text_model.`)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig as RefTextConfig, CLIPTextModel as RefText

    text = RefText(RefTextConfig(**json.loads((folder / "text_encoder" / "config.json").read_text())))
    level = "" if "embeddings.token_embedding.weight" in text.state_dict() else "text_model."
    missing, unexpected = text.load_state_dict({level + k[len(prefix):]: v.float() for k, v in
                                                load_file(str(path)).items() if k.startswith(prefix)}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return text.eval()


def reference_family_components(path: Path, config: ModelConfig, tmp: Path) -> dict:
    """diffusers' UNet and VAE (`from_single_file`, local configs) and transformers' text encoders on the very
    same original-layout file of an SD 2.x or SDXL model, by their diffusers pipeline names."""
    import diffusers

    folder = diffusers_config_folder(tmp / "reference-configs", config)
    out = {"unet": diffusers.UNet2DConditionModel.from_single_file(str(path), config=str(folder),
                                                                  subfolder="unet").eval(),
           "vae": diffusers.AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae").eval(),
           "folder": folder}
    if config.family == "sd2":
        out["text_encoder"] = reference_open_clip(path, config, folder, "text_encoder")
    elif config.variant == "sdxl":
        out["text_encoder"] = reference_clip(path, config, folder, "conditioner.embedders.0.transformer.text_model.")
        out["text_encoder_2"] = reference_open_clip(path, config, folder, "text_encoder_2")
    else:
        out["text_encoder_2"] = reference_open_clip(path, config, folder, "text_encoder_2")
    return out


def reference_family_pipeline(kind: str, path: Path, config: ModelConfig, tmp: Path, scheduler):
    """A diffusers pipeline (`kind` = its class name) of an SD 2.x or SDXL model on the very same file."""
    import diffusers
    from transformers import CLIPTokenizer as RefTokenizer

    from .tokenizer import write_hf_files

    parts = reference_family_components(path, config, tmp)
    folder = parts.pop("folder")
    write_hf_files(folder / "tokenizer")
    write_hf_files(folder / "tokenizer_2", pad_token="!")  # OpenCLIP's tokenizer, as diffusers' folders have it
    clip_tokenizer = RefTokenizer.from_pretrained(str(folder / "tokenizer"))
    open_tokenizer = RefTokenizer.from_pretrained(str(folder / "tokenizer_2"))
    if config.family == "sd2":
        pipeline = getattr(diffusers, kind)(tokenizer=open_tokenizer, scheduler=scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False, **parts)
    elif config.variant == "sdxl":
        pipeline = getattr(diffusers, kind)(tokenizer=clip_tokenizer, tokenizer_2=open_tokenizer, scheduler=scheduler,
                                            **parts)
    else:
        pipeline = getattr(diffusers, kind)(tokenizer=None, text_encoder=None, tokenizer_2=open_tokenizer,
                                            scheduler=scheduler, requires_aesthetics_score=True, **parts)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_manifest_checkpoint(keys: dict[str, list[int]], path: Path, int_keys=(), seed: int = 0) -> int:
    """A full-size fp16 .safetensors with every key and shape of a real checkpoint's manifest (int64 for
    `int_keys`), written tensor by tensor so memory stays at one tensor; returns the bytes of tensor data.
    Values: slices of one random pool scaled by 1/√fan-in (norm weights near 1), sane activations and far cheaper
    than drawing billions of numbers; enough for loading, shapes, memory and speed, not for parity."""
    import struct
    header, offset = {}, 0
    for key in sorted(keys):
        dtype, size = ("I64", 8) if key in int_keys else ("F16", 2)
        numel = math.prod(keys[key])
        header[key] = {"dtype": dtype, "shape": keys[key], "data_offsets": [offset, offset + numel * size]}
        offset += numel * size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    pool_size = 1 << 22
    pool = torch.randn(pool_size, generator=g).repeat(2)  # doubled: a slice may start anywhere in the first half
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in sorted(keys):
            shape = keys[key]
            if key in int_keys:  # position ids
                f.write(torch.arange(shape[-1] if shape else 1).expand(*shape).contiguous().numpy().tobytes())
                continue
            numel = math.prod(shape)
            norm = len(shape) == 1 and ("norm" in key or ".ln_" in key) and key.endswith("weight")
            scale = 0.1 if len(shape) < 2 else 0.02 if "embedding" in key else math.prod(shape[1:]) ** -0.5
            for start in range(0, numel, pool_size):
                at = int(torch.randint(pool_size, (), generator=g))
                chunk = pool[at:at + min(pool_size, numel - start)] * scale
                f.write((chunk + 1 if norm else chunk).half().numpy().tobytes())
    return offset
