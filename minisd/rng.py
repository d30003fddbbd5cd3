"""Noise sources as A1111 names them: "cpu" (torch's CPU generator) and "gpu"/"nv" (what torch.randn gives on an
NVIDIA GPU), the latter computed on the CPU from CUDA's Philox4x32-10 counter-based generator (Salmon et al. 2011,
"Parallel random numbers: as easy as 1, 2, 3") and the Box-Muller transform of cuRAND's curand_normal4."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ParameterError

RNG_SOURCES = ("cpu", "gpu", "nv")
RNG_LABELS = {"cpu": "CPU", "gpu": "GPU", "nv": "NV"}  # how A1111's infotext spells them

# Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011, table 2; cuRAND's constants).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)

# cuRAND's float32 constants: CURAND_2POW32_INV = 2.3283064e-10f (not exactly 2^-32) and
# CURAND_2POW32_INV_2PI = 2.3283064e-10f * 6.2831855f, folded in float32.
_INV32 = float(np.float32(2.3283064e-10))
_INV32_2PI = float(np.float32(np.float32(2.3283064e-10) * np.float32(6.2831855)))

# torch's CUDA sampling kernels (ATen distribution_nullary_kernel): 256 threads per block, one curand_normal4
# call (4 normals) per thread per loop iteration.
CUDA_BLOCK = 256
CUDA_UNROLL = 4


def normalize_rng(name: str) -> str:
    """"CPU"/"gpu"/"NV" -> "cpu"/"gpu"/"nv"; ParameterError for anything else."""
    key = str(name).strip().lower()
    if key not in RNG_SOURCES:
        raise ParameterError(f"rng must be one of {', '.join(RNG_SOURCES)}, got {name!r}")
    return key


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """Philox4x32-`rounds` of counters (4, N) under keys (2, N) (or (2,)), as uint32 (4, N).

    One round: (hi0, lo0) = M0·c0, (hi1, lo1) = M1·c2 (64-bit products), c' = (hi1 ⊕ c1 ⊕ k0, lo1, hi0 ⊕ c3 ⊕ k1, lo0);
    the key grows by (W0, W1) between rounds."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for r in range(rounds):
        if r:
            k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
        p0, p1 = c0 * m0, c2 * m1  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def _to_f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(np.float64)


def box_muller(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cuRAND's _curand_box_muller in float32: u = x·2⁻³² + 2⁻³³, v = y·2π·2⁻³² + π·2⁻³² (each one fused
    multiply-add), s = sqrt(−2 log u); returns (s sin v, s cos v). Every float32 operation is emulated by a
    float64 operation rounded to float32, i.e. correctly rounded; the GPU's log and sine are approximations, so
    its values differ from these by a few float32 ulps (≤ 1e-6 on the published vectors, tests/test_rng.py)."""
    u = _to_f32(_to_f32(x) * _INV32 + _INV32 / 2)
    v = _to_f32(_to_f32(y) * _INV32_2PI + _INV32_2PI / 2)
    s = _to_f32(np.sqrt(-2.0 * _to_f32(np.log(u))))
    return (s * _to_f32(np.sin(v))).astype(np.float32), (s * _to_f32(np.cos(v))).astype(np.float32)


def cuda_randn(seed: int, shape: tuple[int, ...] | torch.Size, offset: int = 0,
               max_threads: int | None = None) -> tuple[torch.Tensor, int]:
    """torch.randn(shape, dtype=float32) of a CUDA generator seeded `seed` whose Philox offset is `offset`;
    returns (CPU tensor, offset after the draw).

    torch launches ceil(n/256) blocks of 256 threads, capped at the GPU's resident-thread capacity
    (`max_threads` = SM count × max threads per SM; None: no cap). Thread t runs curand_init(seed,
    subsequence=t, offset) and, for loop iteration j, one curand_normal4 giving 4 normals, which fill the
    elements t + T·(4j + i), i = 0..3, T = number of threads. The counter of (t, j) is
    (offset/4 + j, 0, t mod 2³², t div 2³²), the key (seed mod 2³², seed div 2³²). The generator's offset then
    grows by 4 × the iterations per thread. Without a cap (and on any GPU whose thread capacity is ≥ n) each
    element is the first normal of its own thread, which is what A1111's "NV" source computes."""
    n = math.prod(shape)
    values, new_offset = cuda_randn_elements(seed, n, np.arange(n, dtype=np.uint64), offset, max_threads)
    return torch.from_numpy(values).reshape(tuple(shape)), new_offset


def cuda_randn_elements(seed: int, n: int, elements: np.ndarray, offset: int = 0,
                        max_threads: int | None = None) -> tuple[np.ndarray, int]:
    """Elements `elements` (flat indices) of a CUDA torch.randn of `n` elements (see `cuda_randn`), as float32,
    and the generator's offset after the whole draw."""
    if n == 0:
        return np.zeros(0, dtype=np.float32), offset
    blocks = -(-n // CUDA_BLOCK)
    if max_threads is not None:
        blocks = max(1, min(blocks, max_threads // CUDA_BLOCK))
    threads = blocks * CUDA_BLOCK
    iterations = -(-n // (threads * CUDA_UNROLL))
    e = np.asarray(elements, dtype=np.uint64)
    t, k = e % np.uint64(threads), e // np.uint64(threads)
    j, i = k // np.uint64(CUDA_UNROLL), k % np.uint64(CUDA_UNROLL)
    low = np.uint64(offset // 4) + j  # the 128-bit counter's low word pair
    counter = np.stack([low & _MASK32, low >> np.uint64(32), t & _MASK32, t >> np.uint64(32)])
    seed = int(seed) % 2**64
    x = philox4x32(counter, np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64))
    out = np.empty(len(e), dtype=np.float32)
    for pair in (0, 1):  # normals 0, 1 come from words (x, y), normals 2, 3 from (z, w)
        chosen = (i // np.uint64(2)) == np.uint64(pair)
        if chosen.any():
            sin, cos = box_muller(x[2 * pair][chosen], x[2 * pair + 1][chosen])
            out[chosen] = np.where(i[chosen] % np.uint64(2) == 0, sin, cos)
    return out, offset + iterations * CUDA_UNROLL


class CudaGenerator:
    """A CUDA torch.Generator emulated on the CPU: successive `randn` calls give what successive
    torch.randn(shape, generator=g, device="cuda") calls give after g.manual_seed(seed)."""

    def __init__(self, seed: int, max_threads: int | None = None):
        self.seed, self.offset, self.max_threads = int(seed), 0, max_threads
        self.device = torch.device("cpu")

    def randn(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        noise, self.offset = cuda_randn(self.seed, shape, self.offset, self.max_threads)
        return noise


def create_generator(source: str, seed: int) -> torch.Generator | CudaGenerator:
    """A fresh generator of `source` ("cpu", "gpu", "nv") seeded `seed`."""
    source = normalize_rng(source)
    if source == "cpu":
        return torch.Generator("cpu").manual_seed(int(seed))
    return CudaGenerator(seed)


def draw(generator: torch.Generator | CudaGenerator, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The next float32 N(0, I) sample of `shape` from either kind of generator, on the CPU."""
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32).cpu()
    return generator.randn(shape)


def randn(source: str, seed: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The first draw of a fresh generator: A1111's devices.randn_local(seed, shape)."""
    return draw(create_generator(source, seed), shape)
