"""SDXL base and refiner: key manifests of the real checkpoints, tiny-model parity of every network (UNet with
its size/pooled conditioning, CLIP-L and bigG penultimate layers, bigG's pooled projection, VAE) and of
txt2img/img2img with diffusers' SDXL pipelines on the very same original-layout file, and the refiner switch."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

import minisd
from minisd.checkpoint import CONFIG_METADATA_KEY, IGNORED_KEYS, original_state_dict
from minisd.config import PRESETS, ModelConfig, infer_config
from minisd.models.conditioner import text_encoder_for
from minisd.models.unet import UNetModel, timestep_embedding
from minisd.models.vae import AutoencoderKL
from minisd.testing import SD_SCHEDULER, reference_family_components, reference_family_pipeline, write_checkpoint
from minisd.tokenizer import EOS_ID

from conftest import DATA

PROMPT, NEGATIVE = "a red circle on the left, blue background", "blurry"


def manifest(name: str) -> dict[str, list[int]]:
    with gzip.open(DATA / f"{name}.json.gz", "rt") as f:
        return json.load(f)["keys"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name, preset", [("sdxl-base", "sdxl"), ("sdxl-refiner", "sdxl-refiner")])
def test_keys_and_shapes_equal_the_real_checkpoints(name, preset):
    """Built on `meta` from the inferred config: every key and shape of the released files (CLIP-L's recomputed
    position ids and sgm's σ table aside), UNet 2.567 B / 2.260 B parameters."""
    real = manifest(name)
    config = infer_config({k: torch.empty(v, device="meta") for k, v in real.items()})
    assert config == PRESETS[preset]
    with torch.device("meta"):
        unet = UNetModel(config.unet)
        state = original_state_dict(unet, AutoencoderKL(config.vae), text_encoder_for(config))
    ignored = IGNORED_KEYS | {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids"}
    assert {k: list(v.shape) for k, v in state.items()} == {k: v for k, v in real.items() if k not in ignored}
    assert sum(p.numel() for p in unet.parameters()) == {"sdxl": 2_567_463_684, "sdxl-refiner": 2_259_526_660}[preset]


def tiny_model(tmp_path_factory, preset: str, seed: int):
    """(file, config, the model loaded in fp32, its folder) of a random tiny checkpoint."""
    tmp = tmp_path_factory.mktemp(preset)
    path = tmp / f"{preset}.safetensors"
    write_checkpoint(path, PRESETS[preset], seed=seed)
    return path, PRESETS[preset], minisd.load(path, dtype=torch.float32), tmp


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model(tmp_path_factory, "tiny-sdxl", seed=41)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return tiny_model(tmp_path_factory, "tiny-sdxl-refiner", seed=42)


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_networks_equal_diffusers_and_transformers(which, base, refiner, tmp_path):
    path, config, sd, _ = base if which == "base" else refiner
    ref = reference_family_components(path, config, tmp_path)
    g = torch.Generator().manual_seed(0)
    pooled_dim = config.open_clip.projection_dim
    numbers = (config.unet.adm_in_channels - pooled_dim) // 256  # 6 size numbers (base), 5 with the score
    with torch.no_grad():
        x = torch.randn(2, 4, 16, 24, generator=g)
        t = torch.tensor([1.0, 981.0])
        context = torch.randn(2, 9, config.unet.context_dim, generator=g)
        pooled = torch.randn(2, pooled_dim, generator=g)
        time_ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0][:numbers],
                                 [512.0, 512.0, 16.0, 0.0, 6.0, 832.0][:numbers]])
        # diffusers embeds the numbers itself (`time_ids`); ours takes the assembled vector y
        y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], dim=1)
        theirs = ref["unet"](x, t, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert relative(sd.unet(x, t, context, y=y), theirs) <= 1e-4
        pixels = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
        assert relative(sd.vae.encode(pixels), ref["vae"].encode(pixels).latent_dist.mean) <= 1e-4
        z = torch.randn(1, 4, 8, 6, generator=g)
        assert relative(sd.vae.decode(z), ref["vae"].decode(z).sample) <= 1e-4

        # the same chunk for both encoders: CLIP-L padded with end-of-text, bigG with 0
        ids = torch.randint(0, EOS_ID, (2, 77), generator=g)
        ids[:, 0], ids[0, 20:], ids[1, 60:] = 49406, EOS_ID, EOS_ID
        zero = ids.clone()
        zero[0, 21:], zero[1, 61:] = 0, 0
        hidden, ours_pooled = sd.text_encoder(ids, zero)
        big = ref["text_encoder_2"](zero, output_hidden_states=True)
        assert relative(hidden[-1], big.hidden_states[-2]) <= 1e-4  # penultimate, no final norm
        assert relative(ours_pooled, big.text_embeds) <= 1e-4
        if which == "base":
            assert len(hidden) == 2
            assert relative(hidden[0], ref["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]) <= 1e-4
            # clip skip 2: one layer further down in both
            hidden2, _ = sd.text_encoder(ids, zero, clip_skip=2)
            assert relative(hidden2[0], ref["text_encoder"](ids, output_hidden_states=True).hidden_states[-3]) <= 1e-4
            assert relative(hidden2[1], big.hidden_states[-3]) <= 1e-4


def euler():
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="trailing")


def seeds_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.fixture(scope="module")
def ref_base(base):
    path, config, _, tmp = base
    return reference_family_pipeline("StableDiffusionXLPipeline", path, config, tmp, euler())


@pytest.fixture(scope="module")
def ref_refiner(refiner):
    path, config, _, tmp = refiner
    return reference_family_pipeline("StableDiffusionXLImg2ImgPipeline", path, config, tmp, euler())


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_txt2img_equals_diffusers(base, ref_base, negative):
    """An empty negative prompt is zeros (context and pooled) in both: diffusers' `force_zeros_for_empty_prompt`
    with negative_prompt=None; the sizes condition as the image size, crop (0, 0)."""
    path, config, sd, tmp = base
    options = dict(negative_prompt=negative, width=64, height=48, steps=5, cfg_scale=5.0, sampler="Euler",
                   schedule="Simple", seed=7, batch_size=2)
    latents = sd.txt2img(PROMPT, output="latent", **options)
    ref = ref_base
    theirs = ref(prompt=[PROMPT] * 2, negative_prompt=[negative] * 2 if negative else None, height=48, width=64,
                 num_inference_steps=5, guidance_scale=5.0, latents=seeds_noise([7, 8], (4, 6, 8)),
                 output_type="latent").images
    assert relative(latents, theirs) <= 1e-4


def test_refiner_img2img_equals_diffusers(refiner, ref_refiner):
    """The refiner alone, as diffusers' SDXL img2img with aesthetic scores 6 / 2.5 (A1111's defaults). A1111's
    strength rule: 0.5 of 10 steps is diffusers' 0.6 on the same grid (as in test_pipeline)."""
    from PIL import Image, ImageDraw

    path, config, sd, tmp = refiner
    init = Image.new("RGB", (64, 64), (40, 60, 200))
    ImageDraw.Draw(init).ellipse([4, 8, 32, 44], fill=(220, 30, 30))
    options = dict(width=64, height=64, steps=10, cfg_scale=5.0, sampler="Euler", schedule="Simple", seed=3,
                   strength=0.5, negative_prompt=NEGATIVE)
    latents = sd.img2img(init, PROMPT, output="latent", **options)
    start = sd.encode_latents(minisd.image.pil_to_tensor(init))
    theirs = ref_refiner(prompt=PROMPT, negative_prompt=NEGATIVE, image=start, strength=0.6, num_inference_steps=10,
                 guidance_scale=5.0, generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert relative(latents, theirs) <= 1e-4


def test_base_then_refiner_equals_diffusers_ensemble_of_experts(base, refiner, ref_base, ref_refiner, tmp_path):
    """`sd.refiner` with switch at 0.8 (A1111's "Refiner, switch at"): the base denoises the timesteps t ≥ 200, the
    refiner the rest, in one sampler run; diffusers' base with denoising_end=0.8, then its refiner img2img with
    denoising_start=0.8 on those latents (Euler keeps no history, so the two runs are the same computation)."""
    _, _, sd, _ = base
    refiner_path, _, refiner_sd, _ = refiner
    sd.refiner = refiner_sd
    try:
        options = dict(negative_prompt=NEGATIVE, width=64, height=48, steps=10, cfg_scale=5.0, sampler="Euler",
                       schedule="Simple", seed=9)
        latents = sd.txt2img(PROMPT, output="latent", refiner_switch_at=0.8, **options)
        (image,) = sd.txt2img(PROMPT, **options)  # the default switch: 0.8
    finally:
        sd.refiner = None
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0,
                  output_type="latent")
    handed = ref_base(**common, height=48, width=64, latents=seeds_noise([9], (4, 6, 8)), denoising_end=0.8).images
    theirs = ref_refiner(**common, image=handed, denoising_start=0.8).images
    assert relative(latents, theirs) <= 1e-4
    # the refiner did change the result, and the infotext says so as A1111 writes it
    assert relative(latents, sd.txt2img(PROMPT, output="latent", **options)) > 1e-3
    info = minisd.params.GenerationParams.from_infotext(image.info["parameters"])
    assert f"Refiner: {refiner_path.stem} [" in image.info["parameters"] and info.refiner_switch_at == 0.8


def test_base_img2img_equals_diffusers(base, ref_base):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image, ImageDraw

    _, _, sd, _ = base
    init = Image.new("RGB", (64, 48), (200, 180, 40))
    ImageDraw.Draw(init).rectangle([8, 8, 40, 30], fill=(20, 30, 220))
    latents = sd.img2img(init, PROMPT, width=64, height=48, steps=10, cfg_scale=4.0, sampler="Euler",
                         schedule="Simple", seed=5, strength=0.5, negative_prompt=NEGATIVE, output="latent")
    ref = StableDiffusionXLImg2ImgPipeline(**ref_base.components)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt=PROMPT, negative_prompt=NEGATIVE, image=sd.encode_latents(minisd.image.pil_to_tensor(init)),
                 strength=0.6, num_inference_steps=10, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert relative(latents, theirs) <= 1e-4


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sdxl-refiner", "tiny-sd2"])
def test_save_round_trip(tmp_path, preset):
    """An SD 2.x / SDXL model writes back to an original-layout file with the same keys (fp16 here) and loads to
    the same weights (diffusers folders of these families: test_family_folders.py)."""
    from safetensors.torch import load_file

    src = tmp_path / "src.safetensors"
    state = write_checkpoint(src, PRESETS[preset], seed=43)
    sd = minisd.load(src, dtype=torch.float32, prediction="eps")
    sd.save(tmp_path / "half.safetensors", dtype=torch.float16)
    written = load_file(str(tmp_path / "half.safetensors"))
    assert written.keys() == state.keys() and all(v.dtype == torch.float16 for v in written.values())
    assert all(torch.equal(written[k], state[k].half()) for k in state)
    again = minisd.load(tmp_path / "half.safetensors", dtype=torch.float16)
    assert again.config == sd.config


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_file_converted_from_a_diffusers_folder_loads_as_the_same_model(which, base, refiner, tmp_path):
    """diffusers' `convert_diffusers_to_original_sdxl.py` keeps two transformers names in bigG's original-layout
    keys: the projection as a Linear weight (`text_projection.weight`, the transpose of OpenCLIP's matrix) and,
    from older transformers, `text_model.embeddings.position_ids`; it writes no `logit_scale` and no metadata."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    path, config, sd, _ = base if which == "base" else refiner
    state = load_file(str(path))
    prefix = "conditioner.embedders.1.model." if which == "base" else "conditioner.embedders.0.model."
    state[prefix + "text_projection.weight"] = state.pop(prefix + "text_projection").T.contiguous()
    state[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    del state[prefix + "logit_scale"]
    # the tiny widths do not follow SD's head conventions, so the config rides along (a real file's is inferred)
    expected = dataclasses.replace(config, open_clip=dataclasses.replace(config.open_clip, has_logit_scale=False))
    save_file(state, str(tmp_path / "converted.safetensors"), metadata={CONFIG_METADATA_KEY: expected.to_json()})
    converted = minisd.load(tmp_path / "converted.safetensors", dtype=torch.float32)
    assert converted.config == expected
    ids = torch.randint(0, EOS_ID, (2, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, 30:] = 49406, EOS_ID
    zero = ids.clone()
    zero[:, 31:] = 0
    with torch.no_grad():
        (hidden, pooled), (expected_hidden, expected_pooled) = converted.text_encoder(ids, zero), sd.text_encoder(
            ids, zero)
    assert torch.equal(pooled, expected_pooled) and all(map(torch.equal, hidden, expected_hidden))


def test_released_keys_as_diffusers_converts_them_infer_the_sdxl_config():
    """The same conversion on the real SDXL base keys (meta tensors): the inferred config is the preset's."""
    import dataclasses

    from minisd.checkpoint import split_components
    from minisd.config import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX

    state = {k: torch.empty(v, device="meta") for k, v in manifest("sdxl-base").items()}
    prefix = "conditioner.embedders.1.model."
    state[prefix + "text_projection.weight"] = state.pop(prefix + "text_projection").T
    del state[prefix + "logit_scale"]
    unet, vae, text, _ = split_components(state, text_prefix=TEXT_PREFIXES["sdxl"])
    config = infer_config({UNET_PREFIX + k: v for k, v in unet.items()} | {VAE_PREFIX + k: v for k, v in vae.items()}
                          | {TEXT_PREFIXES["sdxl"] + k: v for k, v in text.items()})
    sdxl = PRESETS["sdxl"]
    assert config == dataclasses.replace(sdxl, open_clip=dataclasses.replace(sdxl.open_clip, has_logit_scale=False))


def test_cli_refiner_flags(base, refiner, tmp_path):
    """`minisd generate --refiner FILE --refiner-switch-at F`: the same image as the API, A1111's infotext fields."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    path, _, sd, _ = base
    refiner_path, _, refiner_sd, _ = refiner
    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-m", "minisd", "generate", PROMPT, "--model", str(path), "--refiner",
                             str(refiner_path), "--refiner-switch-at", "0.5", "--steps", "4", "--seed", "2", "-W", "64",
                             "-H", "64", "--dtype", "fp32", "--sampler", "Euler", "-o", str(out), "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    sd.refiner = refiner_sd
    try:
        (expected,) = sd.txt2img(PROMPT, refiner_switch_at=0.5, steps=4, seed=2, width=64, height=64, sampler="Euler")
    finally:
        sd.refiner = None
    image = Image.open(out)
    assert (np.asarray(image) == np.asarray(expected)).all()
    assert "Refiner switch at: 0.5" in image.info["parameters"]
    assert f"Refiner: {refiner_path.stem} [" in image.info["parameters"]
