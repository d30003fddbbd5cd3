"""End-to-end generation against diffusers' pipelines on the same checkpoint file, the same initial noise and
the same deterministic sampler: txt2img, img2img, inpainting with a 4-channel and a 9-channel model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import minisd
from minisd.config import PRESETS, ModelConfig, UNetConfig
from minisd.params import GenerationParams

from minisd.testing import SD_SCHEDULER, reference_pipeline, write_checkpoint

PROMPT, NEGATIVE = "a red circle on the left, blue background", "blurry"


def euler_reference():
    from diffusers import EulerDiscreteScheduler
    # "trailing" spacing takes the timesteps 999, 949, ...: our "Simple" schedule; it starts at σ_max.
    return EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="trailing")


def ddim_reference():
    from diffusers import DDIMScheduler
    # "leading" spacing with offset 1 is CompVis/A1111's DDIM grid (our "DDIM" schedule); ending at ᾱ = 1
    # (set_alpha_to_one) is our last σ = 0.
    return DDIMScheduler(**SD_SCHEDULER, timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False)


SAMPLERS = {"euler": ("Euler", "Simple", euler_reference), "ddim": ("DDIM", "DDIM", ddim_reference)}


def reference_start(sampler: str, eps: torch.Tensor, sigma0: float) -> torch.Tensor:
    """The reference's `latents=` argument for our start x = σ0 ε: Euler scales by σ_max itself; DDIM works on
    the variance-preserving sample x / sqrt(σ² + 1)."""
    return eps if sampler == "euler" else eps * sigma0 / (sigma0**2 + 1) ** 0.5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def init_picture(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 60, 200))
    ImageDraw.Draw(image).ellipse([4, 8, size // 2, size // 2 + 12], fill=(220, 30, 30))
    return image


def rectangle_mask(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([16, 8, 47, 39], fill=255)  # aligned to the 8-pixel latent grid
    return mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "tiny.safetensors"
    write_checkpoint(path, PRESETS["tiny"], seed=21)
    return path, PRESETS["tiny"], minisd.load(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory):
    config = ModelConfig(variant="sd1-inpaint", unet=UNetConfig(**{**PRESETS["tiny"].unet.__dict__, "in_channels": 9}),
                         vae=PRESETS["tiny"].vae, text=PRESETS["tiny"].text)
    path = tmp_path_factory.mktemp("pipeline9") / "tiny-inpaint.safetensors"
    write_checkpoint(path, config, seed=22)
    return path, config, minisd.load(path, dtype=torch.float32)


def fresh(seeds: list[int]) -> list[torch.Generator]:
    """One new CPU generator per image, as minisd seeds them (a used generator has moved on)."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def seeds_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_txt2img_equals_diffusers(tiny, tmp_path, sampler):
    path, config, sd = tiny
    label, schedule, scheduler = SAMPLERS[sampler]
    options = dict(negative_prompt=NEGATIVE, width=64, height=48, steps=8, cfg_scale=6.0, sampler=label,
                   schedule=schedule, seed=11, batch_size=2)
    latents = sd.txt2img(PROMPT, output="latent", **options)
    images = sd.txt2img(PROMPT, **options)
    eps = seeds_noise([11, 12], (4, 6, 8))
    sigmas = minisd.samplers.resolve_sampler(label).sigmas(sd.schedule, 8, schedule)
    ref = reference_pipeline("StableDiffusionPipeline", path, config, tmp_path, scheduler())
    common = dict(prompt=[PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, height=48, width=64, num_inference_steps=8,
                  guidance_scale=6.0, latents=reference_start(sampler, eps, float(sigmas[0])))
    ref_latents = ref(**common, output_type="latent").images
    ref_images = ref(**common, output_type="pil").images
    assert relative(latents, ref_latents) <= 1e-4
    assert np.abs(pixels(images) - pixels(ref_images)).max() <= 2


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_img2img_equals_diffusers(tiny, tmp_path, sampler):
    """A1111's strength rule runs int(strength·steps) + 1 steps; diffusers runs int(strength·steps): strength
    0.5 of 10 steps here is diffusers' strength 0.6 on the same grid."""
    path, config, sd = tiny
    label, schedule, scheduler = SAMPLERS[sampler]
    init = init_picture(64)
    options = dict(width=64, height=64, steps=10, cfg_scale=5.0, sampler=label, schedule=schedule, seed=3,
                   strength=0.5, negative_prompt=NEGATIVE)
    latents = sd.img2img(init, PROMPT, output="latent", **options)
    images = sd.img2img(init, PROMPT, **options)
    start = sd.encode_latents(minisd.image.pil_to_tensor(init))
    ref = reference_pipeline("StableDiffusionImg2ImgPipeline", path, config, tmp_path, scheduler())
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=start, strength=0.6, num_inference_steps=10,
                  guidance_scale=5.0)
    assert relative(latents, ref(**common, generator=fresh([3]), output_type="latent").images) <= 1e-4
    assert np.abs(pixels(images) - pixels(ref(**common, generator=fresh([3]), output_type="pil").images)).max() <= 2


