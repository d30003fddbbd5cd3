"""float16 overflows and how minisd survives them: attention scores beyond float16's 65504 (SD 2.1's known
overflow) on tiny SD 2.x weights built to overflow, against plain float16 attention and diffusers; the SDXL
autoencoder's float16 decode that overflows and is redone in float32; a fixed VAE file (`--vae`) for SDXL."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minisd
from minisd.checkpoint import save_checkpoint
from minisd.config import PRESETS
from minisd.models import attention_precision
from minisd.models.attention_precision import upcast_if_float16
from minisd.testing import diffusers_config_folder, random_state_dict

FLOAT16_MAX = torch.finfo(torch.float16).max  # 65504


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def float16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_) -> torch.Tensor:
    """Attention computed entirely in the inputs' precision: softmax(q kᵀ/√d) v with float16 scores, what a
    kernel without float32 accumulation does (the plain reference of the overflow)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ v


# ---- attention scores beyond float16's range --------------------------------------------------------------------

ATTN2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2."  # level 0: 4 heads of 8 channels
KEY_LEVEL, QUERY_GAIN = 256.0, 400.0


@pytest.fixture(scope="module")
def overflowing_sd2(tmp_path_factory):
    """A tiny SD 2.x (float16 file) whose first cross-attention has q·kᵀ beyond 65504 in head 0.

    Head 0's first key channel is KEY_LEVEL·context[..., 0] and the context's channel 0 is 2 for every token:
    that key channel is 512 for all keys, exactly in float16 and float32, and query i adds q_i0·512 (|q_i0| up
    to ~10³ through the amplified query row) to all of its scores alike. Far beyond float16's range, but a
    per-query constant the softmax cancels: the attention itself stays as well-conditioned as the random model's,
    so float16 and float32 results can be compared closely."""
    config = PRESETS["tiny-sd2"]
    state = random_state_dict(config, seed=41)
    to_k = torch.zeros_like(state[ATTN2 + "to_k.weight"][0])
    to_k[0] = KEY_LEVEL
    state[ATTN2 + "to_k.weight"][0] = to_k
    state[ATTN2 + "to_q.weight"][0] *= QUERY_GAIN
    path = tmp_path_factory.mktemp("half") / "overflowing-sd2.safetensors"
    save_checkpoint(path, state, config, dtype=torch.float16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g).half().float()  # inputs exactly representable in float16
    t = torch.tensor([981.0])
    context = torch.randn(1, 7, config.unet.context_dim, generator=g).half().float()
    context[..., 0] = 2.0
    return path, config, (x, t, context), minisd.load(path, dtype=torch.float16), minisd.load(path, dtype=torch.float32)


def unet_output(sd: minisd.StableDiffusion, inputs) -> torch.Tensor:
    x, t, context = inputs
    with torch.no_grad():
        return sd.unet(x.to(sd.dtype), t, context.to(sd.dtype)).float()


def first_cross_attention_scores(sd: minisd.StableDiffusion, inputs) -> torch.Tensor:
    """Head 0's q·kᵀ of the rigged cross-attention, computed in float32 from its float16 q and k."""
    seen = {}
    module = sd.unet.input_blocks[1][1].transformer_blocks[0].attn2
    module.probe = lambda m, q, k: seen.update(q=q, k=k)
    try:
        unet_output(sd, inputs)
    finally:
        del module.probe
    return seen["q"][:, 0].float() @ seen["k"][:, 0].float().transpose(-1, -2)


