"""What the speed options that change the image (issue 13: --cfg-interval, --cache-interval) cost in quality
on the bundled demo model: prompt adherence judged by the demo model's detector (as bench/demo_eval.py does)
and the PSNR of each image against the full computation with the same seed, plus the UNet work they save.

    python bench/options_quality.py                 # 50 prompts, 20 steps, every setting (a few minutes)
    python bench/options_quality.py -n 20 --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import minisd  # noqa: E402
from minisd.models.unet import UNetModel  # noqa: E402
from minisd.train.evaluate import EVAL_SEED, adherence  # noqa: E402

# (label, GenerationParams options); the first is the reference computation.
SETTINGS = [("full (CFG every step)", {}),
            ("cfg-interval 0,0.6", {"cfg_interval": (0.0, 0.6)}),
            ("cfg-interval 0,0.4", {"cfg_interval": (0.0, 0.4)}),
            ("cache-interval 2", {"cache_interval": 2}),
            ("cache-interval 3", {"cache_interval": 3}),
            ("cache-interval 5", {"cache_interval": 5}),
            ("cfg-interval 0,0.6 + cache-interval 3", {"cfg_interval": (0.0, 0.6), "cache_interval": 3})]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


class BlockCounter:
    """Batch items through the UNet's middle block (the deep part) and through its first block (every call)."""

    def __init__(self, unet: UNetModel):
        self.deep = self.calls = 0
        unet.middle_block.register_forward_hook(lambda m, a, o: self._add("deep", a[0].shape[0]))
        unet.input_blocks[0].register_forward_hook(lambda m, a, o: self._add("calls", a[0].shape[0]))

    def _add(self, name: str, n: int) -> None:
        setattr(self, name, getattr(self, name) + n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("-n", "--prompts", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="DPM++ 2M")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    sd = minisd.load(args.model, device="cpu", dtype=torch.float32)
    counter = BlockCounter(sd.unet)
    print(f"model {sd.source}, fp32, {torch.get_num_threads()} threads, {args.prompts} prompts, {args.steps} "
          f"{args.sampler} steps, default CFG\n")
    print("| Setting | adherence (all attributes) | PSNR vs full: median [min] (dB) | UNet batch items "
          "(first block / deep part) | s per image |")
    print("|---|---:|---:|---:|---:|")
    reference = None
    for label, options in SETTINGS:
        counter.deep = counter.calls = 0
        started = time.perf_counter()
        result = adherence(sd, args.prompts, seed=EVAL_SEED, steps=args.steps, sampler=args.sampler, **options)
        seconds = (time.perf_counter() - started) / args.prompts
        pixels = [np.asarray(image) for image in result.images]
        if reference is None:
            reference, quality = pixels, "—"
        else:
            values = [psnr(a, b) for a, b in zip(pixels, reference)]
            quality = f"{np.median(values):.1f} [{min(values):.1f}]"
        print(f"| {label} | {result.accuracy['all']:.0%} | {quality} | {counter.calls / args.prompts:.0f} / "
              f"{counter.deep / args.prompts:.0f} | {seconds:.2f} |", flush=True)
    print("\nUNet batch items per image: a guided step is 2 (cond + uncond), an unguided one 1; the deep part is "
          "skipped on DeepCache's cached calls. Times are of this small model and only indicative.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
