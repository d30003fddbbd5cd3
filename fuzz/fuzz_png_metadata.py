"""Fuzz target: image files (PNG text chunks, JPEG/WebP EXIF UserComment) through `read_infotext`, as
`minisd pnginfo` and `--from-image` read them. Invariant: the infotext (or None), or a ParameterError, within
the time and memory bounds; images declaring more than the pixel limit are refused before decoding."""
from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fuzz import harness  # noqa: E402

from PIL import Image  # noqa: E402

with harness.instrumented(__name__ == "__main__"):
    from minisd.errors import ParameterError
    from minisd.image import read_infotext, save_png
    from minisd.params import GenerationParams

MAX_PIXELS = 2**20  # the fuzzer's pixel limit (the default is 8192²): decoding stays fast and small


def check(data: bytes) -> None:
    with harness.input_file(data) as path:
        text = read_infotext(path, max_pixels=MAX_PIXELS)
    if text is not None:
        GenerationParams.from_infotext(text)


def seeds() -> dict[str, bytes]:
    import tempfile

    out = {}
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("latin1", "a red circle\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 8x8"),
                           ("itxt", "ünïcödé 🎨\nNegative prompt: x\nSteps: 5, Seed: 2, Size: 8x8"),
                           ("none", None)):
            out[f"png-{name}"] = save_png(image, Path(tmp) / f"{name}.png", text).read_bytes()
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + "a cat\nSteps: 20, Seed: 3, Size: 8x8".encode("utf-16-be")
    for fmt in ("JPEG", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, exif=exif)
        out[f"{fmt.lower()}-usercomment"] = buffer.getvalue()
    big = io.BytesIO()
    Image.new("1", (4096, 4096)).save(big, format="PNG")  # 16 MP declared in a few KB: over the fuzz limit
    out["png-over-limit"] = big.getvalue()
    return out


TARGET = harness.Target(name="png_metadata", check=check, allowed=(ParameterError,), seeds=seeds,
                        modules=("minisd/image.py",), memory_per_byte=64,
                        dictionary=[b"tEXt", b"iTXt", b"zTXt", b"IHDR", b"IDAT", b"IEND", b"parameters\x00",
                                    b"UNICODE\x00", b"ASCII\x00\x00\x00", b"Exif\x00\x00", b"\xff\xe1"])

if __name__ == "__main__":
    harness.main(TARGET)
