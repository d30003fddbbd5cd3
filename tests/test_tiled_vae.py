"""Banded ("tiled") VAE decode/encode: equal to the untiled pass everywhere — every GroupNorm sees the whole
image's statistics and every convolution its real neighbour rows, so there are no seams — with less memory."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from minisd.config import PRESETS
from minisd.models.vae import AutoencoderKL
from minisd.testing import random_state_dict
from minisd.tiled_vae import tiled_decode, tiled_encode


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    config = PRESETS["tiny"]
    model = AutoencoderKL(config.vae).eval()
    prefix = "first_stage_model."
    model.load_state_dict({k[len(prefix):]: v for k, v in random_state_dict(config, 3).items() if k.startswith(prefix)})
    return model


@pytest.mark.parametrize("band", [5, 16, 1000])
def test_banded_decode_equals_untiled(vae, band):
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(band))
    with torch.no_grad():
        plain = vae.decode(z)
        assert ((tiled_decode(vae, z, band=band) - plain).abs().max() / plain.abs().max()) < 1e-5


def test_banded_decode_of_a_1024_image_is_within_one_level_everywhere(vae):
    z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, tiled = vae.decode(z).clamp(-1, 1), tiled_decode(vae, z).clamp(-1, 1)
    assert (plain - tiled).abs().max() * 127.5 <= 1  # in 8-bit levels: no seams anywhere


@pytest.mark.parametrize("band", [3, 32])
def test_banded_encode_equals_untiled(vae, band):
    x = torch.rand(1, 3, 96, 136, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        plain = vae.encode(x)
        assert ((tiled_encode(vae, x, band=band) - plain).abs().max() / plain.abs().max()) < 1e-5


PEAK = """
import sys, torch
from minisd.config import PRESETS
from minisd.models.vae import AutoencoderKL
from minisd.tiled_vae import tiled_decode
torch.set_num_threads(1)
vae = AutoencoderKL(PRESETS["tiny"].vae).eval()
z = torch.randn(1, 4, 128, 128)
def peak():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
before = peak()
with torch.inference_mode():
    out = vae.decode(z) if sys.argv[1] == "plain" else tiled_decode(vae, z)
print(peak() - before)
"""


def test_banded_decode_uses_less_peak_memory():
    plain, tiled = (int(subprocess.run([sys.executable, "-c", PEAK, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("plain", "tiled"))
    print(f"1024x1024 decode, extra peak RSS: untiled {plain / 2**20:.0f} MiB, banded {tiled / 2**20:.0f} MiB")
    assert tiled < 0.8 * plain
