"""SD 2.x (ε and v, inpainting): key manifests of the real checkpoints, tiny-model parity of every network and of
txt2img with diffusers/transformers on the very same original-layout file, the OpenCLIP tokenizer path, how
v-prediction is chosen, and the one-pass guidance at CFG 1 (for every family)."""
from __future__ import annotations

import dataclasses
import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import minisd
from minisd.checkpoint import IGNORED_KEYS, original_state_dict
from minisd.config import (PRESETS, V_PREDICTION, ModelConfig, OpenCLIPTextConfig, UNetConfig, VAEConfig,
                           infer_config)
from minisd.models.conditioner import text_encoder_for
from minisd.models.unet import UNetModel
from minisd.models.vae import AutoencoderKL
from minisd.prompts import tokenize_prompt
from minisd.testing import SD_SCHEDULER, reference_family_components, reference_family_pipeline, write_checkpoint
from minisd.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer

from conftest import DATA

PROMPT, NEGATIVE = "a red circle on the left, blue background", "blurry"


def manifest(name: str) -> dict[str, list[int]]:
    with gzip.open(DATA / f"{name}.json.gz", "rt") as f:
        return json.load(f)["keys"]


def meta_keys(config: ModelConfig) -> dict[str, list[int]]:
    with torch.device("meta"):
        state = original_state_dict(UNetModel(config.unet), AutoencoderKL(config.vae), text_encoder_for(config))
    return {k: list(v.shape) for k, v in state.items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name, preset", [("sd2", "sd2-base"), ("sd2-inpaint", "sd2-inpaint")])
def test_keys_and_shapes_equal_the_real_checkpoints(name, preset):
    """The keys do not show v-prediction: sd2.json (768-v) infers as the ε config, the file decides the rest."""
    real = manifest(name)
    config = infer_config({k: torch.empty(v, device="meta") for k, v in real.items()})
    assert config == PRESETS[preset]
    assert meta_keys(config) == {k: v for k, v in real.items() if k not in IGNORED_KEYS}
    assert meta_keys(PRESETS["sd2"]) == meta_keys(PRESETS["sd2-base"])


def tiny_file(tmp_path, config: ModelConfig, seed: int, name: str = "tiny-sd2.safetensors", **options):
    path = tmp_path / name
    write_checkpoint(path, config, seed=seed, **options)
    return path


@pytest.mark.parametrize("in_channels", [4, 9])
def test_networks_equal_diffusers_and_transformers(tmp_path, in_channels):
    base = PRESETS["tiny-sd2"]
    config = base if in_channels == 4 else dataclasses.replace(
        base, variant="sd2-inpaint", unet=dataclasses.replace(base.unet, in_channels=9))
    path = tiny_file(tmp_path, config, seed=31)
    ours = minisd.load(path, dtype=torch.float32)
    ref = reference_family_components(path, config, tmp_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = torch.randn(2, in_channels, 16, 24, generator=g)
        t = torch.tensor([1.0, 981.0])
        context = torch.randn(2, 9, config.unet.context_dim, generator=g)
        assert relative(ours.unet(x, t, context), ref["unet"](x, t, encoder_hidden_states=context).sample) <= 1e-4
        pixels = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
        assert relative(ours.vae.encode(pixels), ref["vae"].encode(pixels).latent_dist.mean) <= 1e-4
        z = torch.randn(1, 4, 8, 6, generator=g)
        assert relative(ours.vae.decode(z), ref["vae"].decode(z).sample) <= 1e-4
        # SD 2.x conditions on the penultimate layer through the final norm: diffusers' text encoder is the
        # OpenCLIP tower without its last layer, read at its (normed) output.
        ids = torch.randint(0, config.open_clip.vocab_size, (2, 77), generator=g)
        assert relative(ours.text_encoder(ids), ref["text_encoder"](ids).last_hidden_state) <= 1e-4
        # Clip skip 2 goes one layer further down (diffusers' clip_skip=1: hidden_states[-2], then the norm).
        out = ref["text_encoder"](ids, output_hidden_states=True)
        norm = getattr(ref["text_encoder"], "text_model", ref["text_encoder"]).final_layer_norm
        assert relative(ours.text_encoder(ids, clip_skip=2), norm(out.hidden_states[-2])) <= 1e-4


def test_open_clip_padding_equals_transformers_tokenizer_with_pad_bang(tmp_path):
    """Our chunks with OpenCLIP's padding (0 after the first end-of-text) equal transformers' CLIPTokenizer as
    diffusers configures SD 2.x's and SDXL's `tokenizer_2` (pad token "!", id 0), padded to 77, on the strings of
    the tokenizer tests. One known difference: that tokenizer also reads a "!" typed in the prompt as its pad
    token (id 0), where OpenCLIP (and A1111) read the word "!" (id 256); strings with "!" are checked on that."""
    from transformers import CLIPTokenizer as RefTokenizer

    from minisd.tokenizer import write_hf_files
    from test_tokenizer import PROMPTS, random_strings

    write_hf_files(tmp_path / "tok", pad_token="!")  # as diffusers' SD 2.x / SDXL tokenizer folders
    ref = RefTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert ref.pad_token_id == 0
    tok = CLIPTokenizer()
    checked = 0
    for text in PROMPTS + random_strings(300, seed=15):
        if len(tok.encode(text, add_special_tokens=False)) > 75 or re.search(r"<\w+:[^>]+>", text):
            continue  # one chunk only (diffusers truncates); A1111's <lora:...> tags are not text
        if "<|endoftext|>" in text:  # A1111 pads from the first end-of-text on, even a typed one
            continue
        chunks = tokenize_prompt(tok, text, emphasis="None", pad_id=0, comma_backtrack=0)
        if "!" in text:
            # the quirk itself: ours reads "!" as the word "!", the reference as its pad token
            a, bang, b = (tok.token_to_id(t) for t in ("a</w>", "!</w>", "b</w>"))
            assert ref("a!b").input_ids == [BOS_ID, a, 0, b, EOS_ID]
            assert tok.encode("a!b") == [BOS_ID, a, bang, b, EOS_ID]
            continue
        assert [c.ids for c in chunks] == [ref(text, padding="max_length", max_length=77).input_ids], text
        checked += 1
    assert checked >= 200


def euler_v():
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction"}, timestep_spacing="trailing")


def test_v_prediction_txt2img_equals_diffusers(tmp_path):
    config = dataclasses.replace(PRESETS["tiny-sd2"], schedule=V_PREDICTION)
    path = tiny_file(tmp_path, config, seed=32)
    sd = minisd.load(path, dtype=torch.float32)
    assert sd.schedule.prediction_type == "v_prediction"
    options = dict(negative_prompt=NEGATIVE, width=64, height=48, steps=8, cfg_scale=6.0, sampler="Euler",
                   schedule="Simple", seed=11, batch_size=2)
    latents = sd.txt2img(PROMPT, output="latent", **options)
    eps = torch.cat([torch.randn((1, 4, 6, 8), generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    ref = reference_family_pipeline("StableDiffusionPipeline", path, config, tmp_path, euler_v())
    ref_latents = ref(prompt=[PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, height=48, width=64,
                      num_inference_steps=8, guidance_scale=6.0, latents=eps, output_type="latent").images
    assert relative(latents, ref_latents) <= 1e-4


# A small SD 2.x whose every hyperparameter follows the conventions that inference assumes (64-channel heads,
# 32 norm groups), so that a file of it without minisd's metadata loads to exactly this config.
INFERABLE = ModelConfig(
    variant="sd2", unet=UNetConfig(model_channels=64, channel_mult=(1, 2), attention_levels=(0, 1), head_channels=64,
                                   context_dim=64, use_linear_projection=True),
    vae=VAEConfig(channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1), text=None,
    open_clip=OpenCLIPTextConfig(width=64, layers=2, heads=1, mlp_width=128, projection_dim=64))


def test_how_v_prediction_is_chosen(tmp_path):
    """The file's own config (minisd metadata), a ComfyUI `v_pred` key, A1111's `.yaml` beside the file, or
    `prediction=`/`--prediction`, which beats them all; v-models default to 768×768."""
    config = INFERABLE
    plain = tiny_file(tmp_path, config, seed=33, name="plain.safetensors")
    eps = minisd.load(plain, dtype=torch.float32)
    assert (eps.schedule.prediction_type, eps.config.image_size) == ("epsilon", 512)
    v = minisd.load(plain, dtype=torch.float32, prediction="v")
    assert (v.schedule.prediction_type, v.config.image_size) == ("v_prediction", 768)

    from safetensors.torch import load_file, save_file
    state = load_file(str(plain))
    save_file({**state, "v_pred": torch.tensor([])}, str(tmp_path / "marked.safetensors"))
    # without metadata the config is inferred; ComfyUI's marker says v
    marked = minisd.load(tmp_path / "marked.safetensors", dtype=torch.float32)
    assert marked.config == dataclasses.replace(INFERABLE, image_size=768, schedule=V_PREDICTION)
    save_file(state, str(tmp_path / "beside.safetensors"))
    (tmp_path / "beside.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    beside = minisd.load(tmp_path / "beside.safetensors", dtype=torch.float32)
    assert beside.schedule.prediction_type == "v_prediction" and beside.config.image_size == 768
    assert minisd.load(tmp_path / "beside.safetensors", dtype=torch.float32,
                       prediction="eps").schedule.prediction_type == "epsilon"
    with pytest.raises(minisd.CheckpointError, match="prediction must be"):
        minisd.load(plain, prediction="x0")

    # the default size of a v-model: 768×768 (latents 96×96)
    assert v.txt2img("a cat", steps=1, seed=1, output="latent").shape == (1, 4, 96, 96)
    # the CLI's --prediction v: the infotext of a v-model's image (a small one here)
    out = tmp_path / "v.png"
    result = subprocess.run([sys.executable, "-m", "minisd", "generate", "a cat", "--model", str(plain), "--prediction",
                             "v", "--steps", "2", "--seed", "1", "-W", "64", "-H", "64", "--dtype", "fp32", "-o",
                             str(out), "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from PIL import Image
    expected = v.txt2img("a cat", steps=2, seed=1, width=64, height=64)[0]
    assert (np.asarray(Image.open(out)) == np.asarray(expected)).all()


class CountingUNet:
    """Counts the UNet calls of one generation (and the batch each saw)."""

    def __init__(self, sd: minisd.StableDiffusion):
        self.sd, self.inner, self.batches = sd, sd.unet, []

    def __enter__(self):
        inner, batches = self.inner, self.batches

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, x, *args, **kwargs):
                batches.append(x.shape[0])
                return inner(x, *args, **kwargs)

        self.sd.unet = Wrapped()
        return self

    def __exit__(self, *exc):
        self.sd.unet = self.inner


@pytest.mark.parametrize("preset, prediction", [("tiny", "eps"), ("tiny-sd2", "v"), ("tiny-sdxl", "eps")])
def test_cfg_one_runs_one_unet_pass_and_equals_two_passes(tmp_path, preset, prediction):
    """At CFG 1 guidance is D_u + 1·(D_c − D_u) = D_c: one UNet pass per step (on the prompt alone), equal to the
    two-pass computation; at CFG 0 it is D_u, one pass on the negative prompt."""
    from minisd.denoiser import CFGDenoiser

    path = tiny_file(tmp_path, PRESETS[preset], seed=34)
    sd = minisd.load(path, dtype=torch.float32, prediction=prediction)
    options = dict(negative_prompt=NEGATIVE, width=32, height=32, steps=5, sampler="Euler", seed=3, batch_size=2,
                   output="latent")
    for scale in (1.0, 0.0):
        with CountingUNet(sd) as count:
            one = sd.txt2img(PROMPT, cfg_scale=scale, **options)
        assert count.batches == [2] * 5  # once per step, the images' own batch

        def two_pass(self, x, sigma, scale=scale):  # the formula, both halves evaluated
            both = self.model(torch.cat([x, x]), torch.cat([sigma.expand(2), sigma.expand(2)]),
                              _batched(self.cond, self.uncond, x.shape[0]), None)
            d_cond, d_uncond = both.chunk(2)
            return d_uncond + scale * (d_cond - d_uncond)

        original = CFGDenoiser.__call__
        CFGDenoiser.__call__ = two_pass
        try:
            with CountingUNet(sd) as count:
                two = sd.txt2img(PROMPT, cfg_scale=scale, **options)
        finally:
            CFGDenoiser.__call__ = original
        assert count.batches == [4] * 5
        assert relative(one, two) <= 1e-5


def _batched(cond, uncond, b):
    def expand(t):
        return t.expand(b, *t.shape[1:])
    if isinstance(cond, dict):
        return {k: torch.cat([expand(cond[k]), expand(uncond[k])]) for k in cond}
    return torch.cat([expand(cond), expand(uncond)])


@pytest.mark.parametrize("name, keys", [
    ("SD 3 / 3.5", ["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"]),
    ("Flux", ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]),
    ("Stable Cascade", ["clip_txt_mapper.weight", "down_blocks.0.0.channelwise.0.weight"]),
])
def test_other_families_are_refused_in_one_line_naming_them(tmp_path, name, keys):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(minisd.UnsupportedModelError) as info:
        minisd.load(path)
    assert str(info.value) == f"{path}: {name} checkpoints are not supported (minisd runs SD 1.x, SD 2.x and SDXL)"
    if name == "Flux":  # and through the CLI: one line, exit code 2
        result = subprocess.run([sys.executable, "-m", "minisd", "info", str(path)], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and name in result.stderr


def test_inpainting_equals_diffusers(tmp_path):
    """SD 2.x inpainting (9-channel UNet: mask and masked-image latent join the input) equals diffusers'
    StableDiffusionInpaintPipeline on the same file, noise and Euler sigmas; as ε (the released 512 model) and,
    read by `prediction="v"` / diffusers' v scheduler, as v."""
    from PIL import Image, ImageDraw
    from test_pipeline import euler_reference, init_picture

    base = PRESETS["tiny-sd2"]
    config = dataclasses.replace(base, variant="sd2-inpaint", unet=dataclasses.replace(base.unet, in_channels=9))
    path = tiny_file(tmp_path, config, seed=35)
    init, mask = init_picture(32), Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle([8, 0, 23, 15], fill=255)  # aligned to the 8-pixel latent grid
    # 5 steps: 1000/5 is whole, so A1111's "Simple" grid and diffusers' "trailing" one are the same timesteps
    options = dict(width=32, height=32, steps=5, cfg_scale=5.0, sampler="Euler", schedule="Simple", seed=5,
                   strength=1.0, mask_blur=0, negative_prompt=NEGATIVE)
    original = minisd.image.pil_to_tensor(init)
    binary = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    ref = reference_family_pipeline("StableDiffusionInpaintPipeline", path, config, tmp_path, euler_reference())
    for prediction, scheduler in (("eps", euler_reference()), ("v", euler_v())):
        sd = minisd.load(path, dtype=torch.float32, prediction=prediction)
        latents = sd.inpaint(init, mask, PROMPT, output="latent", **options)
        ref.scheduler = scheduler
        common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=sd.encode_latents(original), mask_image=binary,
                      masked_image_latents=sd.encode_latents(original * (1 - binary)), height=32, width=32,
                      strength=1.0, num_inference_steps=5, guidance_scale=5.0)
        generator = torch.Generator().manual_seed(5)  # diffusers draws the initial noise as minisd does for seed 5
        # (the decode and A1111's overlay of the original outside the mask are the family-independent part that
        # test_pipeline.py's SD 1.x inpainting test checks)
        assert relative(latents, ref(**common, generator=generator, output_type="latent").images) <= 1e-4, prediction
