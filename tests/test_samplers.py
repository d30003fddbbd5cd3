"""Sampler tests: parity with k-diffusion's samplers and diffusers' DDPM/DDIM/PNDM/UniPC/LCM schedulers on the
same UNet-free model, sigmas and noise (float64, max |a − b| ≤ 1e-5), convergence to the exact solution for
Gaussian data, noise and generator semantics, and the A1111 name registry."""

from __future__ import annotations

import math

import pytest
import torch

from minisd import samplers as S
from minisd.denoiser import CFGDenoiser, EpsDenoiser, LCMDenoiser
from minisd.schedule import DiscreteSchedule, ScheduleConfig, get_sigmas, get_sigmas_karras, get_sigmas_lcm

from kdiffusion_reference import load as load_kdiffusion

SHAPE = (2, 4, 8, 8)
SEED = 1234
# k-diffusion agrees to ~1e-12; diffusers to ~1e-9 except two float32 spots of its own: DDPM adds
# sqrt(clamp(0, 1e-20)) · z on its last step and LCM computes c_skip/c_out in float32 (~3e-7 here).
TOL = 1e-5


class ToyEps:
    """UNet stand-in: a deterministic nonlinear ε(x_t, t, context) (conv + tanh, modulated by t and context)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64) * 0.25
        self.bias = torch.randn(4, generator=g, dtype=torch.float64) * 0.1
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        t = t.to(x.dtype).reshape(-1, 1, 1, 1)
        h = torch.nn.functional.conv2d(x, self.weight, self.bias, padding=1)
        shift = 0.0 if context is None else context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(h * (0.8 + 0.4 * torch.cos(t / 300)) + shift) + 0.5 * x


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule.from_config(ScheduleConfig())


@pytest.fixture(scope="module")
def eps_model() -> ToyEps:
    return ToyEps()


@pytest.fixture(scope="module")
def denoiser(schedule, eps_model):
    """Full wrapper chain as the pipeline builds it: ε-wrapper + CFG in one batched call."""
    g = torch.Generator().manual_seed(7)
    cond = torch.randn(SHAPE[0], 3, 8, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 3, 8, generator=g, dtype=torch.float64)
    return CFGDenoiser(EpsDenoiser(eps_model, schedule), cond, uncond, 3.0)


def _noise(seed: int = 99) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


class Replay:
    """Replays the draws our samplers make: float32 N(0, I) of x's shape from a CPU generator, as float64."""

    def __init__(self, seed: int = SEED) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0

    def draw(self) -> torch.Tensor:
        self.count += 1
        return torch.randn(SHAPE, generator=self.generator, dtype=torch.float32).to(torch.float64)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:  # k-diffusion's noise_sampler interface
        return self.draw()


class BrownianReplay(Replay):
    """Noise sampler for k-diffusion's dpmpp_sde built from the same draws, following the documented rule: per
    step it is asked for (σ → σ_mid) and then (σ → σ_next); W is one Brownian path in σ, so the second answer is
    the normalised sum of the increments over [σ, σ_mid] and [σ_mid, σ_next]."""

    def __init__(self, seed: int = SEED) -> None:
        super().__init__(seed)
        self.pending = None

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        sigma, sigma_next = float(sigma), float(sigma_next)
        if self.pending is None:
            z_1 = self.draw()
            self.pending = (sigma, sigma_next, z_1)
            return z_1
        start, mid, z_1 = self.pending
        self.pending = None
        assert start == pytest.approx(sigma)
        z_2 = self.draw()
        return (math.sqrt(start - mid) * z_1 + math.sqrt(mid - sigma_next) * z_2) / math.sqrt(start - sigma_next)


class TorchWithReplay:
    """Stands in for the `torch` module inside k-diffusion's sampling.py so that its randn_like replays our
    draws (the churn noise of euler/heun/dpm_2)."""

    def __init__(self, replay: Replay) -> None:
        self.replay = replay

    def randn_like(self, x):
        return self.replay.draw()

    def __getattr__(self, name):
        return getattr(torch, name)


