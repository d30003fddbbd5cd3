"""Loads k-diffusion's `sampling.py` and `external.py` as reference implementations without running the package
`__init__` (which imports torchvision and other packages the tests do not install)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

_PACKAGE = "_kdiffusion_reference"  # private name: never shadows a real `k_diffusion` import


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Stand-in for k_diffusion.utils.append_dims (the only utils function sampling/external need)."""
    if target_dims < x.ndim:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[_PACKAGE], name, module)
    return module


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external), or skip the test when k-diffusion is not installed."""
    if f"{_PACKAGE}.external" in sys.modules:
        return sys.modules[f"{_PACKAGE}.sampling"], sys.modules[f"{_PACKAGE}.external"]
    found = importlib.util.find_spec("k_diffusion")  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    pytest.importorskip("torchsde")
    pytest.importorskip("torchdiffeq")
    pytest.importorskip("scipy")
    root = Path(list(found.submodule_search_locations)[0])
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(root)]
    sys.modules[_PACKAGE] = package
    utils = types.ModuleType(f"{_PACKAGE}.utils")
    utils.append_dims = _append_dims
    sys.modules[utils.__name__] = utils
    package.utils = utils
    sampling = _load("sampling", root / "sampling.py")
    external = _load("external", root / "external.py")
    return sampling, external
