"""The per-CPU precision decision and everything that must not depend on it: `convert` keeps stored precision
bit for bit, `info` describes the file, generation without --dtype uses the machine's choice — each under both
CPU kinds (the `cpu_kind` fixture), so a green run on one kind of host means green on the other."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minisd
from minisd import precision
from minisd.cli import main
from minisd.precision import compute_choice, cpu_has_amx
from minisd.testing import random_state_dict
from minisd.safetensors_file import write_safetensors
from minisd.checkpoint import CONFIG_METADATA_KEY

DTYPE_OF_KIND = {"amx": torch.bfloat16, "no-amx": torch.float32}


def test_cpu_kind_decides_the_compute_precision(cpu_kind):
    assert cpu_has_amx() == (cpu_kind == "amx")
    choice = compute_choice("cpu")
    assert choice.dtype == DTYPE_OF_KIND[cpu_kind]
    assert ("has AMX" if cpu_kind == "amx" else "no AMX") in choice.reason
    assert compute_choice("cuda").dtype == torch.float16


@pytest.mark.parametrize("speedup, dtype", [(1.8, torch.bfloat16), (0.5, torch.float32), (1.1, torch.float32)])
def test_without_amx_bf16_is_chosen_where_it_measures_faster(monkeypatch, tmp_path, speedup, dtype):
    """No assumption set: the choice follows a bf16/fp32 matmul measurement, made once and remembered."""
    monkeypatch.delenv("MINISD_ASSUME_AMX")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: False)
    calls = []

    def seconds(d, **_):
        calls.append(d)
        return speedup if d == torch.float32 else 1.0
    monkeypatch.setattr(precision, "matmul_seconds", seconds)
    choice = compute_choice("cpu")
    assert choice.dtype == dtype and f"{speedup:.1f}" in choice.reason and "measured" in choice.reason
    assert choice.memory_format == (torch.channels_last if dtype == torch.bfloat16 else torch.contiguous_format)
    assert len(calls) == 2 and compute_choice("cpu").dtype == dtype and len(calls) == 2  # cached on disk
    assert list((tmp_path / "minisd").iterdir())
    assert 0.0 < precision.matmul_seconds(torch.float32, n=64, repeats=1) < 10


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_minisd_dtype_overrides_the_choice(cpu_kind, monkeypatch, tiny_checkpoint, name, dtype):
    monkeypatch.setenv("MINISD_DTYPE", name)
    assert compute_choice("cpu").dtype == dtype and "MINISD_DTYPE" in compute_choice("cpu").reason
    assert minisd.load(tiny_checkpoint).dtype == dtype
    # an explicit dtype still wins
    assert minisd.load(tiny_checkpoint, dtype=torch.float32).dtype == torch.float32


def test_loading_without_dtype_uses_the_cpu_kinds_choice(cpu_kind, tiny_checkpoint):
    sd = minisd.load(tiny_checkpoint)
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {DTYPE_OF_KIND[cpu_kind]}


def test_bad_overrides_are_one_line_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINISD_DTYPE", "fp8")
    assert main(["generate", "x", "--steps", "1", "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MINISD_DTYPE='fp8'" in err and "fp32, fp16, bf16" in err
    monkeypatch.delenv("MINISD_DTYPE")
    monkeypatch.setenv("MINISD_ASSUME_AMX", "yes")
    assert main(["generate", "x", "--steps", "1", "--outdir", str(tmp_path)]) == 2
    assert "MINISD_ASSUME_AMX='yes'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_convert_round_trip_is_bit_identical(cpu_kind, tmp_path, tiny_config, dtype, capsys):
    """file -> diffusers folder -> file, no --dtype: every tensor equal to the original, in its own precision."""
    state = {k: v.to(dtype) for k, v in random_state_dict(tiny_config, seed=3).items()}
    original = tmp_path / "x.safetensors"
    write_safetensors(state, original, {CONFIG_METADATA_KEY: tiny_config.to_json()})
    assert main(["convert", str(original), str(tmp_path / "y")]) == 0
    assert main(["convert", str(tmp_path / "y"), str(tmp_path / "z.safetensors")]) == 0
    back = load_file(str(tmp_path / "z.safetensors"))
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert set(back) == set(state) - {position_ids}
    for key, tensor in back.items():
        assert tensor.dtype == state[key].dtype and torch.equal(tensor, state[key]), key


def test_convert_with_dtype_casts(tmp_path, tiny_checkpoint):
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "h.safetensors"), "--dtype", "fp16"]) == 0
    original = load_file(str(tiny_checkpoint))
    for key, tensor in load_file(str(tmp_path / "h.safetensors")).items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, original[key].half()), key


def test_info_reports_stored_precision_and_the_machines_choice(cpu_kind, capsys):
    assert main(["info", "demo"]) == 0
    out = capsys.readouterr().out
    components = [line for line in out.splitlines() if line.split(":")[0] in ("unet", "vae", "text_encoder")]
    assert len(components) == 3 and all(line.endswith("float16 (stored)") for line in components), components
    compute = next(line for line in out.splitlines() if line.startswith("compute:"))
    assert compute.split()[1] == ("bf16" if cpu_kind == "amx" else "fp32")
    assert ("has AMX" if cpu_kind == "amx" else "no AMX") in compute


def test_generate_without_dtype_uses_the_cpu_kinds_choice(cpu_kind, tmp_path):
    """The image made without --dtype is the one made with the kind's precision named explicitly (and not the
    other kind's: bf16 and fp32 images of the demo model differ in some pixels)."""
    ours, other = ("bf16", "fp32") if cpu_kind == "amx" else ("fp32", "bf16")
    images = {}
    for label, flags in (("default", []), ("explicit", ["--dtype", ours]), ("other", ["--dtype", other])):
        out = tmp_path / f"{label}.png"
        assert main(["generate", "a red circle on the left, blue background", "--seed", "3", "--steps", "6",
                     "--quiet", "-o", str(out), *flags]) == 0
        images[label] = np.asarray(Image.open(out))
    assert np.array_equal(images["default"], images["explicit"])
    assert not np.array_equal(images["default"], images["other"])