# (our sampler, k-diffusion function, options, noise kind)
KDIFF_CASES = [
    ("euler", "sample_euler", {}, None),
    ("euler", "sample_euler", {"s_churn": 2.0, "s_noise": 1.003}, "torch"),
    ("euler_ancestral", "sample_euler_ancestral", {}, "sampler"),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.6, "s_noise": 0.9}, "sampler"),
    ("heun", "sample_heun", {}, None),
    ("heun", "sample_heun", {"s_churn": 1.0, "s_tmin": 0.0, "s_tmax": 50.0}, "torch"),
    ("dpm_2", "sample_dpm_2", {}, None),
    ("dpm_2", "sample_dpm_2", {"s_churn": 1.5}, "torch"),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {}, "sampler"),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 0.5}, "sampler"),
    ("lms", "sample_lms", {}, None),
    ("lms", "sample_lms", {"order": 3}, None),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {}, "sampler"),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 0.0}, "sampler"),
    ("dpmpp_sde", "sample_dpmpp_sde", {}, "brownian"),
    ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 0.7, "s_noise": 1.1, "r": 0.4}, "brownian"),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, None),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}, "sampler"),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"solver_type": "heun"}, "sampler"),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.5, "s_noise": 1.05}, "sampler"),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.0}, "sampler"),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {}, "sampler"),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.5}, "sampler"),
]


@pytest.mark.parametrize("schedule_name, steps", [("karras", 10), ("exponential", 7)])
@pytest.mark.parametrize("ours, theirs, options, noise", KDIFF_CASES)
def test_parity_with_kdiffusion(schedule, denoiser, schedule_name, steps, ours, theirs, options, noise):
    sampling, _ = load_kdiffusion()
    sigmas = get_sigmas(schedule_name, schedule, steps)
    x = _noise() * sigmas[0]
    generator = torch.Generator().manual_seed(SEED)
    calls = []
    out = getattr(S, f"sample_{ours}")(denoiser, x, sigmas, generator=generator, callback=calls.append, **options)
    assert [c["i"] for c in calls] == list(range(steps))

    replay = BrownianReplay() if noise == "brownian" else Replay()
    kwargs = dict(options)
    if noise in ("sampler", "brownian"):
        kwargs["noise_sampler"] = replay
    saved_torch = sampling.torch
    if noise == "torch":
        sampling.torch = TorchWithReplay(replay)
    try:
        ref = getattr(sampling, theirs)(denoiser, x, sigmas, disable=True, **kwargs)
    finally:
        sampling.torch = saved_torch
    assert _max_diff(out, ref) <= TOL
    # same number of draws from the generator on both sides
    assert torch.equal(generator.get_state(), replay.generator.get_state())


# ------------------------------------------------------------------------------------------- diffusers parity

SCHED_KW = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _use_our_tables(ref, schedule: DiscreteSchedule) -> None:
    """Run the diffusers scheduler on our float64 ᾱ table (it builds float32 ones)."""
    ref.alphas_cumprod = schedule.alphas_cumprod.clone()
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = (
            torch.tensor(1.0, dtype=torch.float64) if ref.config.set_alpha_to_one else schedule.alphas_cumprod[0]
        )


def _final_sigma(ref, schedule) -> float:
    return 0.0 if ref.config.set_alpha_to_one else schedule.sigma_min


def _to_vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x / math.sqrt(1 + sigma**2)


def _ours(fn, eps_model, schedule, sigmas, x_vp, denoiser=None, **options):
    """Run our sampler from the diffusers starting sample x_vp and return the result in diffusers' space."""
    d = denoiser or EpsDenoiser(eps_model, schedule)
    x = x_vp * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = fn(d, x, sigmas, generator=torch.Generator().manual_seed(SEED), **options)
    return _to_vp(out, float(sigmas[-1]))


