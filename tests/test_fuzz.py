"""Hostile input: every fuzz target's corpus (seeds, what fuzzing kept, the inputs of fixed crashes) replayed under
the fuzz invariant, a short fixed-seed mutation burst per target, one real atheris run, and the bounds that the
fuzzers rely on (config limits, tensor byte ranges, the pixel limit) checked directly."""
from __future__ import annotations

import importlib
import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz import harness  # noqa: E402
from fuzz.run import TARGETS  # noqa: E402

import minisd  # noqa: E402
from minisd import CheckpointError, ParameterError  # noqa: E402
from minisd.config import PRESETS  # noqa: E402


# Pillow warns about the damaged files it reads (e.g. TIFF tags that point past the end), which are the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")


def target(name: str) -> harness.Target:
    return importlib.import_module(f"fuzz.fuzz_{name}").TARGET


@pytest.mark.parametrize("name", TARGETS)
def test_corpus_keeps_the_invariant(name):
    """Every stored input returns or raises a documented error, within the CPU-time and memory bounds."""
    t = target(name)
    inputs = harness.corpus_inputs(t)
    assert len(inputs) >= 5, f"{name}: seed corpus missing (python fuzz/fuzz_{name}.py --make-seeds)"
    for path in inputs:
        harness.check_input(t, path.read_bytes())


@pytest.mark.parametrize("name", TARGETS)
def test_fixed_seed_mutation_burst(name):
    """40 mutants of the corpus (the targets' own structure-aware mutators, or byte edits), seeded: the same
    inputs on every run."""
    t = target(name)
    rng = random.Random(19)
    corpus = [p.read_bytes() for p in harness.corpus_inputs(t)]
    for i in range(40):
        data = rng.choice(corpus)
        seed = rng.randrange(2**32)
        mutant = t.mutate(data, 2 * len(data) + 64, seed) if t.mutate and i % 2 else \
            harness.byte_mutate(data + seed.to_bytes(4, "little"), 2 * len(data) + 64)
        harness.check_input(t, mutant)


