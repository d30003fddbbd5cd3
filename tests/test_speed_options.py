"""Issue 13's speed options on a tiny random model: the CFG interval (two passes inside, one outside, exact
call counts), DeepCache (interval 1 is the UNet bit for bit, a cached call reproduces the full one, fewer deep
passes), channels-last bf16/fp32 against NCHW and the per-CPU layout choice, the fast preset and --compile's
cache folder."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minisd
from minisd.cli import build_parser, generation_params, main
from minisd.compiled import compile_cache_dir, configure_inductor
from minisd.deep_cache import DeepCacheUNet
from minisd.denoiser import CFGDenoiser, guidance_interval, make_denoiser
from minisd.errors import ParameterError
from minisd.models.unet import UNetModel
from minisd.models.vae import AutoencoderKL
from minisd.params import GenerationParams
from minisd.precision import compute_choice, memory_format
from minisd.prompts import encode_prompt_pair
from minisd.samplers import sample_euler
from minisd.schedule import get_sigmas

PROMPT = "a red circle"
SIZE = dict(width=64, height=64)  # 8×8 latents


@pytest.fixture(scope="module")
def sd(tiny_checkpoint):
    return minisd.load(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def plain(sd) -> list[dict]:
    """The reference trajectory: 10 guided Euler steps, every option off."""
    return trajectory(sd, steps=10, cfg_scale=7.5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|, b the reference."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


class UNetCalls:
    """Batch size of every call of a module (forward hook)."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.batches.append(args[0].shape[0]))

    def __enter__(self) -> "UNetCalls":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def trajectory(sd, **options) -> list[dict]:
    """Every step's callback record (x, σ, denoised) of a txt2img to latents."""
    steps: list[dict] = []
    sd.txt2img(PROMPT, seed=3, sampler="Euler", output="latent", **SIZE,
               callback=lambda info: steps.append({k: v.clone() if torch.is_tensor(v) else v for k, v in info.items()}),
               **options)
    return steps


# ---- CFG interval ------------------------------------------------------------------------------------------

def test_guidance_interval_maps_step_fractions_to_sigmas():
    sigmas = torch.tensor([14.6, 9.0, 6.0, 4.0, 2.5, 1.5, 0.9, 0.5, 0.25, 0.1, 0.0])  # N = 10 steps
    s = sigmas.tolist()
    assert guidance_interval(sigmas, 0.0, 0.6) == (s[6], s[0])   # steps 0..5
    assert guidance_interval(sigmas, 0.25, 0.5) == (s[5], s[3])  # ceil(2.5) = 3 .. 4
    assert guidance_interval(sigmas, 0.3, 1.0) == (0.0, s[3])    # steps 3..9, down to σ_N = 0
    low, high = guidance_interval(sigmas, 0.51, 0.59)             # no step i with 5.1 <= i < 5.9
    assert low == high


def test_cfg_interval_guides_inside_and_runs_one_pass_outside(sd, plain):
    """Euler, 10 steps, interval 0..0.6: steps 0-5 are the two-pass computation (the same trajectory, bit for
    bit, as without the interval), steps 6-9 one batch-1 pass whose prediction is the conditional one."""
    with UNetCalls(sd.unet) as calls:
        cut = trajectory(sd, steps=10, cfg_scale=7.5, cfg_interval=(0.0, 0.6))
    assert calls.batches == [2] * 6 + [1] * 4
    for i in range(6):
        assert torch.equal(cut[i]["denoised"], plain[i]["denoised"]), i
    assert not torch.equal(cut[6]["denoised"], plain[6]["denoised"])
    # Outside: D(x, σ) is the conditional denoiser alone, i.e. guidance scale 1, on the same x.
    model = make_denoiser(sd._unet_float32, sd.schedule)
    c, u = encode_prompt_pair(sd.text_encoder, sd.tokenizer, PROMPT, "")
    with torch.inference_mode():
        for i in range(6, 10):
            x, sigma = cut[i]["x"], cut[i]["sigma"]
            expected = model(x, torch.as_tensor(sigma), c)
            guided = CFGDenoiser(model, c, u, 7.5)(x, torch.as_tensor(sigma))
            assert torch.equal(cut[i]["denoised"], expected), i
            assert not torch.equal(cut[i]["denoised"], guided), i


