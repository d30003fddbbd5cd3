"""Fuzz target: images sent to the A1111-compatible server (base64 in JSON) through `decode_image`.
Invariant: a PIL image or the server's ApiError (a 4xx answer), within the time and memory bounds."""
from __future__ import annotations

import base64
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fuzz import harness  # noqa: E402

with harness.instrumented(__name__ == "__main__"):
    from minisd.server.a1111 import MAX_IMAGE_PIXELS, ApiError, decode_image

from fuzz.fuzz_image import seeds as image_seeds  # noqa: E402


def check(data: bytes) -> None:
    decode_image(base64.b64encode(data).decode(), "init_images[0]")


def seeds() -> dict[str, bytes]:
    return {name: data[1:] for name, data in image_seeds().items()}


# A few bytes of WebP or PNG can declare up to the pixel limit: the memory bound is that decoded size (4 bytes a
# pixel), not a multiple of the input.
TARGET = harness.Target(name="server_image", check=check, allowed=(ApiError,), seeds=seeds,
                        modules=("minisd/server/a1111.py",),
                        memory_slack=harness.MEMORY_SLACK + 4 * MAX_IMAGE_PIXELS)

if __name__ == "__main__":
    harness.main(TARGET)