def test_atheris_runs_a_target(tmp_path):
    """The `make fuzz` path: atheris instruments minisd and runs libFuzzer on a target with a fixed seed."""
    pytest.importorskip("atheris")
    result = subprocess.run([sys.executable, str(ROOT / "fuzz" / "fuzz_infotext.py"), "-runs=300", "-seed=1",
                             str(tmp_path), str(target("infotext").corpus)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 300 runs" in result.stderr


def test_the_invariant_catches_what_it_should():
    """The harness itself: an escaped exception, a forbidden audit event and a blown memory bound all fail."""
    def escapes(data):
        raise KeyError("x")

    def spawns(data):
        import os
        os.system("true")

    for check in (escapes, spawns):
        t = harness.Target(name=check.__name__, check=check, allowed=(CheckpointError,), seeds=dict)
        with pytest.raises(harness.InvariantViolation):
            harness.check_input(t, b"x")
    # The memory bound in a fresh process, as the fuzzer runs it: in this one, earlier tests (and minisd.load's
    # malloc setting, which keeps freed memory) may leave enough resident memory for 400 MiB to fit unnoticed.
    allocates = ("import torch\nfrom fuzz import harness\nfrom minisd import CheckpointError\n"
                 "t = harness.Target(name='allocates', check=lambda d: torch.ones(400 * 2**20, dtype=torch.uint8),"
                 " allowed=(CheckpointError,), seeds=dict)\n"
                 "try:\n    harness.check_input(t, b'x')\nexcept harness.InvariantViolation as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", allocates], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "peak memory grew" in result.stdout or "allocate beyond the bound" in result.stdout, result


# ---- loader bounds ------------------------------------------------------------------------------------------

def raw_safetensors(path: Path, header: dict, body: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


# The escapes of issue 19's mutation run (json.JSONDecodeError, AttributeError from `minisd_config`), and
# neighbours: every one must be a one-line CheckpointError.
BAD_CONFIGS = {
    "not json": "{not json",
    "section not an object": json.dumps({"unet": 3}),
    "not an object": "[1, 2]",
    "wrong type": json.dumps({"unet": {"channel_mult": [1, "2"]}}),
    "huge": json.dumps({"unet": {"num_res_blocks": 10**9}}),
    "nested": "[" * 100_000,
    "groups": json.dumps({"unet": {"norm_groups": 7}}),
    "unknown variant": json.dumps({"variant": "sd9"}),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_recorded_config_is_a_checkpoint_error(tmp_path, case):
    path = raw_safetensors(tmp_path / "m.safetensors", {"__metadata__": {"minisd_config": BAD_CONFIGS[case]}})
    with pytest.raises(CheckpointError) as info:
        minisd.load(path, dtype=torch.float32)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_recorded_config_through_minisd_info(tmp_path):
    """`minisd info` printed a 22-28 line traceback on these: now one line and exit code 2."""
    path = raw_safetensors(tmp_path / "m.safetensors", {"__metadata__": {"minisd_config": "{not json"}})
    result = subprocess.run([sys.executable, "-m", "minisd", "info", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "not valid JSON" in result.stderr


def test_one_terabyte_tensor_is_refused_before_allocating(tmp_path):
    path = raw_safetensors(tmp_path / "big.safetensors",
                           {"w": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}, b"\0" * 64)
    t = harness.Target(name="1tb", check=lambda data: minisd.load(path), allowed=(CheckpointError,), seeds=dict)
    harness.check_input(t, b"")  # no MemoryError, no growth beyond the bound
    with pytest.raises(CheckpointError, match="truncated"):
        minisd.load(path)


@pytest.mark.parametrize("entry, phrase", [
    ({"dtype": "F32", "shape": [2.0, 1.0], "data_offsets": [0, 8]}, "corrupt safetensors entry"),
    ({"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}, "corrupt safetensors entry"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "corrupt safetensors entry"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "corrupt safetensors entry"),
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "corrupt safetensors entry"),
    ({"dtype": "F32", "shape": [0, 2**62, 4], "data_offsets": [0, 0]}, "has shape"),
])
def test_malformed_safetensors_entries(tmp_path, entry, phrase):
    path = raw_safetensors(tmp_path / "m.safetensors", {"w": entry}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=phrase):
        minisd.load(path)


def test_overlapping_tensors_are_refused(tmp_path):
    """Two names for the same bytes would let a small file claim any amount of memory once converted."""
    header = {f"w{i}": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]} for i in range(3)}
    path = raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError, match="overlap"):
        minisd.load(path)


def test_metadata_must_map_strings_to_strings(tmp_path):
    path = raw_safetensors(tmp_path / "m.safetensors", {"__metadata__": "minisd_config"})
    with pytest.raises(CheckpointError, match="metadata"):
        minisd.load(path)


def test_pickle_views_claiming_more_than_the_file_are_refused(tmp_path):
    """Zero-stride views of one 4-byte storage: 16 MiB of "weights" in a 2 KB file."""
    base = torch.arange(4, dtype=torch.float32)
    torch.save({f"w{i}": base[:1].expand(2**20) for i in range(4)}, tmp_path / "views.ckpt")
    with pytest.raises(CheckpointError, match="claim"):
        minisd.load(tmp_path / "views.ckpt")


def test_pickle_holding_itself_is_refused_without_hanging(tmp_path):
    looped: dict = {}
    looped["state_dict"] = looped
    torch.save(looped, tmp_path / "loop.ckpt")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        minisd.load(tmp_path / "loop.ckpt")


# ---- config limits ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_pass_the_limits_and_the_tensor_count_is_a_lower_bound(name):
    """Every real configuration is accepted, and `min_tensor_counts` never asks more than the networks have."""
    from minisd.config_limits import check_config, config_from_json, min_tensor_counts
    from minisd.models.clip import CLIPTextModel
    from minisd.models.unet import UNetModel
    from minisd.models.vae import AutoencoderKL

    config = PRESETS[name]
    assert check_config(config, name) is config
    assert config_from_json(config.to_json(), name) == config
    with torch.device("meta"):
        counts = {"unet": len(UNetModel(config.unet).state_dict()), "vae": len(AutoencoderKL(config.vae).state_dict()),
                  "text encoder": len(CLIPTextModel(config.text).state_dict()) if config.text else 0}
        if getattr(config, "open_clip", None) is not None:
            from minisd.models.open_clip import OpenCLIPTextModel
            counts["text encoder"] += len(OpenCLIPTextModel(config.open_clip).state_dict())
    needed = min_tensor_counts(config)
    assert all(counts[k] >= needed[k] for k in needed), (counts, needed)


def test_a_config_bigger_than_the_file_is_refused_before_building(tmp_path):
    """A 60-byte header asking for 64-deep transformers on 8 levels: refused by tensor count, in milliseconds."""
    config = PRESETS["sd1"]
    raw = json.loads(config.to_json())
    raw["unet"] |= {"channel_mult": [1] * 8, "attention_levels": list(range(8)), "transformer_depth": 64,
                    "num_res_blocks": 8}
    path = raw_safetensors(tmp_path / "m.safetensors", {"__metadata__": {"minisd_config": json.dumps(raw)}})
    t = harness.Target(name="big-config", check=lambda data: minisd.load(path), allowed=(CheckpointError,),
                       seeds=dict, time_limit=2.0)
    harness.check_input(t, b"")
    with pytest.raises(CheckpointError, match="needs at least"):
        minisd.load(path)


# ---- images -------------------------------------------------------------------------------------------------

def declared_size_png(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose header declares width×height (its pixel data is one short row)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [20_000, 9000])  # over PIL's own bomb limit, and over only ours
def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, side):
    from minisd.image import load_image, read_infotext

    path = declared_size_png(tmp_path / "bomb.png", side, side)
    for read in (load_image, read_infotext):
        t = harness.Target(name="bomb", check=lambda data: read(path), allowed=(ParameterError,), seeds=dict)
        harness.check_input(t, b"")  # well under the 400 MB that decoding would take
        with pytest.raises(ParameterError, match="more pixels than minisd decodes"):
            read(path)


def test_pixel_limit_through_the_cli(tmp_path):
    path = declared_size_png(tmp_path / "bomb.png", 20_000, 20_000)
    result = subprocess.run([sys.executable, "-m", "minisd", "pnginfo", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "more pixels than minisd decodes" in result.stderr
