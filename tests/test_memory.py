"""Memory behaviour on CPU: malloc keeps freed tensors' memory for reuse, and the memory estimate of a guided
UNet call halves when cond and uncond run one after the other."""
from __future__ import annotations

import subprocess
import sys

import torch

from minisd.config import PRESETS
from minisd.memory import estimate_generation_memory


# Allocates, touches and frees a 64 MiB tensor 8 times; prints the minor page faults in units of 64 MiB.
CYCLES = """
import resource, sys, torch
from minisd.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(8):
    torch.empty(2**24).fill_(1.0)
print((faults() - before) / (2**26 // 4096))
"""


def faulted_tensors(mode: str) -> float:
    # A fresh interpreter: the heap state of a long test session would decide what glibc can reuse.
    done = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def test_freed_large_tensors_are_reused_instead_of_faulted_in_again():
    fresh, kept = faulted_tensors("default"), faulted_tensors("keep")
    # Measured with 4 KiB pages: 8.0 by default (every tensor a fresh mmap that the kernel zero-fills page by
    # page), 4.0 with the setting (glibc reuses the freed memory every other time, for alignment).
    assert fresh > 0 and kept <= 0.6 * fresh, (fresh, kept)


def test_sequential_guidance_halves_the_unet_estimate():
    config = PRESETS["sd1"]
    batched, sequential = (estimate_generation_memory(config, 1024, 1024, 4, torch.float32, tiled_vae=True,
                                                      sequential_guidance=s) for s in (False, True))
    assert sequential < batched  # at 1024² with 4 images the UNet, not the banded VAE, sets the peak