def test_cpu_attention_forms_float16_scores_in_float32():
    """What the device rule rests on (attention_precision.SCORES_IN_FLOAT32): torch's CPU attention kernels
    compute float16 attention with float32 scores; float16 scores overflow on the same input."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (40, 9, 9))
    q, k = q * 150, k * 150
    assert (q @ k.transpose(-1, -2)).abs().max() > 2 * FLOAT16_MAX
    exact = F.scaled_dot_product_attention(q, k, v)
    half = [t.half() for t in (q, k, v)]
    assert not torch.isfinite(float16_attention(*half)).all()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*half)
        assert torch.isfinite(out).all() and relative(out, exact) <= 5e-3
    assert attention_precision.float32_scores_guaranteed(q.device)


def test_the_upcast_applies_to_float16_only(monkeypatch):
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.bfloat16) for _ in range(3))
    monkeypatch.setattr(attention_precision, "SCORES_IN_FLOAT32", set())  # as on a device without the guarantee
    for dtype in (torch.float32, torch.bfloat16):  # unchanged: the very same tensors
        args = tuple(t.to(dtype) for t in (q, k, v))
        assert all(a is b for a, b in zip(upcast_if_float16(*args), args))
    assert {t.dtype for t in upcast_if_float16(q.half(), k.half(), v.half())} == {torch.float32}
    monkeypatch.undo()
    args = tuple(t.half() for t in (q, k, v))  # on CPU float16 passes through: its kernels use float32 scores
    assert all(a is b for a, b in zip(upcast_if_float16(*args), args))


def test_float16_unet_survives_scores_beyond_float16(overflowing_sd2, tmp_path):
    """The rigged scores overflow float16 (plain float16 attention and diffusers' float16 attention without
    `upcast_attention` give NaN); minisd's float16 UNet is finite and equals its float32 output and diffusers'
    (float32, and float16 with `upcast_attention=True`) within float16's precision."""
    import diffusers
    from diffusers.models.attention_processor import Attention, AttnProcessor

    path, config, inputs, sd16, sd32 = overflowing_sd2
    scores = first_cross_attention_scores(sd16, inputs)
    assert scores.abs().max() > 2 * FLOAT16_MAX
    # the scores of each query differ by a well-conditioned amount: the overflow is all in a per-query constant
    spread = scores - scores.mean(-1, keepdim=True)
    assert spread.abs().max() < 50

    ours16, ours32 = unet_output(sd16, inputs), unet_output(sd32, inputs)
    assert torch.isfinite(ours16).all()
    assert relative(ours16, ours32) <= 5e-3

    folder = diffusers_config_folder(tmp_path / "configs", config)
    ref = diffusers.UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet").eval()
    x, t, context = inputs
    with torch.no_grad():
        assert relative(ours32, ref(x, t, encoder_hidden_states=context).sample) <= 1e-4
        ref16 = ref.half()
        ref16.set_attn_processor(AttnProcessor())  # diffusers' attention with explicit (non-fused) scores
        outputs = {}
        for upcast in (False, True):
            for module in ref16.modules():
                if isinstance(module, Attention):
                    module.upcast_attention = upcast
            outputs[upcast] = ref16(x.half(), t, encoder_hidden_states=context.half()).sample.float()
    assert not torch.isfinite(outputs[False]).all()
    assert torch.isfinite(outputs[True]).all() and relative(ours16, outputs[True]) <= 5e-3


