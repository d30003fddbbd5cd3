"""Fuzz target: init images and masks (any format PIL opens) through `load_image`, `pil_to_tensor`, the resize
modes and `load_mask` (alpha rules, invert, blur). The first input byte picks the options, the rest is the file.
Invariant: tensors in range, or a ParameterError, within the time and memory bounds (pixel limit first)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fuzz import harness  # noqa: E402

from PIL import Image  # noqa: E402

with harness.instrumented(__name__ == "__main__"):
    from minisd.errors import ParameterError
    from minisd.image import RESIZE_MODES, load_image, load_mask, pil_to_tensor, resize_image

MAX_PIXELS = 2**18  # the fuzzer's pixel limit (the default is 8192²): decoding stays fast and small


def check(data: bytes) -> None:
    options, body = (data[0], data[1:]) if data else (0, b"")
    with harness.input_file(body) as path:
        image = load_image(path, max_pixels=MAX_PIXELS)
    mode = RESIZE_MODES[options % 3]
    x = pil_to_tensor(resize_image(image, 16, 24, mode))
    assert x.shape == (1, 3, 24, 16) and x.min() >= -1 and x.max() <= 1
    mask = load_mask(image, 16, 24, resize_mode=mode, blur=(options >> 2) % 4 * 1.5, invert=bool(options & 0x80))
    assert mask.shape == (1, 1, 24, 16) and mask.min() >= 0 and mask.max() <= 1


def seeds() -> dict[str, bytes]:
    out = {}
    images = {"rgb": Image.new("RGB", (9, 7), (10, 200, 30)), "rgba": Image.new("RGBA", (5, 6), (0, 0, 0, 100)),
              "la": Image.new("LA", (4, 4), (255, 0)), "palette": Image.new("P", (3, 8), 2),
              "grey16": Image.new("I;16", (4, 3), 3000), "bw": Image.new("1", (8, 2), 1)}
    images["palette"].info["transparency"] = 2
    for name, image in images.items():
        for fmt in ("PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG"):
            buffer = io.BytesIO()
            try:
                image.save(buffer, format=fmt)
            except (OSError, ValueError, KeyError):
                continue  # a mode this format cannot store
            out[f"{name}-{fmt.lower()}"] = bytes([len(out) % 256]) + buffer.getvalue()
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate
    Image.new("RGB", (4, 2), "red").save(rotated, format="JPEG", exif=exif)
    out["jpeg-exif-rotated"] = b"\x01" + rotated.getvalue()
    return out


TARGET = harness.Target(name="image", check=check, allowed=(ParameterError,), seeds=seeds,
                        modules=("minisd/image.py",), memory_per_byte=64,
                        dictionary=[b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"GIF89a", b"BM", b"II*\x00", b"RIFF",
                                    b"WEBPVP8", b"\xff\xd8\xff", b"\xff\xe1", b"Exif\x00\x00"])

if __name__ == "__main__":
    harness.main(TARGET)
