"""The figures of docs/how-it-works.md, made by the bundled demo model with fixed seeds (`make docs` runs
`python -m minisd.explain.figures docs/figures`), and the code links of the docs brought up to date."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..train.shapes import ShapesDataset
from .doclinks import DOCS, update_links
from .drawing import save

PROMPT = "a red circle on the left, blue background"
ATTENTION_PROMPT = "a yellow triangle at the top, purple background"
DATASET_SEED = 7  # the dataset images shown (any seed: the dataset is a pure function of it)


def sample_image(index: int = 3):
    return ShapesDataset(DATASET_SEED)[index].image


def make_figures(sd, folder: Path) -> dict[str, float]:
    """Write the five figures into `folder`; returns the seconds each took."""
    from .attention import explain_attention
    from .guidance import explain_guidance
    from .latents import explain_latents
    from .noising import explain_noising
    from .steps import explain_steps

    folder.mkdir(parents=True, exist_ok=True)
    jobs = {
        "noising": lambda: explain_noising(sd, sample_image(), seed=0),
        "steps": lambda: explain_steps(sd, PROMPT, steps=12, seed=1),
        "guidance": lambda: explain_guidance(sd, PROMPT, steps=12, seed=2),
        "attention": lambda: explain_attention(sd, ATTENTION_PROMPT, steps=12, seed=1),
        "latents": lambda: explain_latents(sd, sample_image()),
    }
    seconds = {}
    for name, job in jobs.items():
        started = time.perf_counter()
        save(folder / f"{name}.png", job().picture)
        seconds[name] = time.perf_counter() - started
    return seconds


def main(argv: list[str] | None = None) -> int:
    from ..pipeline import load

    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else DOCS / "figures"
    sd = load("demo", device="cpu", dtype=torch.float32)  # float32 everywhere: the same figures on every CPU
    for name, seconds in make_figures(sd, folder).items():
        print(f"wrote {folder / name}.png ({seconds:.1f} s)")
    for path, count in update_links(DOCS).items():
        print(f"{path}: {count} code links re-anchored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
