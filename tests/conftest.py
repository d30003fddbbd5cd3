"""Shared fixtures: tiny random-weight checkpoints in the original layout (the builders live in
minisd.testing, which the benchmarks share)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Keep the model-hash cache of test runs (and their subprocesses) out of the user's home.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="minisd-test-cache-")

from minisd.config import PRESETS, ModelConfig  # noqa: E402
from minisd.testing import write_checkpoint  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    write_checkpoint(path, tiny_config, seed=1)
    return path