@pytest.fixture
def replay_randn(monkeypatch):
    """Make diffusers' schedulers draw their step noise as our samplers do (float32 from a CPU generator)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm
    import diffusers.schedulers.scheduling_lcm as lcm

    replay = Replay()

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return replay.draw().to(dtype)

    monkeypatch.setattr(ddpm, "randn_tensor", randn_tensor)
    monkeypatch.setattr(lcm, "randn_tensor", randn_tensor)
    return replay


def test_ddpm_matches_diffusers(schedule, eps_model, replay_randn):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(**SCHED_KW, clip_sample=False, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(10)
    _use_our_tables(ref, schedule)
    x_vp = _noise()
    x = x_vp.clone()
    for t in ref.timesteps:
        x = ref.step(eps_model(x, t.expand(SHAPE[0])), t, x).prev_sample
    sigmas = torch.cat([schedule.sigmas[ref.timesteps], torch.zeros(1, dtype=torch.float64)])
    ours = _ours(S.sample_ddpm, eps_model, schedule, sigmas, x_vp)
    assert _max_diff(ours, x) <= TOL


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_matches_diffusers(schedule, eps_model, eta, set_alpha_to_one):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SCHED_KW, clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
                        timestep_spacing="leading")
    ref.set_timesteps(10)
    _use_our_tables(ref, schedule)
    last = torch.tensor([_final_sigma(ref, schedule)], dtype=torch.float64)
    sigmas = torch.cat([schedule.sigmas[ref.timesteps], last])
    replay = Replay()
    x_vp = _noise()
    x = x_vp.clone()
    for i, t in enumerate(ref.timesteps):
        noise = replay.draw() if eta > 0 and sigmas[i + 1] > 0 else torch.zeros(SHAPE, dtype=torch.float64)
        x = ref.step(eps_model(x, t.expand(SHAPE[0])), t, x, eta=eta, variance_noise=noise).prev_sample
    ours = _ours(S.sample_ddim, eps_model, schedule, sigmas, x_vp, eta=eta)
    assert _max_diff(ours, x) <= TOL


@pytest.mark.parametrize("steps", [4, 10])
def test_plms_matches_diffusers_pndm(schedule, eps_model, steps):
    from diffusers import PNDMScheduler

    ref = PNDMScheduler(**SCHED_KW, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(steps)
    _use_our_tables(ref, schedule)
    x_vp = _noise()
    x = x_vp.clone()
    eps_model.calls = 0
    for t in ref.timesteps:
        x = ref.step(eps_model(x, t.expand(SHAPE[0])), t, x).prev_sample
    assert eps_model.calls == steps + 1
    unique = ref.timesteps.unique_consecutive()
    sigmas = torch.cat([schedule.sigmas[unique], torch.tensor([schedule.sigma_min], dtype=torch.float64)])
    eps_model.calls = 0
    ours = _ours(S.sample_plms, eps_model, schedule, sigmas, x_vp)
    assert eps_model.calls == steps + 1
    assert _max_diff(ours, x) <= TOL


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers' set_timesteps
@pytest.mark.parametrize(
    "order, variant, final, steps",
    [(2, "bh2", "zero", 10), (3, "bh1", "sigma_min", 10), (3, "bh2", "zero", 6), (1, "bh2", "zero", 5)],
)
def test_unipc_matches_diffusers(schedule, eps_model, order, variant, final, steps):
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(**SCHED_KW, solver_order=order, solver_type=variant, final_sigmas_type=final)
    ref.set_timesteps(steps)
    _use_our_tables(ref, schedule)
    last = 0.0 if final == "zero" else schedule.sigma_min
    sigmas = torch.cat([schedule.sigmas[ref.timesteps], torch.tensor([last], dtype=torch.float64)])
    ref.sigmas = sigmas.clone()  # its float32 copy of the same levels, in float64
    x_vp = _noise()
    x = x_vp.clone()
    for t in ref.timesteps:
        x = ref.step(eps_model(x, t.expand(SHAPE[0])), t, x).prev_sample
    ours = _ours(S.sample_unipc, eps_model, schedule, sigmas, x_vp, order=order, variant=variant)
    assert _max_diff(ours, x) <= TOL


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_matches_diffusers(schedule, eps_model, replay_randn, steps):
    from diffusers import LCMScheduler

    ref = LCMScheduler(**SCHED_KW, original_inference_steps=50)
    ref.set_timesteps(steps)
    _use_our_tables(ref, schedule)
    x_vp = _noise()
    x = x_vp.clone()
    for t in ref.timesteps:
        x, denoised = ref.step(eps_model(x, t.expand(SHAPE[0])), t, x, return_dict=False)
    sigmas = get_sigmas_lcm(schedule, steps)
    d = LCMDenoiser(EpsDenoiser(eps_model, schedule), schedule)
    ours = _ours(S.sample_lcm, eps_model, schedule, sigmas, x_vp, denoiser=d)
    assert _max_diff(ours, denoised) <= TOL


# -------------------------------------------------------------------------------- analytic Gaussian data

MU, S_DATA = 0.3, 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x] for x0 ~ N(μ, s²) per element and x = x0 + σ ε: (s² x + σ² μ)/(s² + σ²)."""
    s2 = sigma.view(-1, 1, 1, 1).to(x.dtype) ** 2
    return (S_DATA**2 * x + s2 * MU) / (S_DATA**2 + s2)


