"""Denoiser wrapper tests: ε/v wrappers against k-diffusion's discrete DDPM denoisers and the formulas,
classifier-free guidance batched vs separate calls, guidance rescale vs Lin et al. 2023, the LCM boundary
condition vs diffusers."""

from __future__ import annotations

import pytest
import torch

from minisd.denoiser import CFGDenoiser, EpsDenoiser, LCMDenoiser, VDenoiser, make_denoiser
from minisd.schedule import DiscreteSchedule, ScheduleConfig

from kdiffusion_reference import load as load_kdiffusion


class ToyUNet:
    """A UNet stand-in: deterministic, nonlinear in x, t and context; records its calls."""

    def __init__(self, in_channels: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(4, in_channels, 3, 3, generator=g, dtype=torch.float64) * 0.3
        self.proj = torch.randn(8, generator=g, dtype=torch.float64)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append((x, t, context))
        h = torch.nn.functional.conv2d(x, self.weight.to(x.dtype), padding=1)
        scale = (1 + 0.5 * torch.sin(t.to(x.dtype) / 150)).view(-1, 1, 1, 1)
        ctx = 0.0 if context is None else torch.tanh(context @ self.proj.to(x.dtype)).mean(1).view(-1, 1, 1, 1)
        return torch.tanh(h * scale) + 0.3 * ctx + 0.05 * x[:, :4]


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule.from_config(ScheduleConfig())


def _inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.empty(batch, dtype=torch.float64).uniform_(-3.4, 2.6, generator=g))
    x = torch.randn(batch, 4, 6, 6, generator=g, dtype=torch.float64) * (1 + sigma.view(-1, 1, 1, 1))
    context = torch.randn(batch, 5, 8, generator=g, dtype=torch.float64)
    return x, sigma, context


@pytest.mark.parametrize("quantize", [False, True])
def test_eps_denoiser_matches_kdiffusion(schedule, quantize):
    _, external = load_kdiffusion()
    unet = ToyUNet()
    x, sigma, context = _inputs()
    ours = EpsDenoiser(unet, schedule, quantize=quantize)(x, sigma, context)
    ref = external.DiscreteEpsDDPMDenoiser(unet, schedule.alphas_cumprod.clone(), quantize=quantize)
    torch.testing.assert_close(ours, ref(x, sigma, context=context), rtol=0, atol=1e-12)


@pytest.mark.parametrize("quantize", [False, True])
def test_v_denoiser_matches_kdiffusion(schedule, quantize):
    _, external = load_kdiffusion()
    unet = ToyUNet()
    x, sigma, context = _inputs()
    ours = VDenoiser(unet, schedule, quantize=quantize)(x, sigma, context)
    ref = external.DiscreteVDDPMDenoiser(unet, schedule.alphas_cumprod.clone(), quantize=quantize)
    torch.testing.assert_close(ours, ref(x, sigma, context=context), rtol=0, atol=1e-12)


