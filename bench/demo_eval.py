"""Prompt adherence of the bundled demo model (or any model trained on the shapes grammar): prompts drawn
from the caption grammar, per-attribute accuracy at CFG 1 and at the default CFG, the img2img and
inpainting checks, and the time per 20-step image. Usage: python bench/demo_eval.py [--model PATH] [-n 100]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import minisd
from minisd.image import image_grid
from minisd.train.evaluate import EVAL_SEED, evaluation_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo", help="checkpoint path or 'demo' (default)")
    parser.add_argument("-n", "--prompts", type=int, default=100, help="prompts per CFG scale (default 100)")
    parser.add_argument("--image-checks", type=int, default=20, help="images for the img2img and inpaint checks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image side the model was trained at")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 1 is fastest for this small model on a busy machine")
    parser.add_argument("--grid", type=Path, help="also save the default-CFG images as a grid PNG here")
    parser.add_argument("--failures", type=int, default=10, help="failed prompts to list (default 10)")
    parser.add_argument("--min-adherence", type=float, default=None,
                        help="exit with status 1 if adherence at the default CFG is below this (0..1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    sd = minisd.load(args.model, device=args.device)
    print(f"model: {sd.source} ({sd.dtype}, {sd.device}, {torch.get_num_threads()} threads)\n")
    report, results = evaluation_report(sd, args.prompts, image_checks=args.image_checks, steps=args.steps,
                                        size=args.size, seed=args.seed)
    print(report)
    default = results[-1]
    if default.failures and args.failures:
        print(f"\nFailures at the default CFG (prompt -> what the detector saw), first {args.failures}:")
        for prompt, seen in default.failures[: args.failures]:
            print(f"  {prompt!r} -> {seen}")
    if args.grid:
        image_grid(default.images, cols=10).save(args.grid)
        print(f"\nwrote {args.grid}")
    if args.min_adherence is not None and default.accuracy["all"] < args.min_adherence:
        print(f"\nadherence {default.accuracy['all']:.0%} is below {args.min_adherence:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