# (sampler, options, observed order of convergence it must reach at least)
DETERMINISTIC = [
    ("euler", {}, 0.9),
    ("euler_ancestral", {"eta": 0.0}, 0.9),
    ("ddim", {}, 0.9),
    ("heun", {}, 1.8),
    ("dpm_2", {}, 1.8),
    ("dpm_2_ancestral", {"eta": 0.0}, 1.8),
    ("dpmpp_2m", {}, 1.8),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 1.8),
    ("dpmpp_sde", {"eta": 0.0}, 1.8),
    ("dpmpp_2m_sde", {"eta": 0.0}, 1.8),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 1.8),
    ("dpmpp_3m_sde", {"eta": 0.0}, 1.8),
    ("plms", {}, 1.8),  # Adams–Bashforth with equal-step weights: second order on uneven Karras steps
    ("lms", {}, 3.0),
    ("unipc", {}, 2.5),  # UniPC-2 with its corrector is third order
    ("unipc", {"order": 3, "variant": "bh1"}, 2.2),
]


@pytest.mark.parametrize("name, options, order", DETERMINISTIC)
def test_deterministic_samplers_solve_the_ode(schedule, name, options, order):
    """The probability-flow ODE dx/dσ = (x − D)/σ for Gaussian data has the closed form
    x(σ) = μ + (x_T − μ) sqrt(s² + σ²)/sqrt(s² + σ_T²). Integrate from σ_max to σ_min (a schedule without the
    final jump to 0, which every sampler takes as a plain denoise) and check error and convergence order."""
    errors = []
    for steps in (50, 100):
        sigmas = get_sigmas_karras(schedule, steps)[:-1]
        x_t = _noise() * sigmas[0]
        exact = MU + (x_t - MU) * math.sqrt(S_DATA**2 + float(sigmas[-1]) ** 2) / math.sqrt(
            S_DATA**2 + float(sigmas[0]) ** 2
        )
        out = getattr(S, f"sample_{name}")(gaussian_denoiser, x_t, sigmas, **options)
        errors.append(_max_diff(out, exact))
    assert errors[1] <= (0.03 if order < 1.5 else 1.5e-3)
    assert math.log2(errors[0] / errors[1]) >= order


# First-order ancestral steps under-disperse by O(step size) (std 0.473 at 60 steps, 0.499 at 480 here).
STOCHASTIC = [
    ("euler_ancestral", {}, 480),
    ("ddpm", {}, 480),
    ("ddim", {"eta": 1.0}, 480),
    ("dpm_2_ancestral", {}, 60),
    ("dpmpp_2s_ancestral", {}, 60),
    ("dpmpp_sde", {}, 60),
    ("dpmpp_2m_sde", {}, 60),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 60),
    ("dpmpp_3m_sde", {}, 60),
]


