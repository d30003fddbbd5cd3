"""torch.compile for generation: static shapes and frozen weights (inductor folds them into the graph and
prepacks them for oneDNN), with inductor's FX graph cache on disk under the user's cache folder, so that the
one-time compilation is paid once per machine, model and image size, not once per process."""
from __future__ import annotations

import os
from pathlib import Path

import torch

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own variable: a user's setting wins


def compile_cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR if set, else $XDG_CACHE_HOME/minisd/inductor (~/.cache/minisd/inductor)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minisd" / "inductor"


def configure_inductor(freezing: bool = True) -> Path:
    """Point inductor's caches at `compile_cache_dir()` and turn on its FX graph cache and (for inference)
    freezing; returns the cache folder. Process-wide: inductor reads these when it compiles."""
    import torch._inductor.config as inductor

    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(folder)
    inductor.fx_graph_cache = True
    inductor.freezing = freezing
    return folder


def compile_module(module: torch.nn.Module, freezing: bool = True, **options) -> torch.nn.Module:
    """Compile `module` in place (`nn.Module.compile`: its names, parameters and submodules stay as they are)
    with static shapes unless `options` say otherwise. With `freezing` the weights are constants of the compiled
    graph: changing them afterwards (merging a LoRA) needs a new compile, so load those first."""
    configure_inductor(freezing)
    module.compile(**{"dynamic": False, **options})
    return module
