"""What A1111's GPU noise costs on the CPU: CUDA's Philox randn emulated by minisd.rng (one draw of a 1024x1024 batch
of 4, and the four per-image draws minisd makes) against torch's own CPU randn of the same size and one UNet step
(SD 1.5 architecture, random weights, 64x64 latent, batch 1 with CFG = 2 rows), all timed in this run.

    .venv/bin/python bench/philox_noise.py [--repeats 5] [--no-unet]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from minisd import rng
from minisd.config import PRESETS
from minisd.models.unet import UNetModel


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-unet", action="store_true", help="skip the UNet step (needs ~4 GB of memory)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    shape = (4, 4, 128, 128)  # 1024x1024, batch of 4
    rows = [
        ("Philox randn (4, 4, 128, 128), one draw", lambda: rng.CudaGenerator(1).randn(shape)),
        ("Philox randn, 4 per-image draws (4, 128, 128)",
         lambda: [rng.CudaGenerator(seed).randn(shape[1:]) for seed in range(4)]),
        ("torch CPU randn (4, 4, 128, 128)", lambda: torch.randn(shape, generator=torch.Generator().manual_seed(1))),
    ]
    results = [(name, median_seconds(fn, args.repeats)) for name, fn in rows]
    if not args.no_unet:
        unet = UNetModel(PRESETS["sd1"].unet).eval()
        x, t, context = torch.randn(2, 4, 64, 64), torch.full((2,), 500.0), torch.randn(2, 77, 768)
        with torch.inference_mode():
            results.append(("UNet step SD 1.5, 512x512, batch 1 + CFG (fp32)",
                            median_seconds(lambda: unet(x, t, context), max(1, args.repeats // 2))))
    print(f"threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)\n")
    print(f"| {'what':<50} | {'seconds':>9} |")
    print(f"|{'-' * 52}|{'-' * 11}|")
    for name, seconds in results:
        print(f"| {name:<50} | {seconds:>9.4f} |")


if __name__ == "__main__":
    main()
