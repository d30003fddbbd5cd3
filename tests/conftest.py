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
# Hosts differ (some have AMX and compute in bf16 by default): the suite takes the no-AMX decisions on every host
# unless told otherwise (`MINISD_ASSUME_AMX=1 make test` takes the AMX ones), and tests that depend on the choice
# run under both through the `cpu_kind` fixture. A user's MINISD_DTYPE must not change what the tests see.
os.environ.setdefault("MINISD_ASSUME_AMX", "0")
os.environ.pop("MINISD_DTYPE", None)

from minisd.config import PRESETS, ModelConfig  # noqa: E402
from minisd.testing import write_checkpoint  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(params=["amx", "no-amx"])
def cpu_kind(request, monkeypatch) -> str:
    """Run a test under each CPU kind's precision decisions (also seen by the subprocesses it starts)."""
    monkeypatch.setenv("MINISD_ASSUME_AMX", "1" if request.param == "amx" else "0")
    return request.param


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    write_checkpoint(path, tiny_config, seed=1)
    return path
