"""Fuzz target: pickle checkpoints (.ckpt: torch's zip format, and legacy pickles) through the restricted
unpickler and the loader. Invariant: a model or a CheckpointError, within the time and memory bounds, and no
code from the file ever runs (the harness watches for process, library and socket audit events).
Run: `python fuzz/fuzz_pickle.py [libFuzzer flags] fuzz/corpus/pickle`."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fuzz import harness, mutators  # noqa: E402

import torch  # noqa: E402  (imported before instrumentation: only minisd is instrumented)

with harness.instrumented(__name__ == "__main__"):
    from minisd.checkpoint import load_components
    from minisd.errors import CheckpointError

from fuzz.fuzz_safetensors import MICRO  # noqa: E402


def check(data: bytes) -> None:
    with harness.input_file(data, ".ckpt") as path:
        load_components(path, device="cpu", dtype=torch.float32, config=MICRO)


class RunsCode:
    """Pickles to a call of os.system (of the no-op `true`): loading it must be refused, never run."""

    def __reduce__(self):
        import os
        return os.system, ("true",)


def _lightning_callback():
    """An object of a class named like PyTorch-Lightning's ModelCheckpoint, as real SD .ckpt files carry."""
    import types
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = 0.5

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    return module, ModelCheckpoint()


def seeds() -> dict[str, bytes]:
    import io
    import types
    from unittest import mock

    import numpy as np

    from minisd.testing import random_state_dict

    def saved(obj, **options) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer, **options)
        return buffer.getvalue()

    state = random_state_dict(MICRO, seed=3, dtype=torch.float16)
    module, callback = _lightning_callback()
    fake = {"pytorch_lightning": types.ModuleType("pytorch_lightning"),
            "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"), module.__name__: module}
    with mock.patch.dict(sys.modules, fake):
        full = saved({"state_dict": state, "global_step": np.int64(470000), "epoch": 6,
                      "callbacks": {type(callback): {"best": callback}}})
    looped: dict = {}
    looped["state_dict"] = looped
    base = torch.arange(4, dtype=torch.float32)
    return {
        "micro-ckpt": full,
        "micro-bare": saved(dict(list(state.items())[:40])),
        "runs-code": saved({"state_dict": {"w": torch.ones(1)}, "x": RunsCode()}),
        "legacy": saved({"w": torch.ones(2)}, _use_new_zipfile_serialization=False),
        "self-loop": saved(looped),
        "int-keys": saved({1: torch.ones(2)}),
        "sparse": saved({"w": torch.eye(3).to_sparse()}),
        "meta": saved({"w": torch.empty(10**6, device="meta")}),
        "zero-stride": saved({f"w{i}": base[:1].expand(2**20) for i in range(4)}),
        "nested": saved([[[{"w": torch.ones(1)}]]]),
        "dtypes": saved({"bf16": torch.ones(2, dtype=torch.bfloat16), "i64": torch.arange(3),
                         "bool": torch.tensor([True]), "f64": torch.ones(1, dtype=torch.float64)}),
    }


TARGET = harness.Target(
    name="pickle", check=check, allowed=(CheckpointError,), seeds=seeds,
    modules=("minisd/pickle_file.py", "minisd/checkpoint.py"),
    mutate=lambda data, max_size, seed: mutators.mutate_torch_zip(data, max_size, seed, harness.byte_mutate),
    dictionary=mutators.PICKLE_TOKENS + [b"archive/data.pkl", b"archive/data/0", b"PK\x03\x04"])

if __name__ == "__main__":
    harness.main(TARGET)
