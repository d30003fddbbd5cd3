"""Model hashes as A1111 shows them ("Model hash" in the PNG infotext): the SHA-256 of the file, its first
10 hex digits, and the legacy 8-digit hash; full hashes are cached by path, size and mtime, since hashing
a multi-GB checkpoint on every run costs seconds."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minisd" / "hashes.json"


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a whole file, read in chunks (constant memory for multi-GB checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def sha256_model(path: str | os.PathLike, use_cache: bool = True) -> str:
    """SHA-256 of a model file (of a diffusers folder: of its files in sorted order), cached."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = [[str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns]
             for f in files]
    cache = {}
    if use_cache:
        try:
            cache = json.loads(CACHE.read_text())
        except (OSError, ValueError):
            cache = {}
        entry = cache.get(str(path))
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
    if path.is_dir():
        digest = hashlib.sha256()
        for f in files:
            digest.update(bytes.fromhex(sha256_file(f)))
        value = digest.hexdigest()
    else:
        value = sha256_file(path)
    if use_cache:
        cache[str(path)] = {"stamp": stamp, "sha256": value}
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = CACHE.with_name(f".hashes-{os.getpid()}.json")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, CACHE)
        except OSError:
            pass  # a read-only home only costs the next run another hash
    return value


def a1111_short_hash(path: str | os.PathLike) -> str:
    """A1111's "Model hash" (the new one): first 10 hex digits of the file's SHA-256."""
    return sha256_model(path)[:10]


def model_hash_legacy(path: str | os.PathLike) -> str:
    """A1111's old model hash: first 8 hex digits of SHA-256 over the 64 KiB at offset 1 MiB
    (an empty read for files shorter than 1 MiB, as in A1111)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