@pytest.mark.parametrize("name, options, steps", STOCHASTIC)
def test_stochastic_samplers_sample_the_data_distribution(schedule, name, options, steps):
    """Started from N(μ, s² + σ_max²) the final samples must be N(μ, s²) distributed."""
    sigmas = get_sigmas_karras(schedule, steps)
    g = torch.Generator().manual_seed(3)
    x0 = MU + S_DATA * torch.randn(1, 1, 128, 128, generator=g, dtype=torch.float64)
    x_t = x0 + float(sigmas[0]) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = getattr(S, f"sample_{name}")(gaussian_denoiser, x_t, sigmas, generator=g, **options)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S_DATA, rel=0.03)
    # and it is not the deterministic ODE answer: the paths were stochastic
    ode = S.sample_dpmpp_2m(gaussian_denoiser, x_t, sigmas)
    assert (out - ode).abs().mean().item() > 0.05


def test_ddpm_is_ddim_eta_one_is_euler_ancestral(schedule, denoiser):
    """In σ-space the DDPM posterior step (Ho et al. eq. 7), DDIM with η = 1 (Song et al. eq. 16) and the
    ancestral Euler step with η = 1 are one and the same update, given the same noise."""
    sigmas = get_sigmas_karras(schedule, 8)
    x = _noise() * sigmas[0]
    runs = [fn(denoiser, x, sigmas, generator=torch.Generator().manual_seed(4), **kw)
            for fn, kw in ((S.sample_ddpm, {}), (S.sample_ddim, {"eta": 1.0}), (S.sample_euler_ancestral, {}))]
    assert _max_diff(runs[0], runs[1]) < 1e-12 and _max_diff(runs[0], runs[2]) < 1e-12


# ------------------------------------------------------------------------------------ noise and interfaces

ALL = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde",
       "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "ddim", "plms", "unipc", "lcm"]


@pytest.mark.parametrize("name", ALL)
def test_callback_once_per_step(schedule, name):
    sigmas = get_sigmas_karras(schedule, 6)
    x = _noise() * sigmas[0]
    seen = []
    getattr(S, f"sample_{name}")(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(0),
                                 callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert [d["sigma"] for d in seen] == pytest.approx(sigmas[:-1].tolist())
    assert all(d["x"].shape == SHAPE and d["denoised"].shape == SHAPE for d in seen)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "ddpm"])
def test_per_image_generators_equal_single_runs(schedule, name):
    sigmas = get_sigmas_karras(schedule, 5)
    x = _noise() * sigmas[0]
    fn = getattr(S, f"sample_{name}")
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    batch = fn(gaussian_denoiser, x, sigmas, generator=gens)
    for i, seed in enumerate((11, 12)):
        single = fn(gaussian_denoiser, x[i : i + 1], sigmas, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        fn(gaussian_denoiser, x, sigmas, generator=gens[:1])


def test_noise_is_drawn_in_float32_whatever_the_dtype(schedule):
    sigmas = get_sigmas_karras(schedule, 8)
    x = _noise() * sigmas[0]
    out64 = S.sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(5))
    out32 = S.sample_euler_ancestral(gaussian_denoiser, x.float(), sigmas, generator=torch.Generator().manual_seed(5))
    assert out32.dtype == torch.float32
    assert _max_diff(out32.double(), out64) < 1e-4