def test_the_upcast_takes_over_where_the_kernel_has_float16_scores(overflowing_sd2, monkeypatch):
    """On a device whose attention kernel forms the scores in float16 (simulated: plain float16 attention in place
    of torch's, the device not in SCORES_IN_FLOAT32), the float16 UNet overflows to NaN without the upcast and
    equals the float32 UNet with it."""
    _, _, inputs, sd16, sd32 = overflowing_sd2
    expected = unet_output(sd32, inputs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", float16_attention)
    assert not torch.isfinite(unet_output(sd16, inputs)).all()  # CPU is trusted: no upcast, the kernel overflows
    monkeypatch.setattr(attention_precision, "SCORES_IN_FLOAT32", set())
    out = unet_output(sd16, inputs)
    assert torch.isfinite(out).all() and relative(out, expected) <= 5e-3


def test_vae_attention_takes_the_same_upcast(monkeypatch):
    """The autoencoder's mid-block attention (its encoder has no float32 retry) under the same simulated kernel:
    scores beyond float16 (a key channel that is 512 at every pixel, its query channel amplified) stay finite
    and equal the float32 block."""
    from minisd.models.vae import AttnBlock

    block = AttnBlock(32, 8).eval()
    with torch.no_grad():
        for conv in (block.q, block.k, block.v, block.proj_out):
            conv.weight.normal_(0, 32 ** -0.5, generator=torch.Generator().manual_seed(1))
            conv.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        block.k.weight[0], block.k.bias[0] = 0.0, 2 * KEY_LEVEL
        block.q.weight[0] *= QUERY_GAIN
    block.half().float()  # float16 weights in both precisions
    x = torch.randn(1, 32, 6, 5, generator=torch.Generator().manual_seed(3)).half().float()
    with torch.no_grad():
        expected = block(x)
        q = block.q(block.norm(x))[:, 0].flatten()
        assert (q.abs().max() * 2 * KEY_LEVEL) > 2 * FLOAT16_MAX
        monkeypatch.setattr(F, "scaled_dot_product_attention", float16_attention)
        assert not torch.isfinite(block.half()(x.half())).all()
        monkeypatch.setattr(attention_precision, "SCORES_IN_FLOAT32", set())
        out = block(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and relative(out, expected) <= 5e-3


# ---- the SDXL autoencoder's float16 overflow ------------------------------------------------------------------

DECODER_GAIN = 1e5  # decoder.conv_in's output ~10⁵: beyond float16, harmless in float32 (the norms rescale it)


@pytest.fixture(scope="module")
def overflowing_sdxl(tmp_path_factory):
    """A tiny SDXL (float16 file) whose decoder overflows float16 as SDXL's own VAE does at real sizes: its first
    convolution's output is ~10⁵; every later GroupNorm normalises it away, so float32 decodes it fine."""
    config = PRESETS["tiny-sdxl"]
    state = random_state_dict(config, seed=42)
    for name in ("weight", "bias"):
        state[f"first_stage_model.decoder.conv_in.{name}"] *= DECODER_GAIN
    path = tmp_path_factory.mktemp("half-sdxl") / "overflowing-sdxl.safetensors"
    save_checkpoint(path, state, config, dtype=torch.float16)
    return path, config, minisd.load(path, dtype=torch.float16), minisd.load(path, dtype=torch.float32)


@pytest.mark.parametrize("tiled", [False, True])
def test_float16_vae_overflow_is_decoded_in_float32(overflowing_sdxl, tiled):
    _, config, sd16, sd32 = overflowing_sdxl
    latents = torch.randn(2, 4, 4, 3, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain16 = sd16.vae.decode((latents[:1] / config.vae.scaling_factor).half())
    assert not torch.isfinite(plain16).all()  # the float16 decode overflows
    images = sd16.decode_latents(latents, tiled=tiled)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    expected = sd32.decode_latents(latents, tiled=tiled)
    assert expected.std() > 0.1  # a real picture, not a constant
    assert relative(images, expected) <= 1e-5
    assert {p.dtype for p in sd16.vae.parameters()} == {torch.float16}  # the model itself stays float16


def test_float16_sdxl_generation_with_the_overflowing_vae(overflowing_sdxl):
    """Through generation: the float16 model's image is the float32 model's within float16's precision."""
    _, _, sd16, sd32 = overflowing_sdxl
    options = dict(width=32, height=24, steps=2, sampler="Euler", seed=9, cfg_scale=5.0, tiled_vae=False)
    ours = np.asarray(sd16.txt2img("a red circle", **options)[0], dtype=np.int16)
    full = np.asarray(sd32.txt2img("a red circle", **options)[0], dtype=np.int16)
    assert full.std() > 10 and np.abs(ours - full).max() <= 3


def test_a_fixed_vae_file_for_sdxl(overflowing_sdxl, tmp_path):
    """`--vae FILE` on an SDXL model: a VAE that does not overflow (as "sdxl-vae-fp16-fix" is), as a CompVis-named
    file and as a diffusers `vae/` folder made by diffusers itself, decodes exactly as the model it came from."""
    import diffusers
    from safetensors.torch import save_file

    from minisd.cli import main

    path, config, _, _ = overflowing_sdxl
    fixed_path = tmp_path / "fixed-model.safetensors"
    save_checkpoint(fixed_path, random_state_dict(config, seed=43), config, dtype=torch.float16)
    fixed = minisd.load(fixed_path, dtype=torch.float16)
    save_file({k: v.contiguous() for k, v in fixed.vae.state_dict().items()}, str(tmp_path / "sdxl_vae.safetensors"))
    reference = diffusers.AutoencoderKL.from_single_file(
        str(fixed_path), config=str(diffusers_config_folder(tmp_path / "configs", config)), subfolder="vae")
    reference.save_pretrained(str(tmp_path / "vae-fp16-fix"))
    latents = torch.randn(1, 4, 4, 3, generator=torch.Generator().manual_seed(7))
    expected = fixed.decode_latents(latents)
    for vae_path in (tmp_path / "sdxl_vae.safetensors", tmp_path / "vae-fp16-fix"):
        sd = minisd.load(path, dtype=torch.float16)
        sd.load_vae(vae_path)
        with torch.no_grad():
            assert torch.isfinite(sd.vae.decode((latents / config.vae.scaling_factor).half())).all()
        assert torch.equal(sd.decode_latents(latents), expected)
    out = tmp_path / "out.png"
    assert main(["generate", "a cat", "-m", str(path), "-W", "24", "-H", "24", "--steps", "1", "--dtype", "fp32",
                 "-o", str(out), "--vae", str(tmp_path / "sdxl_vae.safetensors"), "-q"]) == 0
    from PIL import Image
    assert "VAE: sdxl_vae.safetensors" in Image.open(out).text["parameters"]
