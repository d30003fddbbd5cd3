"""Fuzz target: prompt text through A1111's attention syntax parser, the extra-network tag parser, the CLIP BPE
tokenizer and the 77-token chunk packer (every emphasis mode). Invariant: each returns, or raises the documented
ValueError (an emphasis weight that is not a number); within the time and memory bounds."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fuzz import harness  # noqa: E402

with harness.instrumented(__name__ == "__main__"):
    from minisd import prompts
    from minisd.prompts import EMPHASIS_MODES, parse_prompt_attention, tokenize_prompt
    from minisd.tokenizer import CLIPTokenizer


@functools.cache
def tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    return CLIPTokenizer(), CLIPTokenizer(clean="openai")


def check(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    mode = EMPHASIS_MODES[data[0] % len(EMPHASIS_MODES)] if data else "Original"
    if hasattr(prompts, "extract_extra_networks"):
        text, _ = prompts.extract_extra_networks(text)
    parsed = parse_prompt_attention(text)
    assert all(isinstance(f, str) and isinstance(w, float) for f, w in parsed)
    hf, openai = tokenizers()
    ids = openai.encode(text)
    assert ids[0] == 49406 and ids[-1] == 49407
    chunks = tokenize_prompt(hf, text, emphasis=mode, comma_backtrack=data[-1] % 30 if data else 20)
    assert chunks and all(len(c.ids) == len(c.weights) == 77 for c in chunks)


def seeds() -> dict[str, bytes]:
    return {
        "emphasis": b"a (red:1.3) circle, ((blue)) [square] \\(literal\\) BREAK next chunk",
        "nested": b"((((a:0.5)) [b [c]] (d:-1.5) e:f) (g:1e3) \\\\ \\x",
        "long-commas": b", ".join([b"word"] * 60),
        "unicode": "Ünïcödé 🎨 ｆｕｌｌｗｉｄｔｈ café <|endoftext|> don't".encode(),
        "extra-networks": b"<lora:name:0.8> <hypernet:x:1> a cat, <lora:broken>",
        "bad-weight": b"(a:1.2.3)",
    }


TARGET = harness.Target(name="prompt", check=check, allowed=(ValueError,), seeds=seeds,
                        modules=("minisd/prompts.py", "minisd/tokenizer.py"),
                        dictionary=[b"(", b")", b"[", b"]", b":", b"\\", b"BREAK", b"AND", b"<lora:", b">", b",",
                                    b"<|endoftext|>", b"<|startoftext|>", b"'s", b":1.2)"])

if __name__ == "__main__":
    harness.main(TARGET)