@pytest.mark.parametrize("channels", [4, 9])
def test_inpainting_equals_diffusers(tiny, tiny_inpainting, tmp_path, channels):
    """4 channels: the original, noised to each step's σ, is re-imposed outside the mask (strength 0.5 here is
    diffusers' 0.6, as for img2img). 9 channels: mask and masked-image latent join the UNet input."""
    path, config, sd = tiny if channels == 4 else tiny_inpainting
    init, mask = init_picture(64), rectangle_mask(64)
    strength, ref_strength = (0.5, 0.6) if channels == 4 else (1.0, 1.0)
    options = dict(width=64, height=64, steps=10, cfg_scale=5.0, sampler="Euler", schedule="Simple", seed=5,
                   strength=strength, mask_blur=0, negative_prompt=NEGATIVE)
    latents = sd.inpaint(init, mask, PROMPT, output="latent", **options)
    images = sd.inpaint(init, mask, PROMPT, **options)
    original = minisd.image.pil_to_tensor(init)
    binary = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    ref = reference_pipeline("StableDiffusionInpaintPipeline", path, config, tmp_path, euler_reference())
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=sd.encode_latents(original), mask_image=binary,
                  masked_image_latents=sd.encode_latents(original * (1 - binary)), height=64, width=64,
                  strength=ref_strength, num_inference_steps=10, guidance_scale=5.0)
    assert relative(latents, ref(**common, generator=fresh([5]), output_type="latent").images) <= 1e-4
    ours, theirs = pixels(images)[0], pixels(ref(**common, generator=fresh([5]), output_type="pil").images)[0]
    inside = np.asarray(mask) > 127
    assert np.abs(ours - theirs)[inside].max() <= 2  # outside, ours is the original itself:
    assert (ours[~inside] == np.asarray(init)[~inside]).all()


def test_inpainting_keeps_everything_outside_the_mask(tiny):
    """With the default blurred mask, the final composite leaves every pixel outside the (unblurred) mask equal
    to the original; the blur feathers the edge inwards only."""
    _, _, sd = tiny
    init, mask = init_picture(64), Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse([13, 21, 50, 44], fill=255)  # not aligned to anything
    out = pixels(sd.inpaint(init, mask, "a green square", width=64, height=64, steps=4, seed=1, mask_blur=6))[0]
    outside = np.asarray(mask) == 0
    assert (out[outside] == np.asarray(init)[outside]).all()
    assert (out[~outside] != np.asarray(init)[~outside]).any()


def test_inpaint_only_masked_pastes_back_into_the_full_image(tiny):
    _, _, sd = tiny
    init = init_picture(96)
    mask = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(mask).rectangle([60, 60, 75, 80], fill=255)
    (out,) = sd.inpaint(init, mask, "a green square", width=32, height=32, steps=3, seed=2,
                        inpaint_only_masked=True, only_masked_padding=8)
    assert out.size == (96, 96)
    outside = np.asarray(mask) == 0
    assert (np.asarray(out)[outside] == np.asarray(init)[outside]).all()


def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(tiny):
    _, _, sd = tiny
    options = dict(width=32, height=32, steps=6, sampler="Euler a", cfg_scale=4.0)
    batch = sd.txt2img(PROMPT, seed=100, batch_size=3, output="latent", **options)
    for i in range(3):
        single = sd.txt2img(PROMPT, seed=100 + i, output="latent", **options)
        # equal up to float rounding: a batched matmul may sum in another order than a single one
        assert relative(batch[i:i + 1], single) <= 1e-5
    again = sd.txt2img(PROMPT, seed=101, **options)
    assert pixels(again).tolist() == pixels(sd.txt2img(PROMPT, seed=101, **options)).tolist()


