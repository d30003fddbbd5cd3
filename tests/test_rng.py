"""Noise sources: Philox4x32-10 against Random123's known answers, CUDA's torch.randn against outputs published from
real GPUs (small tensors, and large ones on A100/H100/RTX-class GPUs where the thread cap changes the layout), and
successive draws / batch layouts against a scalar reference written here from the published algorithm."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minisd import rng
from minisd.errors import ParameterError

VECTORS = json.loads((Path(__file__).parent / "data" / "cuda_randn_vectors.json").read_text())


def _word(value) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


@pytest.mark.parametrize("case", VECTORS["philox4x32_10_known_answers"], ids=lambda c: str(c["counter"][0]))
def test_philox_known_answers(case):
    counter = np.array([[_word(c)] for c in case["counter"]], dtype=np.uint64)
    key = np.array([_word(k) for k in case["key"]], dtype=np.uint64)
    out = rng.philox4x32(counter, key)[:, 0]
    assert [f"{v:08x}" for v in out.tolist()] == case["output"]


@pytest.mark.parametrize("case", VECTORS["randn"], ids=lambda c: c["source"].split(" ")[0])
def test_cuda_randn_equals_published_gpu_outputs(case):
    n = math.prod(case["shape"])
    values, _ = rng.cuda_randn_elements(case["seed"], n, np.array(case["elements"], dtype=np.uint64),
                                        max_threads=case["max_threads"])
    # 4 printed digits: half a unit of the last digit; 8 digits: the GPU's sine/log are approximations (errors
    # up to ~2^-21 in sin, times s <= 3 here) that our correctly rounded float32 emulation cannot follow bit for
    # bit: within 1e-6 (measured: 6.2e-7, 1-5 float32 ulps).
    tolerance = 0.5e-4 + 1e-6 if case["digits"] == 4 else 1e-6
    np.testing.assert_allclose(values, case["values"], rtol=0, atol=tolerance)


def test_published_shape_through_the_generator():
    case = VECTORS["randn"][0]
    g = rng.CudaGenerator(case["seed"])
    np.testing.assert_allclose(g.randn(tuple(case["shape"])).flatten().numpy(), case["values"], atol=1e-6)
    assert g.offset == 4  # one curand_normal4 per thread: torch advances the Philox offset by 4


# ---- an independent scalar reference: Philox4x32-10 on Python ints, cuRAND's Box-Muller in float64 -----------

def _philox_scalar(counter: list[int], key: list[int]) -> list[int]:
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) % 2**32, (k[1] + 0xBB67AE85) % 2**32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 % 2**32, (p0 >> 32) ^ c[3] ^ k[1], p0 % 2**32]
    return c


def _normal4(seed: int, subsequence: int, counter_low: int) -> list[float]:
    x, y, z, w = _philox_scalar([counter_low % 2**32, counter_low >> 32, subsequence % 2**32, subsequence >> 32],
                                [seed % 2**32, seed >> 32])
    inv, inv_2pi = 2.3283064e-10, 2.3283064e-10 * 6.2831855
    out = []
    for a, b in ((x, y), (z, w)):
        s = math.sqrt(-2 * math.log(a * inv + inv / 2))
        angle = b * inv_2pi + inv_2pi / 2
        out += [s * math.sin(angle), s * math.cos(angle)]
    return out


def _reference_randn(seed: int, n: int, offset: int, threads_cap: int | None) -> tuple[list[float], int]:
    """torch's grid-stride kernel: T threads; thread t, loop j fills elements t + T(4j + i) with normal i."""
    blocks = -(-n // 256) if threads_cap is None else min(-(-n // 256), threads_cap // 256)
    threads = blocks * 256
    loops = -(-n // (threads * 4))
    out = [0.0] * n
    for t in range(min(threads, n)):
        for j in range(loops):
            normals = _normal4(seed, t, offset // 4 + j)
            for i in range(4):
                e = t + threads * (4 * j + i)
                if e < n:
                    out[e] = normals[i]
    return out, offset + 4 * loops


@pytest.mark.parametrize("shape,cap", [((2, 4, 8, 8), None), ((3, 700), 512), ((5, 4, 6, 6), 256)])
def test_successive_draws_and_batch_layout_equal_the_scalar_reference(shape, cap):
    seed = 2**32 + 12345  # a seed above 32 bits uses the key's high word (A1111's seed + ENSD can be)
    g = rng.CudaGenerator(seed, max_threads=cap)
    offset = 0
    for _ in range(3):
        got = g.randn(shape)
        expected, offset = _reference_randn(seed, math.prod(shape), offset, cap)
        assert got.shape == shape and got.dtype == torch.float32
        # float64 reference vs float32 emulation: v rounded to float32 moves the angle by up to ~4e-7 rad.
        np.testing.assert_allclose(got.flatten().numpy(), expected, atol=5e-6, rtol=0)
        assert g.offset == offset


def test_batch_of_one_draw_is_not_four_image_draws():
    """A (B, C, H, W) draw lays the batch out along the threads: image 1 of one draw is not image 0's second
    draw nor a fresh generator's image, which is why minisd (as A1111) draws per image."""
    batch = rng.CudaGenerator(7).randn((2, 4, 8, 8))
    g = rng.CudaGenerator(7)
    first, second = g.randn((4, 8, 8)), g.randn((4, 8, 8))
    assert torch.equal(batch[0], first)
    assert not torch.allclose(batch[1], second)


def test_nv_and_gpu_sources_equal_a_cuda_generator_and_cpu_is_torch():
    shape = (4, 16, 16)
    torch_cpu = torch.randn(shape, generator=torch.Generator().manual_seed(99))
    assert torch.equal(rng.randn("CPU", 99, shape), torch_cpu)
    assert torch.equal(rng.randn("gpu", 99, shape), rng.CudaGenerator(99).randn(shape))
    assert torch.equal(rng.randn("NV", 99, shape), rng.randn("gpu", 99, shape))
    samples = rng.randn("gpu", 1, (64, 64, 64))
    assert abs(samples.mean().item()) < 0.01 and abs(samples.std().item() - 1) < 0.01


def test_unknown_source_is_one_clear_error():
    with pytest.raises(ParameterError, match="rng must be one of cpu, gpu, nv"):
        rng.normalize_rng("tpu")
