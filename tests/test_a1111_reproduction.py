"""Reproducing A1111: an A1111-style reference loop written here from A1111's formulas (its ImageRNG: the seed's
first draw, variation-seed slerp, seed resize, ENSD reseeding; torch.randn_like of the k-diffusion samplers
hijacked to the per-image generators; the SDE samplers' BrownianTreeNoiseSampler with torchsde's draws routed to
the noise source), driving k-diffusion's own sampler functions, against minisd's pipeline on the same denoiser.
Also: our Brownian tree against torchsde's, hires fix against its two explicit passes, infotext round trips and
a corpus of 30 hand-written A1111 infotexts."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import minisd
import minisd.pipeline as pipeline_module
from minisd import samplers as ours
from minisd.brownian import BrownianTree, BrownianTreeNoise
from minisd.config import PRESETS
from minisd.image import parse_infotext
from minisd.params import GenerationParams
from minisd.testing import write_checkpoint

from kdiffusion_reference import load as load_kdiffusion

INFOTEXTS = Path(__file__).parent / "data" / "infotexts"


# ---- A1111's noise, written from its formulas --------------------------------------------------------------

def nv_randn(seed: int, shape, draw_index: int = 0) -> torch.Tensor:
    """A1111's "NV" generator (rng_philox): element e = Box-Muller sine of Philox4x32-10 at counter
    (draw_index, 0, e, 0), key (seed lo, seed hi), in float64 then float32 — vectorised numpy."""
    n = math.prod(shape)
    mask = np.uint64(0xFFFFFFFF)
    c0, c1 = np.full(n, draw_index, np.uint64), np.zeros(n, np.uint64)
    c2, c3 = np.arange(n, dtype=np.uint64), np.zeros(n, np.uint64)
    k0, k1 = np.uint64(seed % 2**32), np.uint64(seed // 2**32)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
    inv = float(np.float32(2.3283064e-10))
    inv_2pi = float(np.float32(2.3283064e-10 * 6.2831855))
    u, v = c0.astype(np.float64) * inv + inv / 2, c1.astype(np.float64) * inv_2pi + inv_2pi / 2
    return torch.from_numpy((np.sqrt(-2 * np.log(u)) * np.sin(v)).astype(np.float32)).reshape(shape)


class RefGenerator:
    def __init__(self, source: str, seed: int):
        self.source, self.seed, self.draws = source, seed, 0
        self.cpu = torch.Generator().manual_seed(seed) if source == "cpu" else None

    def randn(self, shape) -> torch.Tensor:
        if self.cpu is not None:
            return torch.randn(shape, generator=self.cpu)
        self.draws += 1
        return nv_randn(self.seed, shape, self.draws - 1)


def randn_local(source: str, seed: int, shape) -> torch.Tensor:
    return RefGenerator(source, seed).randn(shape)


def ref_slerp(val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class RefImageRNG:
    """A1111's modules/rng.py ImageRNG, from its description: see the module docstring."""

    def __init__(self, source, shape, seeds, subseeds, strength, resize_wh, ensd):
        self.source, self.shape, self.seeds, self.subseeds = source, shape, seeds, subseeds
        self.strength, self.resize_wh, self.ensd = strength, resize_wh, ensd
        self.generators = [RefGenerator(source, s) for s in seeds]
        self.is_first = True

    def first(self):
        w, h = self.resize_wh
        noise_shape = self.shape if w <= 0 or h <= 0 else (self.shape[0], h // 8, w // 8)
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.strength:
                subnoise = randn_local(self.source, self.subseeds[i], noise_shape)
            noise = randn_local(self.source, seed, noise_shape) if noise_shape != self.shape \
                else generator.randn(self.shape)
            if subnoise is not None:
                noise = ref_slerp(self.strength, noise, subnoise)
            if noise_shape != self.shape:
                x = generator.randn(self.shape)
                dx, dy = (self.shape[2] - noise_shape[2]) // 2, (self.shape[1] - noise_shape[1]) // 2
                w_ = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
                h_ = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
                tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
                x[:, ty:ty + h_, tx:tx + w_] = noise[:, dy:dy + h_, dx:dx + w_]
                noise = x
            xs.append(noise)
        if self.ensd:
            self.generators = [RefGenerator(self.source, s + self.ensd) for s in self.seeds]
        return torch.stack(xs)

    def next(self):
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([g.randn(self.shape) for g in self.generators])


class TorchHijack:
    """k-diffusion's `torch` with randn_like drawing from the image RNG (as A1111's TorchHijack)."""

    def __init__(self, image_rng):
        self.image_rng = image_rng

    def __getattr__(self, name):
        if name == "randn_like":
            return lambda x: self.image_rng.next().to(x.dtype)
        return getattr(torch, name)


@pytest.fixture
def a1111_torchsde(monkeypatch):
    """torchsde's leaf draws as A1111 routes them (devices.randn_local of the chosen source, cast)."""
    import torchsde._brownian.brownian_interval as interval
    source = {"value": "cpu"}
    monkeypatch.setattr(interval, "_randn", lambda size, dtype, device, seed:
                        randn_local(source["value"], int(seed), size).to(device=device, dtype=dtype))
    return source


# ---- the Brownian tree ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["cpu", "gpu"])
def test_brownian_tree_equals_torchsde(a1111_torchsde, source):
    import torchsde
    a1111_torchsde["value"] = source
    shape = (4, 6, 6)
    t0, t1 = 0.0291675, 14.614642
    reference = torchsde.BrownianTree(torch.tensor(t0), torch.zeros(shape), torch.tensor(t1), entropy=4242)
    tree = BrownianTree(t0, t1, 4242, lambda seed: minisd.rng.randn(source, seed, shape))
    queries = np.random.default_rng(0).uniform(t0, t1, size=(40, 2))
    for a, b in [*np.sort(queries, axis=1).tolist(), (t0, t1), (0.5, 0.500003)]:
        torch.testing.assert_close(tree.increment(a, b), reference(a, b), rtol=0, atol=2e-5 if source == "gpu" else 0)


def toy_denoiser(x, sigma):
    """Exact D for data ~ N(0, 0.25 I): E[x0 | x] = x · 0.25 / (0.25 + σ²)."""
    return x * 0.25 / (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize("name,kwargs", [("dpmpp_sde", {}), ("dpmpp_2m_sde", {}),
                                         ("dpmpp_2m_sde", {"solver_type": "heun"}), ("dpmpp_3m_sde", {})])
def test_sde_samplers_with_brownian_noise_equal_kdiffusion_float64(a1111_torchsde, name, kwargs):
    sampling, _ = load_kdiffusion()
    sigmas = torch.cat([torch.linspace(14.6 ** (1 / 7), 0.03 ** (1 / 7), 12, dtype=torch.float64) ** 7,
                        torch.zeros(1, dtype=torch.float64)])
    x = torch.randn((2, 4, 5, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    seeds = [11, 2**32 - 1]
    noise_sampler = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    expected = getattr(sampling, f"sample_{name}")(toy_denoiser, x.clone(), sigmas, disable=True,
                                                   noise_sampler=noise_sampler, **kwargs)
    got = getattr(ours, f"sample_{name}")(toy_denoiser, x.clone(), sigmas,
                                          noise_sampler=BrownianTreeNoise(x, sigmas, seeds), **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - expected).abs().max() < 1e-10  # in fact equal to rounding


# ---- the pipeline against the A1111 reference loop ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("a1111") / "tiny.safetensors"
    write_checkpoint(path, PRESETS["tiny"], seed=5)
    return minisd.load(path, dtype=torch.float32)


KDIFFUSION = {"Euler a": "sample_euler_ancestral", "Euler": "sample_euler", "LMS": "sample_lms",
              "Heun": "sample_heun", "DPM2": "sample_dpm_2", "DPM2 a": "sample_dpm_2_ancestral",
              "DPM++ 2S a": "sample_dpmpp_2s_ancestral", "DPM++ 2M": "sample_dpmpp_2m",
              "DPM++ SDE": "sample_dpmpp_sde", "DPM++ 2M SDE": "sample_dpmpp_2m_sde",
              "DPM++ 2M SDE Heun": "sample_dpmpp_2m_sde", "DPM++ 3M SDE": "sample_dpmpp_3m_sde"}
BROWNIAN = {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}


def run_both(sd, monkeypatch, a1111_torchsde, sampler: str, source: str, **options):
    """minisd's latents and the A1111 reference loop's on the denoiser and sigmas minisd used."""
    captured = {}
    real_resolve = pipeline_module.resolve_sampler

    def recording_resolve(name):
        spec = real_resolve(name)

        def fn(denoiser, x, sigmas, **kwargs):
            captured.update(denoiser=denoiser, sigmas=sigmas)
            return spec.fn(denoiser, x, sigmas, **kwargs)
        return dataclasses.replace(spec, fn=fn)

    monkeypatch.setattr(pipeline_module, "resolve_sampler", recording_resolve)
    params = dict(width=32, height=32, steps=3, cfg_scale=5.0, seed=1234, batch_size=2, **options)
    got = sd.txt2img("a red circle", sampler=sampler, rng=source, output="latent", **params)
    p = GenerationParams(**params)

    sampling, _ = load_kdiffusion()
    a1111_torchsde["value"] = source
    sigmas = captured["sigmas"].float().cpu()  # A1111's sigmas are float32
    batch = list(range(p.batch_size))
    seeds = [p.seed if p.subseed_strength else p.seed + i for i in batch]
    image_rng = RefImageRNG(source, (4, 4, 4), seeds, [p.subseed + i for i in batch], p.subseed_strength,
                            (p.seed_resize_from_w, p.seed_resize_from_h), p.eta_noise_seed_delta)
    x = image_rng.next() * sigmas[0]
    kwargs = {"solver_type": "heun"} if sampler.endswith("Heun") and "SDE" in sampler else {}
    if sampler in BROWNIAN:
        kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                    seed=seeds)
    monkeypatch.setattr(sampling, "torch", TorchHijack(image_rng))
    expected = getattr(sampling, KDIFFUSION[sampler])(captured["denoiser"], x, sigmas, disable=True, **kwargs)
    return got, expected


@pytest.mark.parametrize("sampler", list(KDIFFUSION))
def test_every_sampler_with_gpu_noise_reproduces_a1111(tiny, monkeypatch, a1111_torchsde, sampler):
    got, expected = run_both(tiny, monkeypatch, a1111_torchsde, sampler, "gpu")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # GPU noise: 2 emulations ~5e-6 apart


@pytest.mark.parametrize("sampler,source", [("Euler a", "cpu"), ("DPM++ 2M SDE", "cpu"), ("DPM++ SDE", "nv")])
def test_other_noise_sources_reproduce_a1111(tiny, monkeypatch, a1111_torchsde, sampler, source):
    got, expected = run_both(tiny, monkeypatch, a1111_torchsde, sampler, source)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # GPU noise: 2 emulations ~5e-6 apart
    if source == "cpu":  # the same noise bits: equal up to float32 rounding of the sampler arithmetic
        assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.mark.parametrize("source,options", [
    ("gpu", {"subseed": 77, "subseed_strength": 0.35}),
    ("cpu", {"subseed": 77, "subseed_strength": 0.35}),
    ("gpu", {"seed_resize_from_w": 48, "seed_resize_from_h": 16}),
    ("gpu", {"seed_resize_from_w": 16, "seed_resize_from_h": 24, "subseed": 5, "subseed_strength": 0.8}),
    ("gpu", {"eta_noise_seed_delta": 31337}),
], ids=["variation-gpu", "variation-cpu", "resize", "resize+variation", "ensd"])
def test_seed_options_reproduce_a1111(tiny, monkeypatch, a1111_torchsde, source, options):
    got, expected = run_both(tiny, monkeypatch, a1111_torchsde, "Euler a", source, **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # GPU noise: 2 emulations ~5e-6 apart


def test_slerp_of_orthogonal_columns_is_the_great_circle_midpoint():
    low = torch.zeros(1, 2, 3)
    high = torch.zeros(1, 2, 3)
    low[0, 0], high[0, 1] = 1.0, 1.0  # every column: low = e0, high = e1
    mid = minisd.seeds.slerp(0.5, low, high)
    torch.testing.assert_close(mid, (low + high) / 2**0.5)


# ---- Hires. fix --------------------------------------------------------------------------------------------

def test_hires_fix_with_a_latent_upscaler_equals_its_two_passes(tiny):
    common = dict(prompt="a red circle", width=32, height=32, steps=3, seed=9, sampler="Euler a", rng="gpu",
                  strength=0.6, output="latent")
    got = tiny.generate(GenerationParams(**common, enable_hr=True, hr_scale=1.5, hr_steps=2,
                                         hr_upscaler="Latent (bicubic)"))
    first = tiny.generate(GenerationParams(**common))
    upscaled = torch.nn.functional.interpolate(first, size=(6, 6), mode="bicubic")
    second = GenerationParams(**{**common, "width": 48, "height": 48, "steps": 2})
    expected = tiny.generate(second, init_latents=upscaled, fix_steps=True)
    assert got.shape == (1, 4, 6, 6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_hires_fix_with_an_image_upscaler_equals_its_two_passes_and_records_its_fields(tiny):
    from PIL import Image
    common = dict(prompt="a red circle", width=32, height=32, steps=2, seed=4, sampler="DPM++ 2M SDE", rng="cpu",
                  strength=0.5)
    images = tiny.generate(GenerationParams(**common, enable_hr=True, hr_resize_x=64, hr_upscaler="Lanczos",
                                            batch_size=2))
    first = tiny.generate(GenerationParams(**common, batch_size=2, output="latent"))
    with torch.inference_mode():
        decoded = ((tiny.decode_latents(first) + 1) / 2).clamp(0, 1)
    for i, image in enumerate(images):
        eight_bit = (255.0 * decoded[i].permute(1, 2, 0).numpy()).astype(np.uint8)  # A1111 truncates
        resized = Image.fromarray(eight_bit).resize((64, 64), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(resized).astype(np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
        with torch.inference_mode():
            latents = tiny.encode_latents(pixels)
        expected = tiny.generate(GenerationParams(**{**common, "width": 64, "height": 64, "seed": 4 + i}),
                                 init_latents=latents, fix_steps=True)[0]
        assert image.size == (64, 64)
        assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 1
        fields = parse_infotext(image.info["parameters"])[2]
        assert {k: fields[k] for k in ("Size", "Seed", "Denoising strength", "Hires resize", "Hires upscaler")} == {
            "Size": "32x32", "Seed": str(4 + i), "Denoising strength": "0.5", "Hires resize": "64x0",
            "Hires upscaler": "Lanczos"}
        again = GenerationParams.from_infotext(image.info["parameters"])
        assert (again.enable_hr, again.hr_resize_x, again.hr_resize_y, again.strength) == (True, 64, 0, 0.5)


# ---- infotext round trips and the A1111 corpus ---------------------------------------------------------------

NOT_SETTINGS = {"Model hash", "Model", "Version", "VAE hash", "VAE", "Lora hashes", "TI hashes"}


def settings(text: str) -> dict[str, str]:
    return {k: v for k, v in parse_infotext(text)[2].items() if k not in NOT_SETTINGS}


def test_every_new_field_survives_format_parse_generate_format(tiny):
    p = GenerationParams(prompt="a castle, (volumetric light:1.2)", negative_prompt="text", width=32, height=32,
                         steps=2, sampler="DPM++ 2M SDE", schedule="Karras", seed=123, cfg_scale=6.5, clip_skip=2,
                         rng="nv", subseed=456, subseed_strength=0.3, seed_resize_from_w=40, seed_resize_from_h=24,
                         eta_noise_seed_delta=31337, sgm_noise_multiplier=True, schedule_sigma_min=0.05,
                         schedule_sigma_max=10.0, schedule_rho=5.0, emphasis="No norm", enable_hr=True,
                         hr_scale=1.5, hr_steps=1, hr_upscaler="Latent (nearest-exact)", strength=0.45)
    text = p.validated().infotext(123, model_hash=tiny.model_hash, model_name=tiny.model_name, version="x")
    image = tiny.generate(GenerationParams.from_infotext(text))[0]
    assert settings(image.info["parameters"]) == settings(text)
    for key in ("RNG", "Variation seed", "Seed resize from", "ENSD", "SGM noise multiplier", "Schedule rho",
                "Emphasis", "Hires upscale", "Hires steps", "Hires upscaler"):
        assert key in settings(text)

    img2img = GenerationParams(prompt="x", width=32, height=32, steps=2, seed=7, strength=0.5, noise_multiplier=0.9,
                               rng="gpu", sampler="Euler a")
    text = img2img.validated().infotext(7, model_hash="", model_name="m", version="x", task="img2img")
    image = tiny.generate(GenerationParams.from_infotext(text), init_image=image.resize((32, 32)))[0]
    assert settings(image.info["parameters"]) == settings(text)
    assert "Noise multiplier: 0.9" in text


# Fields GenerationParams.from_infotext reads (the rest of an A1111 infotext names the model/VAE/extras).
READ = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Clip skip", "ENSD",
        "RNG", "Variation seed", "Variation seed strength", "Seed resize from", "Noise multiplier",
        "Schedule max sigma", "Schedule min sigma", "Schedule rho", "SGM noise multiplier", "Emphasis",
        "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Mask blur", "Inpaint area",
        "Masked area padding", "Masked content", "CFG Rescale phi"}


def test_the_corpus_covers_every_field_and_sampler():
    keys, samplers = set(), set()
    for path in INFOTEXTS.glob("*.txt"):
        fields = parse_infotext(path.read_text())[2]
        keys |= set(fields)
        samplers.add(ours.resolve_sampler(fields["Sampler"]).key)
    assert len(list(INFOTEXTS.glob("*.txt"))) == 30
    assert READ <= keys
    assert set(ours.SAMPLERS) - {"ddpm"} <= samplers  # DDPM is not an A1111 sampler


@pytest.mark.parametrize("path", sorted(INFOTEXTS.glob("*.txt")), ids=lambda p: p.stem)
def test_a1111_corpus_parses_without_loss(path):
    text = path.read_text()
    prompt, negative, fields = parse_infotext(text)
    p = GenerationParams.from_infotext(text).validated()
    assert (p.prompt, p.negative_prompt) == (prompt, negative)
    assert set(fields) - READ - NOT_SETTINGS == set()
    assert p.rng == {"CPU": "cpu", "GPU": "gpu", "NV": "nv"}[fields.get("RNG", "GPU")]  # no RNG field: GPU
    task = "inpaint" if "Mask blur" in fields else "img2img" if "Denoising strength" in fields and not p.enable_hr \
        else "txt2img"
    written = parse_infotext(p.infotext(p.seed, model_hash="", model_name="", version="", task=task))[2]
    for key, value in fields.items():
        if key in NOT_SETTINGS or (key == "Schedule type" and value == "Automatic"):
            continue
        if key == "Sampler":
            assert ours.resolve_sampler(written[key]).key == ours.resolve_sampler(value).key
        elif key == "Emphasis" and value == "Original":
            assert key not in written and p.emphasis == "Original"
        else:
            try:
                assert float(written[key]) == float(value), key
            except ValueError:
                assert written[key].lower() == value.lower(), key


@pytest.mark.parametrize("steps", [7, 20])
def test_sde_schedules_carry_a1111s_float32_bits(tiny, steps):
    """The σ the SDE samplers run on equal k-diffusion's float32 schedules bit for bit (CompVisDenoiser's table from
    the model's float32 ᾱ; get_sigmas, get_sigmas_karras, get_sigmas_exponential)."""
    from minisd.a1111_sigmas import a1111_sigmas
    sampling, external = load_kdiffusion()
    table = external.DiscreteEpsDDPMDenoiser(None, tiny.schedule.alphas_cumprod.float(), quantize=False)
    low, high = table.sigmas[0].item(), table.sigmas[-1].item()
    assert torch.equal(a1111_sigmas(tiny.schedule, "uniform", steps), table.get_sigmas(steps))
    assert torch.equal(a1111_sigmas(tiny.schedule, "karras", steps), sampling.get_sigmas_karras(steps, low, high))
    assert torch.equal(a1111_sigmas(tiny.schedule, "exponential", steps),
                       sampling.get_sigmas_exponential(steps, low, high))
    assert torch.equal(a1111_sigmas(tiny.schedule, "karras", steps, sigma_min=0.05, sigma_max=10.0, rho=5.0),
                       sampling.get_sigmas_karras(steps, 0.05, 10.0, rho=5.0))
    full = sampling.get_sigmas_exponential(steps + 1, low, high)
    assert torch.equal(a1111_sigmas(tiny.schedule, "exponential", steps, discard_penultimate=True),
                       torch.cat([full[:-2], full[-1:]]))


def test_from_image_of_a_bare_a1111_infotext_uses_gpu_noise(tiny, tmp_path):
    """The CLI reads an A1111 PNG without "RNG:" as GPU noise and writes the field back."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    from minisd import cli
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 2, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 5, "
                                "Seed: 77, Size: 32x32, Model hash: 0123456789, Model: x, Variation seed: 5, "
                                "Variation seed strength: 0.5, ENSD: 31337, Version: v1.10.1")
    Image.new("RGB", (32, 32)).save(tmp_path / "found.png", pnginfo=info)
    code = cli.main(["generate", "--from-image", str(tmp_path / "found.png"), "--model", str(tiny.source),
                     "-o", str(tmp_path / "again.png"), "--quiet", "--dtype", "fp32"])
    assert code == 0
    fields = parse_infotext(Image.open(tmp_path / "again.png").info["parameters"])[2]
    assert (fields["RNG"], fields["Variation seed"], fields["ENSD"], fields["Seed"]) == ("GPU", "5", "31337", "77")


@pytest.mark.parametrize("masked_content", ["original", "latent noise", "latent nothing"])
def test_a1111_inpainting_mode_follows_a1111s_formulas(tiny, monkeypatch, a1111_torchsde, masked_content):
    from PIL import Image, ImageDraw
    from minisd import a1111_inpaint
    from minisd.image import load_mask, pil_to_tensor
    picture = Image.new("RGB", (32, 32), (40, 60, 200))
    ImageDraw.Draw(picture).ellipse([4, 6, 20, 24], fill=(220, 30, 30))
    mask_image = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask_image).rectangle([10, 8, 25, 21], fill=255)
    captured = {}
    real_denoiser = a1111_inpaint.A1111Inpainting.denoiser

    def recording(self, inner, init_latent):
        captured.update(inner=inner)
        return real_denoiser(self, inner, init_latent)
    monkeypatch.setattr(a1111_inpaint.A1111Inpainting, "denoiser", recording)
    params = dict(width=32, height=32, steps=3, cfg_scale=5.0, seed=321, strength=0.8, mask_blur=2, rng="gpu",
                  sampler="Euler a", inpaint_mode="a1111", inpainting_fill=masked_content)
    got = tiny.inpaint(picture, mask_image, "a red circle", output="latent", **params)

    # A1111: latent mask = bicubic PIL resize of the blurred 8-bit mask, rounded; init latent after masked content.
    blurred = load_mask(mask_image, 32, 32, blur=2)
    eight_bit = Image.fromarray((blurred[0, 0] * 255).round().to(torch.uint8).numpy()).convert("RGB")
    nmask = torch.from_numpy(np.around(np.asarray(eight_bit.resize((4, 4)), np.float32)[..., 0] / 255))
    keep = 1 - nmask
    with torch.inference_mode():
        init = tiny.encode_latents(pil_to_tensor(picture))
    if masked_content == "latent noise":
        init = init * keep + randn_local("gpu", 321, (4, 4, 4))[None] * nmask
    elif masked_content == "latent nothing":
        init = init * keep
    sampling, _ = load_kdiffusion()
    from minisd.schedule import img2img_sigmas
    sigmas = img2img_sigmas(lambda n: ours.resolve_sampler("Euler a").sigmas(tiny.schedule, n), 3, 0.8).float()
    image_rng = RefImageRNG("gpu", (4, 4, 4), [321], [0], 0.0, (0, 0), 0)
    x = init + image_rng.next() * sigmas[0]
    monkeypatch.setattr(sampling, "torch", TorchHijack(image_rng))
    inner = captured["inner"]
    samples = sampling.sample_euler_ancestral(lambda x, s: init * keep + nmask * inner(x, s), x, sigmas,
                                              disable=True)
    expected = samples * nmask + init * keep
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # GPU noise: 2 emulations ~5e-6 apart
    assert not torch.equal(got, tiny.inpaint(picture, mask_image, "a red circle", output="latent",
                                             **{**params, "inpaint_mode": "minisd"}))