def test_n_iter_continues_the_seeds_and_records_them(tiny):
    _, _, sd = tiny
    images = sd.txt2img(PROMPT, seed=7, batch_size=2, n_iter=2, width=32, height=32, steps=2)
    assert [im.info["seed"] for im in images] == [7, 8, 9, 10]
    assert "Seed: 9," in images[2].info["parameters"]


def test_random_seed_is_reported(tiny):
    _, _, sd = tiny
    (image,) = sd.txt2img(PROMPT, seed=-1, width=32, height=32, steps=2)
    seed = image.info["seed"]
    assert 0 <= seed < 2**32 and f"Seed: {seed}," in image.info["parameters"]
    assert pixels([image]).tolist() == pixels(sd.txt2img(PROMPT, seed=seed, width=32, height=32, steps=2)).tolist()


def test_caller_supplied_noise(tiny):
    _, _, sd = tiny
    noise = seeds_noise([42], (4, 4, 4))
    a = sd.txt2img(PROMPT, noise=noise, width=32, height=32, steps=3, output="latent", seed=1)
    b = sd.txt2img(PROMPT, width=32, height=32, steps=3, output="latent", seed=42)
    assert torch.equal(a, b)


@pytest.mark.parametrize("field, value, phrase", [
    ("width", 500, "nearest valid sizes: 496 or 504"), ("steps", 0, "steps"), ("strength", 1.5, "strength"),
    ("batch_size", 0, "batch size"), ("sampler", "Euler z", "valid samplers"), ("cfg_scale", "abc", "CFG scale"),
    ("seed", -2, "seed"), ("schedule", "wiggly", "valid schedules"),
])
def test_bad_parameters_are_refused(field, value, phrase):
    with pytest.raises(minisd.ParameterError, match=phrase):
        GenerationParams(**{field: value}).validated()


@pytest.mark.slow
def test_full_sd15_txt2img_equals_diffusers(tmp_path):
    config = PRESETS["sd1"]
    path = tmp_path / "sd15.safetensors"
    write_checkpoint(path, config, seed=23, dtype=torch.float16, record_config=False)
    sd = minisd.load(path, dtype=torch.float32)
    options = dict(width=64, height=64, steps=4, cfg_scale=7.5, sampler="Euler", schedule="Simple", seed=9)
    latents = sd.txt2img(PROMPT, output="latent", **options)
    del sd
    ref = reference_pipeline("StableDiffusionPipeline", path, config, tmp_path, euler_reference())
    ref_latents = ref(prompt=PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
                      latents=seeds_noise([9], (4, 8, 8)), output_type="latent").images
    assert relative(latents, ref_latents) <= 1e-4


def test_a_request_that_cannot_fit_in_memory_is_refused_before_starting(tiny):
    _, _, sd = tiny
    with pytest.raises(minisd.ParameterError, match="GiB, but only .* GiB is free"):
        sd.txt2img(PROMPT, width=8192, height=8192, batch_size=64, steps=1)


def unet_batches(sd, monkeypatch) -> list[int]:
    """The batch size of every UNet call from now on."""
    batches: list[int] = []
    forward = sd.unet.forward
    monkeypatch.setattr(sd.unet, "forward", lambda x, *a, **k: batches.append(x.shape[0]) or forward(x, *a, **k))
    return batches


def test_sequential_guidance_equals_batched_and_starts_when_memory_is_short(tiny, monkeypatch):
    _, config, sd = tiny
    options = dict(negative_prompt=NEGATIVE, width=64, height=64, steps=2, seed=5, batch_size=8, output="latent")
    batches = unet_batches(sd, monkeypatch)
    batched = sd.txt2img(PROMPT, **options)
    assert batches == [16, 16]
    batches.clear()
    sequential = sd.txt2img(PROMPT, sequential_guidance=True, **options)
    assert batches == [8, 8, 8, 8] and relative(sequential, batched) <= 1e-5

    # Automatic: when only the two separate calls fit in the free memory.
    from minisd import memory, pipeline
    together, apart = (memory.estimate_generation_memory(config, 64, 64, 8, sd.dtype, tiled_vae=True,
                                                         sequential_guidance=s) for s in (False, True))
    assert apart < together
    monkeypatch.setattr(pipeline, "available_memory", lambda device: (apart + together) // 2)
    batches.clear()
    sd.txt2img(PROMPT, **options)
    assert batches == [8, 8, 8, 8]


def test_default_size_is_the_models_own(tiny):
    _, config, sd = tiny
    (image,) = sd.txt2img(PROMPT, steps=1, seed=1)
    assert image.size == (config.image_size, config.image_size) == (512, 512)
