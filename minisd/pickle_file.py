"""Reading pickle-based PyTorch checkpoints (.ckpt/.pt/.bin) without executing code from them: PyTorch's
weights-only unpickler (tensors, storages, plain containers), with the harmless training-time objects that
real SD checkpoints carry (PyTorch-Lightning callbacks, numpy scalars) replaced by inert stubs."""
from __future__ import annotations

import os
import pickle
import re
import zipfile

import torch

from .errors import CheckpointError

# Globals that full SD training checkpoints contain next to the weights; they are never needed for
# inference, so each is replaced by `InertStub` instead of being imported.
BENIGN_GLOBALS = re.compile(
    r"^(pytorch_lightning|lightning\.pytorch|lightning_fabric)\.callbacks\.[\w.]+$"
    r"|^numpy(\._core|\.core)?\.multiarray\.scalar$|^numpy\.dtype$|^numpy\.dtypes\.\w+DType$")

CONVERT_HINT = "convert it once with `minisd convert FILE.ckpt FILE.safetensors` to avoid pickles altogether"


class InertStub:
    """Stands in for a benign training-time object: accepts any arguments and state, does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def read_pickle_checkpoint(path: str | os.PathLike) -> dict:
    """The object stored in a zip-format torch pickle, loaded with the restricted unpickler."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a zip-format PyTorch checkpoint (legacy or foreign pickles are "
                              f"refused because they cannot be loaded safely)")
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # a damaged archive: report, never guess
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    refused = [name for name in found if not BENIGN_GLOBALS.match(name)]
    if refused:
        raise CheckpointError(f"{path}: refused: the pickle would call {', '.join(refused)}, which is not a "
                              f"tensor or a plain container (only weights are loaded, never code)")
    stubs = [(InertStub, name) for name in found]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused by the restricted unpickler: {str(e).splitlines()[-1]}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from None
