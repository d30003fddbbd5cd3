"""The checkpoints a server may load: the startup model plus the files in --models-dir, named and hashed as
A1111 lists them ("<file> [<short hash>]"); a name outside this catalog can never reach the loader."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import resolve_source
from ..errors import ParameterError
from ..hashes import sha256_model

MODEL_SUFFIXES = (".safetensors", ".ckpt")


class UnknownModelError(ParameterError):
    """A model name that is not in the catalog (an HTTP 404)."""


@dataclass(frozen=True)
class ModelEntry:
    name: str   # the file name relative to --models-dir (A1111's "name"), or the startup model's file name
    path: Path

    @property
    def model_name(self) -> str:
        return Path(self.name).with_suffix("").as_posix() if self.path.is_file() else self.name

    @property
    def sha256(self) -> str:
        return sha256_model(self.path)

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]"

    def a1111(self) -> dict:
        """This model as an item of A1111's GET /sdapi/v1/sd-models."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.short_hash,
                "sha256": self.sha256, "filename": str(self.path), "config": None}


class ModelCatalog:
    """Lists the loadable models and keeps up to `keep_loaded` of them in memory (least recently used out)."""

    def __init__(self, model: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                 loader: Callable[[Path], object] | None = None, keep_loaded: int = 1):
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise ParameterError(f"{models_dir}: models directory not found")
        self.startup = None
        if model:
            path = Path(resolve_source(model)).resolve()
            inside = self.models_dir is not None and path.is_relative_to(self.models_dir)
            self.startup = ModelEntry(path.relative_to(self.models_dir).as_posix() if inside else path.name, path)
        if self.startup is None and not self.entries():
            raise ParameterError("no model: give --model or a --models-dir holding .safetensors/.ckpt files")
        self.loader = loader or _default_loader
        self.keep_loaded = max(1, keep_loaded)
        self._loaded: OrderedDict[Path, object] = OrderedDict()
        self._lock = threading.Lock()
        self.current = self.startup or self.entries()[0]

    def entries(self) -> list[ModelEntry]:
        """The startup model (first, when it is not in --models-dir), then the files of --models-dir, sorted."""
        found = []
        if self.models_dir is not None:
            for path in sorted(self.models_dir.rglob("*")):
                if path.suffix in MODEL_SUFFIXES and path.is_file():
                    found.append(ModelEntry(path.relative_to(self.models_dir).as_posix(), path.resolve()))
        if self.startup is not None and self.startup.path not in {e.path for e in found}:
            found.insert(0, self.startup)
        return found

    def find(self, name: str) -> ModelEntry:
        """The entry a client means by `name`: its title, file name, model name, short hash or sha256."""
        name = str(name).strip()
        for entry in self.entries():
            if name in (entry.title, entry.name, entry.model_name):
                return entry
        for entry in self.entries():  # hashing is costly: only when no name matched
            if name and name.lower() in (entry.short_hash, entry.sha256):
                return entry
        raise UnknownModelError(f"model {name!r} not found; available: "
                                + ", ".join(e.title for e in self.entries()))

    def loaded(self, entry: ModelEntry | None = None):
        """The model for `entry` (default: the current one) if it is in memory, else None."""
        with self._lock:
            return self._loaded.get((entry or self.current).path)

    def get(self, entry: ModelEntry | None = None):
        """The loaded model for `entry` (default: the current one), loading it if needed."""
        entry = entry or self.current
        with self._lock:
            if entry.path in self._loaded:
                self._loaded.move_to_end(entry.path)
                return self._loaded[entry.path]
            while len(self._loaded) >= self.keep_loaded:
                self._loaded.popitem(last=False)
            model = self.loader(entry.path)
            self._loaded[entry.path] = model
            return model


def _default_loader(path: Path):
    from ..pipeline import load
    return load(path)


def loader_for(device: str | None = None, dtype: torch.dtype | None = None,
               taesd: str | os.PathLike | None = None) -> Callable[[Path], object]:
    """A loader with a fixed device and precision; `taesd`: a TAESD file every model gets for its live previews."""
    def load_model(path: Path):
        from ..pipeline import load
        sd = load(path, device=device, dtype=dtype)
        if taesd is not None:
            sd.load_taesd(taesd, decode=False)
        return sd
    return load_model