def test_cfg_interval_equals_diffusers_cfg_cutoff(sd, tiny_checkpoint, tiny_config, tmp_path):
    """diffusers' SDCFGCutoffCallback(cutoff_step_ratio=0.4) on 8 Euler steps guides steps 0..int(3.2) = 0..3 and
    then runs the prompt alone: minisd's cfg_interval (0, 4/8) gives the same latents (parity bound 1e-4)."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.callbacks import SDCFGCutoffCallback
    from minisd.testing import SD_SCHEDULER, reference_pipeline
    latents = sd.txt2img(PROMPT, negative_prompt="blurry", steps=8, cfg_scale=6.0, sampler="Euler",
                         schedule="Simple", seed=5, output="latent", cfg_interval=(0.0, 0.5), **SIZE)
    reference = reference_pipeline("StableDiffusionPipeline", tiny_checkpoint, tiny_config, tmp_path,
                                   EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="trailing"))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    expected = reference(prompt=PROMPT, negative_prompt="blurry", height=64, width=64, num_inference_steps=8,
                         guidance_scale=6.0, latents=noise, output_type="latent",
                         callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4),
                         callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    full = sd.txt2img(PROMPT, negative_prompt="blurry", steps=8, cfg_scale=6.0, sampler="Euler",
                      schedule="Simple", seed=5, output="latent", **SIZE)
    error, cut_off_effect = rel(latents, expected), rel(full, expected)
    print(f"cfg interval vs SDCFGCutoffCallback: {error:.1e}; without the interval: {cut_off_effect:.1e}")
    assert error <= 1e-4
    assert cut_off_effect > 20 * error  # the cut-off changes the result far beyond the parity error


def test_cfg_interval_counts_with_sequential_guidance_and_late_start(sd):
    with UNetCalls(sd.unet) as calls:
        trajectory(sd, steps=8, cfg_scale=5.0, cfg_interval=(0.5, 1.0), sequential_guidance=True)
    # steps 0-3 unguided (one batch-1 call), steps 4-7 guided as two batch-1 calls each
    assert calls.batches == [1] * 4 + [1] * 8


def test_cfg_interval_validation_and_infotext():
    p = GenerationParams(prompt="x", cfg_interval="0,0.6", cache_interval="3", seed=1, **SIZE).validated()
    assert p.cfg_interval == (0.0, 0.6) and p.cache_interval == 3
    text = p.infotext(1, model_hash="abc", model_name="m", version="minisd test")
    assert 'CFG interval: "0,0.6"' in text and "Cache interval: 3" in text
    back = GenerationParams.from_infotext(text).validated()
    assert back.cfg_interval == (0.0, 0.6) and back.cache_interval == 3
    plain = GenerationParams(prompt="x", seed=1, **SIZE).validated()
    assert "CFG interval" not in plain.infotext(1, model_hash="", model_name="m", version="v")
    assert GenerationParams(cfg_interval=(0, 1)).validated().cfg_interval is None  # every step: the plain run
    for bad in ("0.6,0.2", "a,b", "0.5", "-0.1,0.5", "0,1.5"):
        with pytest.raises(ParameterError, match="CFG interval"):
            GenerationParams(cfg_interval=bad).validated()
    with pytest.raises(ParameterError, match="cache interval"):
        GenerationParams(cache_interval=0).validated()


# ---- DeepCache ---------------------------------------------------------------------------------------------

def test_deep_cache_interval_1_is_the_unet_bit_for_bit(sd):
    """A whole guided Euler run through DeepCacheUNet(interval 1) equals the plain UNet's run exactly."""
    c, u = encode_prompt_pair(sd.text_encoder, sd.tokenizer, PROMPT, "")
    sigmas = get_sigmas("karras", sd.schedule, 6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    results = []
    with torch.inference_mode():
        for unet in (sd.unet, DeepCacheUNet(sd.unet, 1)):
            model = make_denoiser(lambda x, t, ctx, unet=unet: unet(x, t, ctx), sd.schedule)
            results.append(sample_euler(CFGDenoiser(model, c, u, 7.5), x, sigmas))
    assert torch.equal(results[0], results[1])


def test_a_cached_call_reproduces_the_full_call(sd):
    """On the same inputs the shallow branch on the cached deep features gives the full pass's output exactly:
    the cut and the join are in the right place."""
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, sd.config.unet.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    cache = DeepCacheUNet(sd.unet, 2)
    with torch.inference_mode():
        full, cached, plain = cache(x, t, context), cache(x, t, context), sd.unet(x, t, context)
    assert (cache.full_passes, cache.partial_passes) == (1, 1)
    assert torch.equal(full, plain) and torch.equal(cached, full)
    # and with another timestep the cached call differs from a full one (the deep part is really skipped)
    with torch.inference_mode():
        other = cache(x, t * 0 + 100.0, context)
        assert cache.full_passes == 2  # call 2 of this stream: full again
        shallow = cache(x, t * 0 + 700.0, context)
        assert not torch.equal(shallow, sd.unet(x, t * 0 + 700.0, context))
    assert other.shape == full.shape


@pytest.mark.parametrize("interval, deep_calls", [(1, 10), (3, 4), (10, 1)])
def test_deep_cache_runs_the_deep_part_every_nth_call(sd, plain, interval, deep_calls):
    with UNetCalls(sd.unet.middle_block) as middle, UNetCalls(sd.unet.input_blocks[1]) as shallow, \
            UNetCalls(sd.unet.input_blocks[2]) as deeper:
        steps = trajectory(sd, steps=10, cfg_scale=7.5, cache_interval=interval)
    assert len(middle.batches) == deep_calls == math.ceil(10 / interval)
    assert len(deeper.batches) == deep_calls
    assert shallow.batches == [2] * 10  # the shallow branch runs on every call
    latent = steps[-1]["denoised"]
    assert torch.isfinite(latent).all()
    assert torch.equal(latent, plain[-1]["denoised"]) == (interval == 1)


def test_deep_cache_keeps_one_cache_per_stream(sd):
    """With a CFG interval the batch changes at step 5: the single-pass stream starts with its own full pass;
    with sequential guidance cond and uncond are two streams."""
    with UNetCalls(sd.unet.middle_block) as middle:
        trajectory(sd, steps=10, cfg_scale=7.5, cfg_interval=(0.0, 0.5), cache_interval=3)
    assert middle.batches == [2, 2, 1, 1]  # guided calls 0, 3; unguided calls 5, 8
    with UNetCalls(sd.unet.middle_block) as middle:
        trajectory(sd, steps=4, cfg_scale=7.5, cache_interval=2, sequential_guidance=True)
    assert middle.batches == [1, 1, 1, 1]  # cond and uncond at steps 0 and 2


def test_deep_cache_rejects_bad_settings(sd):
    with pytest.raises(ValueError):
        DeepCacheUNet(sd.unet, 0)
    with pytest.raises(ValueError):
        DeepCacheUNet(sd.unet, 2, branch=len(sd.unet.input_blocks))


# ---- channels-last and the per-CPU layout choice -----------------------------------------------------------

def layout_of(module: torch.nn.Module) -> set[bool]:
    """Whether the 3×3 convolution weights are channels-last (a 1×1 weight is both layouts at once)."""
    return {p.is_contiguous(memory_format=torch.channels_last) for p in module.parameters()
            if p.ndim == 4 and p.shape[-1] > 1}


def test_the_cpu_kind_decides_the_layout(cpu_kind, tiny_checkpoint, monkeypatch):
    amx = cpu_kind == "amx"
    choice = compute_choice("cpu")
    assert choice.memory_format == (torch.channels_last if amx else torch.contiguous_format)
    assert str(choice).startswith("bf16 channels-last" if amx else "fp32 nchw")
    assert memory_format("cpu", torch.float32) == torch.contiguous_format  # fp32: NCHW on both kinds
    assert memory_format("cpu", torch.bfloat16) == (torch.channels_last if amx else torch.contiguous_format)
    assert memory_format("cuda", torch.float16) == torch.contiguous_format
    sd = minisd.load(tiny_checkpoint)
    assert layout_of(sd.unet) == layout_of(sd.vae) == {amx}
    assert sd.dtype == (torch.bfloat16 if amx else torch.float32)
    monkeypatch.setenv("MINISD_MEMORY_FORMAT", "nchw" if amx else "channels-last")
    assert layout_of(minisd.load(tiny_checkpoint).unet) == {not amx}
    assert "MINISD_MEMORY_FORMAT" in compute_choice("cpu").reason


def test_minisd_info_names_the_layout(cpu_kind, capsys):
    assert main(["info", "demo"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("compute:"))
    assert line.split()[1:3] == (["bf16", "channels-last"] if cpu_kind == "amx" else ["fp32", "nchw"])


def test_bad_layout_override_is_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINISD_MEMORY_FORMAT", "nhwc4")
    assert main(["generate", "x", "--steps", "1", "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MINISD_MEMORY_FORMAT" in err


class CopyWatch(TorchDispatchMode):
    """Records copies (clone/contiguous/copy_) and convolution or group-norm inputs that are not channels-last."""

    def __init__(self):
        super().__init__()
        self.copies: Counter = Counter()
        self.nchw_inputs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(word in name for word in ("clone", "copy", "contiguous")):
            self.copies[name] += 1
        if ("convolution" in name or "group_norm" in name) and args[0].ndim == 4 and args[0].shape[1] > 1 \
                and args[0].shape[-1] * args[0].shape[-2] > 1 \
                and not args[0].is_contiguous(memory_format=torch.channels_last):
            self.nchw_inputs[name] += 1
        return func(*args, **(kwargs or {}))


def test_channels_last_runs_without_copies(tiny_config):
    """In channels-last every convolution and GroupNorm sees an NHWC input and nothing is copied to change the
    layout (the attention reshapes in the UNet and VAE are views in NHWC)."""
    torch.manual_seed(0)
    unet = UNetModel(tiny_config.unet).eval().to(memory_format=torch.channels_last)
    vae = AutoencoderKL(tiny_config.vae).eval().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(memory_format=torch.channels_last)
    image = torch.randn(1, 3, 64, 64, generator=g).to(memory_format=torch.channels_last)
    context = torch.randn(2, 77, tiny_config.unet.context_dim, generator=g)
    with torch.inference_mode():
        for name, run in (("unet", lambda: unet(x, torch.tensor([500.0, 500.0]), context)),
                          ("decode", lambda: vae.decode(x[:1])), ("encode", lambda: vae.encode(image))):
            watch = CopyWatch()
            with watch:
                out = run()
            assert not watch.copies and not watch.nchw_inputs, (name, watch.copies, watch.nchw_inputs)
            if name != "encode":  # the encoder's mean is a channel slice of its moments: a view
                assert out.is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_channels_last_equals_nchw(tiny_checkpoint, monkeypatch, dtype, bound):
    """UNet, VAE decode and a whole txt2img in channels-last against NCHW fp32: fp32 within the parity bound
    (1e-4), bf16 within the bf16 bound and no worse than NCHW bf16 (at most 1.5× its error + 1e-3)."""
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([700.0, 700.0])
    loaded = {}
    for layout in ("nchw", "channels-last"):
        monkeypatch.setenv("MINISD_MEMORY_FORMAT", layout)
        for d in {torch.float32, dtype}:
            loaded[(layout, d)] = minisd.load(tiny_checkpoint, dtype=d)
    reference = loaded[("nchw", torch.float32)]
    assert layout_of(loaded[("channels-last", dtype)].unet) == {True}
    context = torch.randn(2, 77, reference.config.unet.context_dim, generator=g)

    def outputs(sd):
        with torch.inference_mode():
            d = sd.dtype
            return {"unet": sd.unet(x.to(d), t, context.to(d)), "vae": sd.vae.decode(z.to(d)),
                    "txt2img": sd.txt2img(PROMPT, seed=1, steps=4, sampler="Euler", output="latent", **SIZE)}

    expected = outputs(reference)
    ours = outputs(loaded[("channels-last", dtype)])
    nchw = outputs(loaded[("nchw", dtype)])
    for name in expected:
        error = rel(ours[name], expected[name])
        assert error <= bound, (name, error)
        if dtype == torch.bfloat16:
            assert error <= 1.5 * rel(nchw[name], expected[name]) + 1e-3, name


# ---- fast preset and --compile ---------------------------------------------------------------------------

def parse(*argv: str) -> GenerationParams:
    return generation_params(build_parser().parse_args(["generate", "a cat", *argv]))


def test_fast_preset_sets_lcm_4_steps_cfg_1_and_flags_win():
    p = parse("--preset", "fast")
    assert (p.sampler, p.steps, p.cfg_scale) == ("LCM", 4, 1.0)
    p = parse("--preset", "fast", "--steps", "6", "--cfg-scale", "1.5")
    assert (p.sampler, p.steps, p.cfg_scale) == ("LCM", 6, 1.5)
    p = parse("--cfg-interval", "0.1,0.7", "--cache-interval", "2")
    assert p.cfg_interval == (0.1, 0.7) and p.cache_interval == 2


def test_fast_preset_generates_with_one_pass_per_step(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    calls = []
    original = UNetModel.forward
    monkeypatch.setattr(UNetModel, "forward", lambda self, x, *a, **k: calls.append(x.shape[0]) or original(self, x, *a, **k))
    out = tmp_path / "fast.png"
    assert main(["generate", "a cat", "--model", str(tiny_checkpoint), "--preset", "fast", "--seed", "1",
                 "-W", "64", "-H", "64", "--dtype", "fp32", "-o", str(out)]) == 0
    assert calls == [1, 1, 1, 1]
    captured = capsys.readouterr()
    assert "--vae taesd FILE" in captured.err  # says that the full VAE decoded
    from minisd.image import read_infotext
    info = read_infotext(out)
    assert "Steps: 4" in info and "Sampler: LCM" in info and "CFG scale: 1.0" in info


def test_compile_cache_lives_in_the_users_cache_folder(monkeypatch, tmp_path):
    import torch._inductor.config as inductor
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert compile_cache_dir() == tmp_path / "cache" / "minisd" / "inductor"
    saved = inductor.fx_graph_cache, inductor.freezing
    try:
        folder = configure_inductor()
        assert folder.is_dir() and inductor.fx_graph_cache and inductor.freezing
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        assert cache_dir() == str(folder)  # where inductor itself will write
    finally:
        inductor.fx_graph_cache, inductor.freezing = saved
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"  # the user's own setting wins
