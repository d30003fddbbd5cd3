"""The one place that decides how minisd computes on this machine: the default precision per device and CPU
kind, and why. Only generation uses it; anything that stores, converts, hashes or describes weights keeps
each tensor's stored precision (`STORED`). Overrides: MINISD_DTYPE=fp32|bf16|fp16 for users, and
MINISD_ASSUME_AMX=1|0 so that tests (and benchmarks) can take either CPU kind's decisions on any host."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

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
    """fp16 on CUDA; on CPUs bf16 where AMX makes it fast, fp32 elsewhere: measured, on a CPU with AVX-512-BF16
    but no AMX a bf16 UNet step was 1.3× slower than fp32 (bench/README.md). MINISD_DTYPE wins."""
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
    if cpu_has_amx():
        return ComputeChoice(torch.bfloat16, "this CPU has AMX" + assumed_note())
    return ComputeChoice(torch.float32, "this CPU has no AMX: bf16 would be slower" + assumed_note())


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
    CPUs with AMX, where oneDNN's bf16 convolutions are fastest in it (diffusers' bf16 UNet step 1.9× faster than
    in NCHW on a 2-core AMX Xeon; OpenVINO computes so too), NCHW everywhere else: without AMX, channels-last fp32
    measured no faster (6.9 s against 6.9 s per SD 1.5 step, README Performance). Both layouts compute the same
    results up to kernel rounding (tests/test_speed_options.py), and no copy changes layout inside the models.
    MINISD_MEMORY_FORMAT=channels-last|nchw wins."""
    forced = os.environ.get(MEMORY_FORMAT_ENV, "").strip().lower().replace("_", "-")
    if forced:
        if forced not in LAYOUTS:
            raise ParameterError(f"{MEMORY_FORMAT_ENV}={forced!r}: expected one of {', '.join(LAYOUTS)}")
        return LAYOUTS[forced]
    amx_bf16 = torch.device(device).type == "cpu" and dtype == torch.bfloat16 and cpu_has_amx()
    return torch.channels_last if amx_bf16 else torch.contiguous_format