def test_eps_and_v_formulas(schedule):
    """D from the DDPM definitions: x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε and v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0
    at a discrete timestep, with x = x_t / sqrt(ᾱ) the σ-space sample."""
    unet = ToyUNet()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([17, 500, 999])
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    sigma = schedule.sigmas[t]
    x = x_t / abar.sqrt()
    out = unet(x_t, t.double())
    x0_eps = (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
    x0_v = abar.sqrt() * x_t - (1 - abar).sqrt() * out
    torch.testing.assert_close(EpsDenoiser(unet, schedule)(x, sigma), x0_eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(VDenoiser(unet, schedule)(x, sigma), x0_v, rtol=0, atol=1e-10)
    # the timestep handed to the UNet is the discrete one
    torch.testing.assert_close(unet.calls[-1][1], t.double(), rtol=0, atol=1e-9)


def test_scalar_sigma_broadcasts_and_dtype(schedule):
    unet = ToyUNet()
    x, _, context = _inputs()
    d = EpsDenoiser(unet, schedule)
    torch.testing.assert_close(d(x, 2.0, context), d(x, torch.full((3,), 2.0, dtype=torch.float64), context))
    out = d(x.float(), torch.tensor(2.0), context.float())
    assert out.dtype == torch.float32


def test_make_denoiser_picks_parameterisation():
    unet = ToyUNet()
    assert isinstance(make_denoiser(unet, DiscreteSchedule.from_config()), EpsDenoiser)
    v_schedule = DiscreteSchedule.from_config(ScheduleConfig(prediction_type="v_prediction"))
    assert isinstance(make_denoiser(unet, v_schedule), VDenoiser)


def test_concat_channels_join_unscaled(schedule):
    unet = ToyUNet(in_channels=9)
    x, sigma, context = _inputs()
    extra = torch.randn(3, 5, 6, 6, dtype=torch.float64)
    EpsDenoiser(unet, schedule)(x, sigma, context, concat=extra)
    x_in = unet.calls[-1][0]
    torch.testing.assert_close(x_in[:, :4], x / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1))
    torch.testing.assert_close(x_in[:, 4:], extra)


@pytest.mark.parametrize("cls", [EpsDenoiser, VDenoiser])
def test_cfg_one_batched_call_equals_two_calls(schedule, cls):
    unet = ToyUNet()
    model = cls(unet, schedule)
    x, sigma, cond = _inputs()
    uncond = torch.randn(1, 5, 8, dtype=torch.float64)  # one negative prompt for the whole batch
    scale = 7.5
    guided = CFGDenoiser(model, cond, uncond, scale)(x, sigma)
    assert len(unet.calls) == 1 and unet.calls[0][0].shape[0] == 2 * x.shape[0]
    d_cond = model(x, sigma, cond)
    d_uncond = model(x, sigma, uncond.expand(3, -1, -1))
    torch.testing.assert_close(guided, d_uncond + scale * (d_cond - d_uncond), rtol=0, atol=1e-12)


def test_cfg_scale_one_skips_uncond(schedule):
    unet = ToyUNet()
    model = EpsDenoiser(unet, schedule)
    x, sigma, cond = _inputs()
    out = CFGDenoiser(model, cond, torch.zeros_like(cond), 1.0)(x, sigma)
    assert len(unet.calls) == 1 and unet.calls[0][0].shape[0] == x.shape[0]
    torch.testing.assert_close(out, model(x, sigma, cond))


def test_cfg_different_lengths_and_concat(schedule):
    unet = ToyUNet(in_channels=6)
    model = EpsDenoiser(unet, schedule)
    x, sigma, cond = _inputs()
    uncond = torch.randn(3, 9, 8, dtype=torch.float64)  # longer negative prompt: cannot share a batch
    extra = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    guided = CFGDenoiser(model, cond, uncond, 4.0, concat=extra)(x, sigma)
    assert len(unet.calls) == 2
    d_cond, d_uncond = model(x, sigma, cond, extra), model(x, sigma, uncond, extra)
    torch.testing.assert_close(guided, d_uncond + 4.0 * (d_cond - d_uncond), rtol=0, atol=1e-12)
    # with equal lengths the concat channels are duplicated for the single batched call
    unet.calls.clear()
    CFGDenoiser(model, cond, cond.flip(0), 4.0, concat=extra)(x, sigma)
    assert len(unet.calls) == 1
    torch.testing.assert_close(unet.calls[0][0][:, 4:], torch.cat([extra, extra]))


def _paper_rescale(pos: torch.Tensor, neg: torch.Tensor, scale: float, phi: float) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 2: cfg = neg + w (pos − neg); factor = std(pos)/std(cfg) per sample;
    out = cfg · (φ · factor + (1 − φ))."""
    cfg = neg + scale * (pos - neg)
    factor = pos.std([1, 2, 3], keepdim=True) / cfg.std([1, 2, 3], keepdim=True)
    return cfg * (phi * factor + (1 - phi))


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_eps(schedule, phi):
    unet = ToyUNet()
    x, sigma, cond = _inputs()
    uncond = torch.randn_like(cond)
    out = CFGDenoiser(EpsDenoiser(unet, schedule), cond, uncond, 9.0, rescale=phi)(x, sigma)
    x_in, t = x / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1), schedule.sigma_to_t(sigma)
    eps = _paper_rescale(unet(x_in, t, cond), unet(x_in, t, uncond), 9.0, phi)
    torch.testing.assert_close(out, x - sigma.view(-1, 1, 1, 1) * eps, rtol=0, atol=1e-10)


def test_guidance_rescale_v(schedule):
    unet = ToyUNet()
    x, sigma, cond = _inputs()
    uncond = torch.randn_like(cond)
    out = CFGDenoiser(VDenoiser(unet, schedule), cond, uncond, 6.0, rescale=0.7)(x, sigma)
    s = sigma.view(-1, 1, 1, 1)
    x_in, t = x / (s**2 + 1).sqrt(), schedule.sigma_to_t(sigma)
    v = _paper_rescale(unet(x_in, t, cond), unet(x_in, t, uncond), 6.0, 0.7)
    torch.testing.assert_close(out, x / (s**2 + 1) - s / (s**2 + 1).sqrt() * v, rtol=0, atol=1e-10)


def test_lcm_boundary_condition_matches_diffusers(schedule):
    from diffusers import LCMScheduler

    ref = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    unet = ToyUNet()
    t = torch.tensor([19, 259, 999])
    sigma = schedule.sigmas[t]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * (1 + sigma.view(-1, 1, 1, 1))
    inner = EpsDenoiser(unet, schedule)
    out = LCMDenoiser(inner, schedule)(x, sigma)
    x_t = x / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1)
    for i in range(3):
        c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(t[i].double())
        expected = c_out * inner(x[i : i + 1], sigma[i : i + 1]) + c_skip * x_t[i : i + 1]
        torch.testing.assert_close(out[i : i + 1], expected, rtol=0, atol=1e-9)
