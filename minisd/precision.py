"""The one place that decides how minisd computes on this machine: the default precision per device and CPU
kind, and why. Only generation uses it; anything that stores, converts, hashes or describes weights keeps
each tensor's stored precision (`STORED`). Overrides: MINISD_DTYPE=fp32|bf16|fp16 for users, and
MINISD_ASSUME_AMX=1|0 so that tests (and benchmarks) can take either CPU kind's decisions on any host (it also
stands for the measurement below: 1 = bf16 is fast here, 0 = it is not)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ParameterError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ENV = "MINISD_DTYPE"
ASSUME_AMX_ENV = "MINISD_ASSUME_AMX"
# `dtype=STORED` when loading: every tensor keeps the precision its file stores (convert, info).
STORED = "stored"


def dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles that PyTorch can use (bf16 matmuls then run several times faster);
    MINISD_ASSUME_AMX=1|0 answers instead of the hardware."""
    assumed = os.environ.get(ASSUME_AMX_ENV, "").strip()
    if assumed in ("0", "1"):
        return assumed == "1"
    if assumed:
        raise ParameterError(f"{ASSUME_AMX_ENV}={assumed!r}: expected 1 or 0")
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)() and getattr(cpu, "_init_amx", lambda: False)())


# bf16 becomes the default on a CPU without AMX only where its matmuls measure this much faster than fp32: some
# AVX-512-BF16 CPUs run bf16 at half the fp32 rate (a 2-core Xeon VM: 169 against 323 GFLOP/s), others at about
# twice it (a 2-core AMD EPYC VM: SD 1.5 UNet step 1.54 s against 2.72 s).
BF16_SPEEDUP_NEEDED = 1.3


def bf16_speedup() -> float | None:
    """How much faster a bf16 matmul runs than an fp32 one on this CPU, measured once per CPU model, torch version
    and thread count and remembered in the user's cache folder; None where MINISD_ASSUME_AMX decides instead."""
    if os.environ.get(ASSUME_AMX_ENV, "").strip():
        return None
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minisd" / "cpu-bf16-speedup.json"
    try:
        known = json.loads(cache.read_text())
        if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
            return float(known[key])
    except (OSError, ValueError):
        known = {}
    speedup = matmul_seconds(torch.float32) / matmul_seconds(torch.bfloat16)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({**(known if isinstance(known, dict) else {}), key: round(speedup, 3)}))
    except OSError:
        pass  # an unwritable cache only means measuring again next time
    return speedup


def matmul_seconds(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """The best of a few n×n×n matmuls in `dtype` (about 0.01–0.1 s each on a 2-core CPU)."""
    a, b = torch.ones(n, n, dtype=dtype), torch.ones(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up: the first call picks and prepares the kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def cpu_bf16_is_fast() -> tuple[bool, str]:
    """Whether bf16 is the fast precision on this CPU, and why: AMX, or a measured speed-up without it."""
    if cpu_has_amx():
        return True, "this CPU has AMX" + assumed_note()
    speedup = bf16_speedup()
    if speedup is None:
        return False, "this CPU has no AMX: bf16 would be slower" + assumed_note()
    if speedup >= BF16_SPEEDUP_NEEDED:
        return True, f"no AMX, but bf16 matmuls measured {speedup:.1f}× faster than fp32 here"
    return False, f"no AMX, and bf16 matmuls measured {speedup:.2f}× the speed of fp32 here"


@dataclass(frozen=True)
class ComputeChoice:
    """How minisd computes on one device, and the reason shown by `minisd info`."""
    dtype: torch.dtype
    reason: str
    memory_format: torch.memory_format = torch.contiguous_format

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)} {layout_name(self.memory_format)} ({self.reason})"


def compute_choice(device: str | torch.device) -> ComputeChoice:
    """The precision (`dtype_choice`) and, for it, the memory format (`memory_format`) on `device`."""
    choice = dtype_choice(device)
    reason = choice.reason + (f"; layout set by {MEMORY_FORMAT_ENV}" if os.environ.get(MEMORY_FORMAT_ENV) else "")
    return dataclasses.replace(choice, memory_format=memory_format(device, choice.dtype), reason=reason)


def dtype_choice(device: str | torch.device) -> ComputeChoice:
    """fp16 on CUDA; on CPUs bf16 where it is fast (AMX, or measured faster: `cpu_bf16_is_fast`), fp32 elsewhere:
    on a CPU with AVX-512-BF16 but slow bf16 a UNet step was 1.3× slower than fp32 (bench/README.md).
    MINISD_DTYPE wins."""
    device = torch.device(device)
    forced = os.environ.get(DTYPE_ENV, "").strip().lower()
    if forced:
        if forced not in DTYPES:
            raise ParameterError(f"{DTYPE_ENV}={forced!r}: expected one of {', '.join(DTYPES)}")
        return ComputeChoice(DTYPES[forced], f"set by {DTYPE_ENV}")
    if device.type == "cuda":
        return ComputeChoice(torch.float16, "CUDA")
    if device.type != "cpu":
        return ComputeChoice(torch.float32, device.type)
    fast, why = cpu_bf16_is_fast()
    return ComputeChoice(torch.bfloat16 if fast else torch.float32, why)


def assumed_note() -> str:
    return f", as {ASSUME_AMX_ENV} says" if os.environ.get(ASSUME_AMX_ENV, "").strip() else ""


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The precision generation uses on `device` when the caller does not say."""
    return compute_choice(device).dtype


# ---- memory format (issue 13) --------------------------------------------------------------------------------

MEMORY_FORMAT_ENV = "MINISD_MEMORY_FORMAT"
LAYOUTS = {"channels-last": torch.channels_last, "nchw": torch.contiguous_format}


def layout_name(memory_format: torch.memory_format) -> str:
    return next(name for name, f in LAYOUTS.items() if f == memory_format)


def memory_format(device: str | torch.device, dtype: torch.dtype) -> torch.memory_format:
    """The layout of the UNet's and VAE's convolutions for `dtype` on `device`: channels-last (NHWC) for bf16 on
    CPUs where bf16 is fast (AMX, or measured: diffusers' bf16 UNet step 1.34 s channels-last against 1.55 s NCHW on
    a 2-core AMD EPYC without AMX), where oneDNN's bf16 convolutions are fastest in it (diffusers' bf16 UNet step 1.9× faster than
    in NCHW on a 2-core AMX Xeon; OpenVINO computes so too), NCHW everywhere else: without AMX, channels-last fp32
    measured no faster (6.9 s against 6.9 s per SD 1.5 step, README Performance). Both layouts compute the same
    results up to kernel rounding (tests/test_speed_options.py), and no copy changes layout inside the models.
    MINISD_MEMORY_FORMAT=channels-last|nchw wins."""
    forced = os.environ.get(MEMORY_FORMAT_ENV, "").strip().lower().replace("_", "-")
    if forced:
        if forced not in LAYOUTS:
            raise ParameterError(f"{MEMORY_FORMAT_ENV}={forced!r}: expected one of {', '.join(LAYOUTS)}")
        return LAYOUTS[forced]
    fast_bf16 = torch.device(device).type == "cpu" and dtype == torch.bfloat16 and cpu_bf16_is_fast()[0]
    return torch.channels_last if fast_bf16 else torch.contiguous_format
