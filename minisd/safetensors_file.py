"""Reading and writing the safetensors format (a JSON header, then raw little-endian tensor bytes) with
the header and every tensor's byte range checked against the real file before any tensor is touched."""
from __future__ import annotations

import errno
import json
import mmap
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20  # the format's own limit
MAX_DIMS = 16  # far above any weight's (torch itself refuses more than 64)


class SafetensorsFile:
    """A memory-mapped .safetensors file. `tensors()` are zero-copy views of the mapping (copy-on-write),
    so a tensor costs memory only once it is read; `release(name)` drops its pages after a cast."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, too short)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(f"{self.path}: truncated or not a safetensors file "
                                      f"(header claims {header_len} bytes, file has {size})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # deep nesting recurses
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors metadata (not a map of strings to strings)")
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + header_len
        data_len = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype, shape, (begin, end) = self._entry(name, info)
            numel, extent = 1, 1
            for dim in shape:
                numel, extent = numel * dim, extent * max(dim, 1)
            if extent >= 2**62:  # strides would overflow, even of an empty tensor
                raise CheckpointError(f"{self.path}: corrupt: tensor {name!r} has shape {list(shape)}")
            if not 0 <= begin <= end <= data_len:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} lies at bytes {begin}–{end} "
                                      f"of the data, but the file holds only {data_len}")
            if end - begin != numel * dtype.itemsize:
                raise CheckpointError(f"{self.path}: corrupt: tensor {name!r} of shape {list(shape)} "
                                      f"needs {numel * dtype.itemsize} bytes, the header gives {end - begin}")
            self.entries[name] = (dtype, shape, begin, end)
        # Tensors may not share bytes (as the format requires): otherwise a small file could declare any number
        # of full-size tensors, and loading would allocate far more than the file holds.
        previous_end, previous = 0, None
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda item: item[1][2:]):
            if begin < previous_end and begin != end:
                raise CheckpointError(f"{self.path}: corrupt: tensors {previous!r} and {name!r} overlap in the file")
            if end > previous_end:
                previous_end, previous = end, name
        self._map = None
        if size > self.data_start:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._base = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr()

    def _entry(self, name: str, info: object) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
        """dtype, shape and data offsets of one header entry, each of its JSON type (ints, not floats or bools)."""
        def whole(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in DTYPES:
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if isinstance(shape, list) and len(shape) <= MAX_DIMS and all(whole(d) and d >= 0 for d in shape) \
                    and isinstance(offsets, list) and len(offsets) == 2 and all(whole(o) for o in offsets):
                return DTYPES[info["dtype"]], tuple(shape), (offsets[0], offsets[1])
        raise CheckpointError(f"{self.path}: corrupt safetensors entry for {name!r}")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (dtype, shape, begin, end) in self.entries.items():
            if begin == end:
                out[name] = torch.empty(shape, dtype=dtype)
            else:
                flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                        offset=self.data_start + begin)
                out[name] = flat.view(shape)
        return out

    def release(self, tensor: torch.Tensor) -> None:
        """Give the file pages behind `tensor` (one of `tensors()`) back to the OS once it has been copied
        or cast, so that loading an fp16 file into fp32 does not also keep the whole file resident."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED") or tensor.numel() == 0:
            return
        offset = tensor.data_ptr() - self._base
        if not 0 <= offset < len(self._map):
            return
        page = mmap.PAGESIZE
        start = (offset + page - 1) // page * page
        stop = (offset + tensor.numel() * tensor.element_size()) // page * page
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` completely or not at all: a temporary file beside `path`, hard-linked into place, which
    fails (FileExistsError) rather than replace an existing file. A full disk, a file-size limit or a read-only
    folder is an OSError naming `path` (the Rust writer's own error type is not one), and leaves no file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            # `metadata or None`: safetensors 0.8 writes `{},"__metadata__":{}}`, not JSON, for no tensors and {}
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata=metadata or None)
        except SafetensorError as e:  # "... I/O error: No space left on device (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(path)) from None
        except OSError:  # a file system without hard links: check, then rename (a narrow race, never a partial file)
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(path)) from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
