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

# Tied weights may share storage, but tensors together may not claim more than twice the file (plus 1 MiB).
MAX_VIEW_FACTOR, MAX_VIEW_SLACK = 2, 2**20
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
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {' '.join(str(e).split())})"[:400]
                              ) from None
    refused = [name for name in found if not BENIGN_GLOBALS.match(name)]
    if refused:
        raise CheckpointError(f"{path}: refused: the pickle would call {', '.join(refused)}, which is not a "
                              f"tensor or a plain container (only weights are loaded, never code)")
    stubs = [(InertStub, name) for name in found]
    try:
        with torch.serialization.safe_globals(stubs):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        reason = (str(e).strip().splitlines() or ["no reason given"])[-1]  # torch's last line names the global
        raise CheckpointError(f"{path}: refused by the restricted unpickler: {reason}"[:400]) from None
    except Exception as e:  # noqa: BLE001 - torch's unpickler fails on damaged data with whatever it hits:
        # IndexError on a stack underflow, TypeError on a call with wrong arguments, RuntimeError, EOFError ...
        reason = " ".join(str(e).split())  # one line, however torch formats it
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {reason})"[:400]) from None
    check_tensors(loaded, path, os.path.getsize(path))
    return loaded


def check_tensors(obj: object, path: str, file_size: int) -> None:
    """Refuse tensors that are not dense CPU arrays backed by the file, and views that together claim far more
    bytes than the file holds: a pickle can point any number of large (even zero-stride) tensors at one small
    storage, and converting them would allocate without bound."""
    total, seen, stack = 0, set(), [obj]
    while stack:  # iterative: the containers may nest deeply or hold themselves
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if item.layout != torch.strided or item.device.type != "cpu" or item.is_quantized:
                raise CheckpointError(f"{path}: holds a {str(item.layout).removeprefix('torch.')} tensor on "
                                      f"{item.device.type}; only dense weights are read")
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    if total > MAX_VIEW_FACTOR * file_size + MAX_VIEW_SLACK:
        raise CheckpointError(f"{path}: its tensors claim {total} bytes but the file holds {file_size}: tensors "
                              f"that overlap this much are refused (they would be copied out in full)")