def test_same_seed_same_result_different_seed_different(schedule, denoiser):
    sigmas = get_sigmas_karras(schedule, 5)
    x = _noise() * sigmas[0]
    run = lambda seed: S.sample_dpmpp_2m_sde(denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_bad_options_raise(schedule):
    sigmas = get_sigmas_karras(schedule, 3)
    x = _noise()
    with pytest.raises(TypeError):
        S.sample_euler(gaussian_denoiser, x, sigmas, eta=0.5)
    with pytest.raises(ValueError):
        S.sample_dpmpp_2m_sde(gaussian_denoiser, x, sigmas, solver_type="rk4")
    with pytest.raises(ValueError):
        S.sample_unipc(gaussian_denoiser, x, sigmas, variant="bh3")
    with pytest.raises(ValueError):
        S.sample_euler(gaussian_denoiser, x, sigmas[:1])


# --------------------------------------------------------------------------------------------------- registry

A1111_LABELS = ["Euler a", "Euler", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
                "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DDIM", "PLMS", "UniPC", "LCM", "DDPM"]


@pytest.mark.parametrize("label", A1111_LABELS)
def test_every_a1111_label_resolves(label, schedule):
    spec = S.resolve_sampler(label)
    assert spec.label == label
    assert S.resolve_sampler(label.lower()) is spec
    karras = S.resolve_sampler(label + " Karras")
    assert karras.fn is spec.fn and karras.schedule == "karras" and karras.label == label + " Karras"
    assert S.resolve_sampler(label + " Exponential").schedule == "exponential"
    sigmas = spec.sigmas(schedule, 8)
    assert sigmas[-1] == 0 and torch.all(sigmas[:-1] > sigmas[1:])


@pytest.mark.parametrize(
    "name, fn, schedule_name, label",
    [
        ("k_euler_a", S.sample_euler_ancestral, "uniform", "Euler a"),
        ("euler_a", S.sample_euler_ancestral, "uniform", "Euler a"),
        ("k_euler_ancestral", S.sample_euler_ancestral, "uniform", "Euler a"),
        ("k_dpmpp_2m", S.sample_dpmpp_2m, "karras", "DPM++ 2M"),
        ("dpmpp_2m", S.sample_dpmpp_2m, "karras", "DPM++ 2M"),
        ("DPM++ 2M Karras", S.sample_dpmpp_2m, "karras", "DPM++ 2M Karras"),
        ("k_dpmpp_2m_ka", S.sample_dpmpp_2m, "karras", "DPM++ 2M Karras"),
        ("DPM++ SDE Karras", S.sample_dpmpp_sde, "karras", "DPM++ SDE Karras"),
        ("dpmpp_2m_sde_heun", S.sample_dpmpp_2m_sde, "exponential", "DPM++ 2M SDE Heun"),
        ("k_lms", S.sample_lms, "uniform", "LMS"),
        ("k_dpm_2_a", S.sample_dpm_2_ancestral, "karras", "DPM2 a"),
        ("Euler Karras", S.sample_euler, "karras", "Euler Karras"),
        ("unipc", S.sample_unipc, "sgm_uniform", "UniPC"),
        ("ddim", S.sample_ddim, "ddim_uniform", "DDIM"),
    ],
)
def test_aliases(name, fn, schedule_name, label):
    spec = S.resolve_sampler(name)
    assert spec.fn is fn and spec.schedule == schedule_name and spec.label == label


def test_spec_options_and_call(schedule):
    heun = S.resolve_sampler("DPM++ 2M SDE Heun")
    assert heun.options["solver_type"] == "heun"
    sigmas = heun.sigmas(schedule, 5)
    x = _noise() * sigmas[0]
    direct = S.sample_dpmpp_2m_sde(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(0),
                                   solver_type="heun")
    via = heun(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(0))
    assert torch.equal(direct, via)


def test_discard_penultimate_sigma(schedule):
    # A1111 computes steps + 1 levels for DPM2 / DPM2 a / DPM++ 3M SDE and drops the next-to-last one.
    full = get_sigmas_karras(schedule, 11)
    ours = S.resolve_sampler("DPM2").sigmas(schedule, 10)
    torch.testing.assert_close(ours, torch.cat([full[:-2], full[-1:]]))
    assert len(S.resolve_sampler("DPM++ 3M SDE").sigmas(schedule, 10)) == 11
    # an explicit schedule overrides the default; "Automatic" keeps it
    torch.testing.assert_close(S.resolve_sampler("Euler").sigmas(schedule, 10, "Karras"),
                               get_sigmas_karras(schedule, 10))
    assert S.resolve_sampler("Euler").sigmas(schedule, 4, "Automatic").shape == (5,)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as err:
        S.resolve_sampler("Euler b")
    for label in A1111_LABELS:
        assert label in str(err.value)
