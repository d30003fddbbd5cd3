"""Model hashes equal SHA-256 computed independently, and the cache is keyed by size and mtime."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from minisd import hashes
from minisd.hashes import a1111_short_hash, model_hash_legacy, sha256_file, sha256_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hashes, "CACHE", tmp_path / "cache" / "hashes.json")


def test_hashes(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 0x100000 + 0x10000 + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    full = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == full and sha256_file(path, chunk_size=4096) == full
    assert a1111_short_hash(path) == full[:10]
    assert model_hash_legacy(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    small = tmp_path / "small.ckpt"
    small.write_bytes(b"abc")
    assert model_hash_legacy(small) == "e3b0c442"  # sha256 of the empty read past the end
    assert a1111_short_hash(small) == hashlib.sha256(b"abc").hexdigest()[:10]


def test_cache_follows_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"first")
    assert sha256_model(path) == hashlib.sha256(b"first").hexdigest()
    assert hashes.CACHE.exists()
    path.write_bytes(b"second!")
    os.utime(path, ns=(1, 1))
    assert sha256_model(path) == hashlib.sha256(b"second!").hexdigest()
