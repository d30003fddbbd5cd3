"""The arguments of `minisd explain noising|steps|guidance|attention|latents` and the run that loads the model,
calls the sub-command's module and writes its picture (or animation). Light to import: no matplotlib here."""
from __future__ import annotations

import argparse
import os
import time

from ..errors import ParameterError

COMMANDS = {
    "noising": "the forward process q(x_t | x_0) of an image at chosen t",
    "steps": "the reverse process: x_t and the predicted x̂_0 at every sampler step, the σ schedule",
    "guidance": "one seed at several CFG scales; conditional/unconditional predictions at one step",
    "attention": "cross-attention maps per prompt token over the generated image (DAAM)",
    "latents": "the VAE round trip, the 4 latent channels, the scaling factor",
}
IMAGE_COMMANDS = ("noising", "latents")
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="explain", required=True, metavar="WHAT")
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if name in IMAGE_COMMANDS:
            p.add_argument("image", help="the image (cropped and resized to the model's size, or --width/--height)")
        else:
            p.add_argument("prompt")
            p.add_argument("--negative-prompt", "-n", dest="negative_prompt", default="", metavar="TEXT")
            p.add_argument("--steps", type=_integer, default=20, metavar="N")
            p.add_argument("--sampler", default="DPM++ 2M", metavar="NAME")
            p.add_argument("--schedule", default="Automatic", metavar="NAME")
            if name != "guidance":
                p.add_argument("--cfg-scale", dest="cfg_scale", type=_number, default=7.5, metavar="F")
        p.add_argument("--seed", type=_integer, default=1 if name not in IMAGE_COMMANDS else 0, metavar="N")
        p.add_argument("--width", "-W", type=_integer, metavar="W")
        p.add_argument("--height", "-H", type=_integer, metavar="H")
        if name == "noising":
            p.add_argument("--timesteps", type=_integers, default=None, metavar="T,T,...",
                           help="timesteps 0..999 to show (default 0,100,250,500,750,999)")
        if name == "guidance":
            p.add_argument("--scales", type=_numbers, default=None, metavar="S,S,...",
                           help="CFG scales (default 0,1,3,7.5,15)")
            p.add_argument("--at-step", dest="at_step", type=_integer, default=None, metavar="N",
                           help="the step whose predictions are shown (default: a quarter of the way)")
        p.add_argument("--model", "-m", help="checkpoint, diffusers folder or 'demo' (default: $MINISD_MODEL, "
                                             "else the bundled demo model)")
        p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
        p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                       help="precision (default fp32: the pictures are the same on every CPU)")
        p.add_argument("--animate", action="store_true", help="write an animated GIF (or WebP with -o x.webp)")
        p.add_argument("--output", "-o", metavar="FILE",
                       help=f"where to write (default outputs/explain/{name}.png, or .gif with --animate)")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _integers(text: str) -> list[int]:
    return [_integer(part) for part in text.split(",") if part.strip()]


def _numbers(text: str) -> list[float]:
    return [_number(part) for part in text.split(",") if part.strip()]


def explain(sd, args: argparse.Namespace, image=None):
    """Run the sub-command `args.explain` on a loaded model; returns its Explanation."""
    size = {"width": args.width, "height": args.height}
    if args.explain == "noising":
        from .noising import DEFAULT_TIMESTEPS, explain_noising
        return explain_noising(sd, image, timesteps=args.timesteps or DEFAULT_TIMESTEPS, seed=args.seed,
                               animate=args.animate, **size)
    if args.explain == "latents":
        from .latents import explain_latents
        return explain_latents(sd, image, **size)
    options = {"negative_prompt": args.negative_prompt, "steps": args.steps, "sampler": args.sampler,
               "schedule": args.schedule, "seed": args.seed, **{k: v for k, v in size.items() if v is not None}}
    if args.explain == "steps":
        from .steps import explain_steps
        return explain_steps(sd, args.prompt, cfg_scale=args.cfg_scale, **options)
    if args.explain == "guidance":
        from .guidance import DEFAULT_SCALES, explain_guidance
        return explain_guidance(sd, args.prompt, scales=args.scales or DEFAULT_SCALES, at_step=args.at_step, **options)
    from .attention import explain_attention
    return explain_attention(sd, args.prompt, cfg_scale=args.cfg_scale, **options)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..image import open_user_image
    from ..pipeline import load
    from .drawing import output_path, save

    path = output_path(args.output, args.explain, args.animate)
    image = open_user_image(args.image, "image") if args.explain in IMAGE_COMMANDS else None
    for side in ("width", "height"):
        value = getattr(args, side)
        if value is not None and (value < 8 or value % 8):
            raise ParameterError(f"--{side} must be a positive multiple of 8, got {value}")
    sd = load(args.model or os.environ.get("MINISD_MODEL") or "demo", device=args.device,
              dtype=getattr(torch, DTYPE_NAMES[args.dtype]))
    started = time.perf_counter()
    result = explain(sd, args, image)
    save(path, result.picture, result.frames)
    print(f"wrote {path} ({time.perf_counter() - started:.1f} s)")
    return 0
