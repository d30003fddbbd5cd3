"""Fuzz target: A1111 infotext ("parameters" text) through the parser and into GenerationParams, as
`--from-image` reads it. Invariant: `parse_infotext` always returns; `from_infotext(...).validated()` returns
or raises ParameterError; within the time and memory bounds."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fuzz import harness  # noqa: E402

with harness.instrumented(__name__ == "__main__"):
    from minisd.errors import ParameterError
    from minisd.image import format_infotext, parse_infotext
    from minisd.params import GenerationParams


def check(data: bytes) -> None:
    text = data.decode("utf-8", errors="surrogateescape")
    prompt, negative, fields = parse_infotext(text)
    assert isinstance(prompt, str) and isinstance(negative, str) and isinstance(fields, dict)
    GenerationParams.from_infotext(text).validated()


def seeds() -> dict[str, bytes]:
    params = GenerationParams(prompt="a (red:1.2) circle, [blue]\nsecond line", negative_prompt="blurry, \"bad\"",
                              width=512, height=768, steps=30, sampler="Euler a", seed=42).validated()
    return {
        "full": params.infotext(42, model_hash="abcdef1234", model_name="model", version="minisd").encode(),
        "formatted": format_infotext("prompt: with, commas", "neg\nline", {
            "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7, "Seed": 1,
            "Size": "512x512", "Model hash": "abcdef1234", "Lora hashes": "a: 1, b: 2", "Hires upscale": 2,
            "Denoising strength": 0.5, "Clip skip": 2}).encode(),
        "unicode": format_infotext("Ünïcödé 🎨 \"quoted\"", "", {"Steps": 5, "Seed": 3,
                                                                 "Size": "64x64"}).encode(),
        "bad-size": b"p\nSteps: 20, Size: 12x, Seed: 1",
        "huge-numbers": b"p\nSteps: 1e400, CFG scale: nan, Seed: 99999999999999999999, Size: 8x8",
    }


TARGET = harness.Target(name="infotext", check=check, allowed=(ParameterError,), seeds=seeds,
                        modules=("minisd/image.py", "minisd/params.py"),
                        dictionary=[b"Negative prompt: ", b"Steps: ", b", Size: ", b"x", b"Seed: ", b"CFG scale: ",
                                    b"Sampler: ", b"Schedule type: ", b"Hires upscale: ", b"Clip skip: ", b'"', b"\\n"])

if __name__ == "__main__":
    harness.main(TARGET)
