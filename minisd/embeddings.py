"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors from A1111 .pt (`string_to_param`) and
.safetensors (`emb_params`), diffusers `learned_embeds` files and SDXL files (`clip_l`/`clip_g`). A prompt names
one by its file name, as in A1111; its n vectors then fill n token slots of the chunk."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import CheckpointError, ParameterError

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
# SDXL files hold one set of vectors per text encoder; their widths tell the encoders apart.
SDXL_KEYS = ("clip_l", "clip_g")


class EmbeddingError(CheckpointError):
    """An embedding file that cannot be read or does not fit the model."""


@dataclass
class Embedding:
    """One textual inversion: `vectors` (n, width) for the first text encoder, and the vectors by encoder
    ("clip_l", "clip_g" in SDXL files; "" in single-encoder files)."""
    name: str
    vectors: torch.Tensor
    by_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    def vectors_for(self, width: int, encoder: str = "") -> torch.Tensor:
        """The vectors for a text encoder of `width` (named "clip_l"/"clip_g" in SDXL): its own if the file names
        it, else the file's vectors of that width."""
        found = self.by_encoder.get(encoder)
        if found is None or found.shape[1] != width:
            found = next((v for v in self.by_encoder.values() if v.shape[1] == width), None)
        if found is None:
            widths = ", ".join(str(v.shape[1]) for v in self.by_encoder.values())
            raise ParameterError(f"embedding {self.name!r} has vectors of width {widths}, but this text encoder "
                                 f"takes {width} (an embedding for another model)")
        return found


def _as_vectors(tensor: object, path: Path, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() not in (1, 2):
        raise EmbeddingError(f"{path}: {what} is not a float tensor of shape (vectors, width)")
    vectors = tensor.detach().float()
    vectors = vectors.unsqueeze(0) if vectors.dim() == 1 else vectors
    if vectors.shape[0] == 0 or not torch.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: {what} is empty or holds NaN/Inf values")
    return vectors


def embedding_from_state(state: object, path: Path, name: str) -> Embedding:
    """An `Embedding` from a file's contents in any of the known layouts."""
    if isinstance(state, torch.Tensor):  # a bare tensor (diffusers accepts these too)
        vectors = {"": _as_vectors(state, path, "the tensor")}
    elif not isinstance(state, dict) or not state:
        raise EmbeddingError(f"{path}: not a textual-inversion embedding (no tensors)")
    elif "string_to_param" in state:  # A1111 .pt: {"string_to_param": {"*": (n, width)}, "name": ..., ...}
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param should hold one tensor")
        vectors = {"": _as_vectors(next(iter(params.values())), path, "string_to_param")}
    elif "emb_params" in state:  # A1111 .safetensors
        vectors = {"": _as_vectors(state["emb_params"], path, "emb_params")}
    elif any(key in state for key in SDXL_KEYS):  # SDXL: one set per encoder
        vectors = {key: _as_vectors(state[key], path, key) for key in SDXL_KEYS if key in state}
    elif len(state) == 1:  # diffusers learned_embeds: {"<token>": (width,) or (n, width)}
        key, value = next(iter(state.items()))
        vectors = {"": _as_vectors(value, path, repr(key))}
    else:
        raise EmbeddingError(f"{path}: not a textual-inversion embedding (keys {', '.join(map(str, list(state)[:4]))})")
    counts = {v.shape[0] for v in vectors.values()}
    if len(counts) != 1:
        raise EmbeddingError(f"{path}: its text encoders' vector counts differ ({sorted(counts)})")
    return Embedding(name, next(iter(vectors.values())), vectors, path)


def read_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """Read one embedding file (.safetensors, or a zip pickle through the restricted unpickler)."""
    from .pickle_file import read_pickle_checkpoint
    from .safetensors_file import SafetensorsFile

    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        state = read_pickle_checkpoint(path)
    elif head[:1] == b"\x80":
        raise EmbeddingError(f"{path}: a legacy (non-zip) pickle, refused because it cannot be loaded safely")
    else:
        state = {k: v.clone() for k, v in SafetensorsFile(path).tensors().items()}
    return embedding_from_state(state, path, name or path.stem)


class EmbeddingDatabase:
    """The embeddings of some folders, found in prompts by their names' token ids (A1111's rule: the longest
    name that starts at a position wins). Files are read when a prompt first uses them."""

    def __init__(self, tokenizer, directories: Iterable[str | os.PathLike] = (), files: Sequence[Embedding] = ()):
        self.tokenizer = tokenizer
        self.paths: dict[str, Path] = {}
        for directory in directories:
            directory = Path(directory)
            if not directory.is_dir():
                raise ParameterError(f"{directory}: embeddings directory not found")
            for path in sorted(directory.rglob("*")):
                if path.suffix in EMBEDDING_SUFFIXES and path.is_file():
                    self.paths.setdefault(path.stem, path)
        self.loaded: dict[str, Embedding] = {e.name: e for e in files}
        self.used: dict[str, Embedding] = {}
        self._by_first_id: dict[int, list[tuple[list[int], str]]] = {}
        for name in {*self.paths, *self.loaded}:
            ids = tokenizer.encode(name, add_special_tokens=False)
            if ids:
                self._by_first_id.setdefault(ids[0], []).append((ids, name))
        for candidates in self._by_first_id.values():
            candidates.sort(key=lambda item: -len(item[0]))

    def add(self, embedding: Embedding) -> None:
        """Register an embedding read elsewhere, under its name."""
        self.loaded[embedding.name] = embedding
        ids = self.tokenizer.encode(embedding.name, add_special_tokens=False)
        candidates = self._by_first_id.setdefault(ids[0], [])
        candidates.append((ids, embedding.name))
        candidates.sort(key=lambda item: -len(item[0]))

    def get(self, name: str) -> Embedding:
        if name not in self.loaded:
            self.loaded[name] = read_embedding(self.paths[name], name)
        return self.loaded[name]

    def find(self, ids: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's ids start at `ids[position]`, and how many ids the name spans."""
        for name_ids, name in self._by_first_id.get(ids[position], ()):
            if list(ids[position:position + len(name_ids)]) == name_ids:
                embedding = self.get(name)
                self.used[name] = embedding
                return embedding, len(name_ids)
        return None

    def infotext(self) -> dict[str, str]:
        """A1111's "TI hashes" field for the embeddings the last prompts used: "name: short hash, ..."."""
        from .hashes import sha256_model

        named = [f"{name}: {sha256_model(e.path)[:12]}" for name, e in sorted(self.used.items()) if e.path]
        return {"TI hashes": ", ".join(named)} if named else {}
