"""Schedule tests: SD's DDPM noise levels and σ ↔ t maps against diffusers and k-diffusion, the sigma
schedules against k-diffusion, diffusers and ComfyUI's documented rules, and A1111's img2img slicing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minisd.schedule import (
    SCHEDULES,
    DiscreteSchedule,
    ScheduleConfig,
    get_sigmas,
    get_sigmas_ddim_uniform,
    get_sigmas_exponential,
    get_sigmas_karras,
    get_sigmas_lcm,
    get_sigmas_normal,
    get_sigmas_polyexponential,
    get_sigmas_uniform,
    img2img_sigmas,
    resolve_schedule,
)

from kdiffusion_reference import load as load_kdiffusion

SD = ScheduleConfig()


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule.from_config(SD)


@pytest.fixture
def float64_default():
    # k-diffusion builds its ramps with the default dtype; float64 makes its reference values exact.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_sd1_noise_range(schedule):
    assert schedule.num_train_timesteps == 1000
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert torch.all(schedule.sigmas[1:] > schedule.sigmas[:-1])


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    from diffusers import DDPMScheduler

    config = ScheduleConfig(beta_schedule=beta_schedule)
    ours = DiscreteSchedule.from_config(config).alphas_cumprod
    ref = DDPMScheduler(beta_start=config.beta_start, beta_end=config.beta_end, beta_schedule=beta_schedule)
    # diffusers computes in float32: agreement to float32 accuracy
    torch.testing.assert_close(ours.float(), ref.alphas_cumprod, rtol=2e-6, atol=1e-7)


def test_unknown_beta_schedule_raises():
    with pytest.raises(ValueError, match="scaled_linear"):
        DiscreteSchedule.from_config(ScheduleConfig(beta_schedule="cosine-ish"))


def test_prediction_type_carried():
    v_schedule = DiscreteSchedule.from_config(ScheduleConfig(prediction_type="v_prediction"))
    assert v_schedule.prediction_type == "v_prediction"


def test_sigma_t_maps_match_kdiffusion(schedule):
    _, external = load_kdiffusion()
    ref = external.DiscreteSchedule(schedule.sigmas.clone(), quantize=False)
    g = torch.Generator().manual_seed(0)
    # inside the range, at the ends, beyond both ends, and exactly on discrete levels
    sigmas = torch.cat([
        torch.exp(torch.empty(200, dtype=torch.float64).uniform_(math.log(0.03), math.log(14.6), generator=g)),
        torch.tensor([schedule.sigma_min, schedule.sigma_max, 0.01, 30.0], dtype=torch.float64),
        schedule.sigmas[::97],
    ])
    for quantize in (False, True):
        ours = schedule.sigma_to_t(sigmas, quantize=quantize)
        theirs = ref.sigma_to_t(sigmas, quantize=quantize).to(torch.float64)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    t = torch.empty(300, dtype=torch.float64).uniform_(0, 999, generator=g)
    # k-diffusion rounds t to float32 inside t_to_sigma, hence the float32-level tolerance
    torch.testing.assert_close(schedule.t_to_sigma(t), ref.t_to_sigma(t), rtol=1e-6, atol=0)


def test_sigma_t_round_trip(schedule):
    t = torch.linspace(0, 999, 777, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    integer_t = torch.arange(1000)
    torch.testing.assert_close(schedule.t_to_sigma(integer_t), schedule.sigmas)
    assert schedule.sigma_to_t(torch.tensor(0.0)).item() == 0.0  # σ = 0 clamps to the least noisy level


def test_sigma_to_t_float32_and_half(schedule):
    sigma = torch.tensor([1.0, 5.0], dtype=torch.float16)
    t = schedule.sigma_to_t(sigma)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t.double(), schedule.sigma_to_t(sigma.double()), rtol=0, atol=1e-3)


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_model_schedules_match_kdiffusion(schedule, float64_default, steps):
    sampling, external = load_kdiffusion()
    lo, hi = schedule.sigma_min, schedule.sigma_max
    cases = [
        (get_sigmas_karras(schedule, steps), sampling.get_sigmas_karras(steps, lo, hi)),
        (get_sigmas_karras(schedule, steps, sigma_min=0.1, sigma_max=10, rho=5.0),
         sampling.get_sigmas_karras(steps, 0.1, 10, rho=5.0)),
        (get_sigmas_exponential(schedule, steps), sampling.get_sigmas_exponential(steps, lo, hi)),
        (get_sigmas_polyexponential(schedule, steps), sampling.get_sigmas_polyexponential(steps, lo, hi)),
        (get_sigmas_polyexponential(schedule, steps, rho=2.5), sampling.get_sigmas_polyexponential(steps, lo, hi, 2.5)),
    ]
    ref = external.DiscreteSchedule(schedule.sigmas.clone(), quantize=False)
    cases.append((get_sigmas_uniform(schedule, steps), ref.get_sigmas(steps)))
    for ours, theirs in cases:
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, theirs.to(torch.float64), rtol=1e-6, atol=0)


# ComfyUI's definitions (comfy/samplers.py), written here independently with numpy from their documentation:
# the model's discrete σ table, its timestep t(σ) (nearest level) and σ(t) (log-linear interpolation).
def _comfy_sigma(table: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.exp(np.interp(t, np.arange(len(table)), np.log(table)))


def _comfy_reference(name: str, table: np.ndarray, steps: int) -> np.ndarray:
    n = len(table)
    if name == "normal":
        sig = _comfy_sigma(table, np.linspace(n - 1, 0, steps))
    elif name == "sgm_uniform":
        sig = _comfy_sigma(table, np.linspace(n - 1, 0, steps + 1)[:-1])
    elif name == "simple":
        stride = n / steps
        sig = np.array([table[-(1 + int(x * stride))] for x in range(steps)])
    elif name == "ddim_uniform":
        sig = table[np.arange(1, n, max(n // steps, 1))][::-1]
    else:
        raise KeyError(name)
    return np.append(sig, 0.0)


@pytest.mark.parametrize("steps", [1, 3, 20, 30, 999])
@pytest.mark.parametrize("name", ["normal", "sgm_uniform", "simple", "ddim_uniform"])
def test_comfyui_schedules(schedule, name, steps):
    ours = get_sigmas(name, schedule, steps)
    ref = _comfy_reference(name, schedule.sigmas.numpy(), steps)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [10, 20, 25, 50])
def test_ddim_uniform_is_diffusers_leading_spacing(schedule, steps):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(beta_start=SD.beta_start, beta_end=SD.beta_end, beta_schedule="scaled_linear",
                        timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(steps)
    expected = torch.cat([schedule.sigmas[ref.timesteps], torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(get_sigmas_ddim_uniform(schedule, steps), expected)


def test_ddim_uniform_extra_step_quirk(schedule):
    # 1000 // 30 = 33 and 1 + 33·30 = 991 < 1000: 31 levels, as in CompVis/A1111/ComfyUI.
    assert len(get_sigmas_ddim_uniform(schedule, 30)) == 32


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 13, 50])
def test_lcm_schedule_matches_diffusers(schedule, steps):
    from diffusers import LCMScheduler

    ref = LCMScheduler(beta_start=SD.beta_start, beta_end=SD.beta_end, beta_schedule="scaled_linear",
                       original_inference_steps=50)
    ref.set_timesteps(steps)
    expected = torch.cat([schedule.sigmas[ref.timesteps], torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(get_sigmas_lcm(schedule, steps), expected)
    with pytest.raises(ValueError):
        get_sigmas_lcm(schedule, 51)


def test_normal_equals_uniform_for_discrete_models(schedule):
    torch.testing.assert_close(get_sigmas_normal(schedule, 17), get_sigmas_uniform(schedule, 17))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 7, 40])
def test_every_schedule_descends_to_zero(schedule, name, steps):
    sigmas = get_sigmas(name, schedule, steps)
    assert sigmas.ndim == 1 and sigmas[-1] == 0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert sigmas[0] <= schedule.sigma_max + 1e-9 and sigmas[-2] >= schedule.sigma_min - 1e-9
    expected_len = len(range(1, 1000, 1000 // steps)) + 1 if name == "ddim_uniform" else steps + 1
    assert len(sigmas) == expected_len


def test_schedule_names_and_errors(schedule):
    assert resolve_schedule("Karras") == "karras"
    assert resolve_schedule("SGM Uniform") == "sgm_uniform"
    assert resolve_schedule("DDIM") == "ddim_uniform"
    assert resolve_schedule("Polyexponential") == "polyexponential"
    with pytest.raises(ValueError) as err:
        get_sigmas("linear-quadratic", schedule, 10)
    for name in SCHEDULES:
        assert name in str(err.value)
    with pytest.raises(ValueError):
        get_sigmas_karras(schedule, 0)


def _fake_schedule(calls):
    def sigmas_for(n):
        calls.append(n)
        return torch.arange(n, -1, -1, dtype=torch.float64)  # n + 1 values ending in 0; value = steps left
    return sigmas_for


@pytest.mark.parametrize(
    "steps, strength, total, first, n_steps",
    [
        # A1111 default: t_enc = int(min(strength, 0.999) · steps); run sigmas[steps − t_enc − 1:]
        (20, 0.75, 20, 16, 16),  # t_enc = 15
        (20, 1.0, 20, 20, 20),  # 0.999 · 20 = 19.98 → 19
        (25, 0.5, 25, 13, 13),  # t_enc = 12
        (10, 0.0, 10, 1, 1),  # t_enc = 0: a single step from the last σ
        (30, 0.3, 30, 10, 10),  # t_enc = 9
        (100, 0.29, 100, 29, 29),  # 0.29 · 100 = 28.999… in floating point → t_enc = 28, as in A1111
    ],
)
def test_img2img_sigmas_a1111_rule(steps, strength, total, first, n_steps):
    calls: list[int] = []
    sigmas = img2img_sigmas(_fake_schedule(calls), steps, strength)
    assert calls == [total]
    assert sigmas[0].item() == first and sigmas[-1] == 0 and len(sigmas) == n_steps + 1


@pytest.mark.parametrize(
    "steps, strength, total",
    [(20, 0.5, 40), (10, 0.3, 33), (20, 1.0, 20)],  # int(steps / min(strength, 0.999))
)
def test_img2img_sigmas_fixed_steps(steps, strength, total):
    calls: list[int] = []
    sigmas = img2img_sigmas(_fake_schedule(calls), steps, strength, fix_steps=True)
    assert calls == [total]
    assert len(sigmas) == steps + 1 and sigmas[0].item() == steps


def test_img2img_sigmas_real_schedule(schedule):
    full = get_sigmas_karras(schedule, 20)
    tail = img2img_sigmas(lambda n: get_sigmas_karras(schedule, n), 20, 0.6)
    torch.testing.assert_close(tail, full[20 - 12 - 1:])
    with pytest.raises(ValueError):
        img2img_sigmas(lambda n: get_sigmas_karras(schedule, n), 20, 1.5)
