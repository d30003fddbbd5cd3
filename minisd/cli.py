"""The `minisd` command line: argparse subcommands that parse, call the library, and turn every
`MinisdError` into one line on stderr with exit code 2 (`--debug` shows the traceback instead)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import __version__
from .errors import MinisdError, ParameterError
from .hashes import sha256_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_components

    c = load_components(args.model, device="cpu", dtype=None if args.dtype is None else DTYPES[args.dtype],
                        config=None)
    path = Path(c.source)
    print(f"file:        {path}")
    print(f"variant:     {c.config.variant}")
    print(f"EMA weights: {'present, used' if c.has_ema else 'none'}")
    for name, module in (("unet", c.unet), ("vae", c.vae), ("text_encoder", c.text_encoder)):
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
        count = sum(p.numel() for p in module.parameters())
        print(f"{name + ':':13}{count:>13,} parameters  {', '.join(dtypes)}")
    digest = sha256_model(path)
    print(f"sha256:      {digest}")
    print(f"model hash:  {digest[:10]}  (A1111 short hash)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_components, original_state_dict, save_checkpoint

    c = load_components(args.input, device="cpu", dtype=DTYPES[args.dtype] if args.dtype else None,
                        use_ema=not args.no_ema)
    save_checkpoint(args.output, original_state_dict(c.unet, c.vae, c.text_encoder), c.config)
    print(f"wrote {args.output}")
    return 0


# ---- generation ---------------------------------------------------------------------------------------------

# CLI flag -> GenerationParams field; every flag defaults to None so that only what the user typed overrides
# the defaults (or the parameters read by --from-image).
PARAM_FLAGS = {"negative_prompt": "negative_prompt", "width": "width", "height": "height", "steps": "steps",
               "cfg_scale": "cfg_scale", "sampler": "sampler", "schedule": "schedule", "seed": "seed",
               "batch_size": "batch_size", "n_iter": "n_iter", "clip_skip": "clip_skip", "strength": "strength",
               "mask_blur": "mask_blur", "inpaint_only_masked": "inpaint_only_masked",
               "padding": "only_masked_padding", "resize_mode": "resize_mode", "eta": "eta",
               "guidance_rescale": "guidance_rescale", "emphasis": "emphasis", "tiled_vae": "tiled_vae",
               "sequential_guidance": "sequential_guidance"}


def open_image(path: str, what: str):
    from PIL import UnidentifiedImageError

    from .image import load_image
    try:
        return load_image(path)
    except FileNotFoundError:
        raise ParameterError(f"{path}: {what} not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ParameterError(f"{path}: {what} is not an image that can be opened ({type(e).__name__})") from None


def writable_output(args: argparse.Namespace) -> Path:
    """The output folder (or file's folder), created and checked for writing before any work starts."""
    target = Path(args.output).parent if args.output else Path(args.outdir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParameterError(f"{target}: cannot create the output directory ({e.strerror})") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise ParameterError(f"{target}: output directory is not writable")
    if args.output and os.path.lexists(args.output):
        raise ParameterError(f"{args.output}: already exists; not overwriting it")
    return target


def generation_params(args: argparse.Namespace):
    from .image import read_infotext
    from .params import GenerationParams

    if args.from_image:
        try:
            text = read_infotext(args.from_image)
        except OSError as e:
            raise ParameterError(f"{args.from_image}: cannot read ({e.strerror or e})") from None
        if not text:
            raise ParameterError(f"{args.from_image}: holds no generation parameters")
        params = GenerationParams.from_infotext(text)
    else:
        params = GenerationParams()
    if args.prompt is not None:
        params.prompt = args.prompt
    elif not args.from_image:
        raise ParameterError("a prompt is required (or --from-image IMAGE)")
    for flag, field in PARAM_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(params, field, value)
    return params.validated()


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .image import save_output, save_png
    from .pipeline import load

    params = generation_params(args)
    init = open_image(args.init, "init image") if getattr(args, "init", None) else None
    mask = open_image(args.mask, "mask") if getattr(args, "mask", None) else None
    if args.command == "img2img" and init is None or args.command == "inpaint" and (init is None or mask is None):
        raise ParameterError(f"{args.command} needs " + ("--init IMAGE and --mask MASK" if args.command == "inpaint"
                                                           else "--init IMAGE"))
    if args.output and params.batch_size * params.n_iter > 1:
        raise ParameterError("-o/--output names one file; use --outdir for several images")
    outdir = writable_output(args)
    model = args.model or os.environ.get("MINISD_MODEL") or "demo"
    sd = load(model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None)

    bar = None

    def progress(info: dict) -> None:
        nonlocal bar
        if info["i"] == 0:
            if bar is not None:
                bar.close()
            bar = tqdm(total=info["steps"], desc=f"batch {info['iteration'] + 1}/{params.n_iter}", leave=False,
                       disable=args.quiet)
        bar.update(1)

    images = sd.generate(params, init_image=init, mask_image=mask, callback=progress)
    if bar is not None:
        bar.close()
    for image in images:
        infotext, seed = image.info["parameters"], image.info["seed"]
        path = save_png(image, args.output, infotext) if args.output else save_output(image, outdir, seed, infotext)
        print(f"wrote {path} (seed {seed})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.cli import run
    torch.set_flush_denormal(True)
    return run(args)


def cmd_pnginfo(args: argparse.Namespace) -> int:
    from .image import read_infotext
    try:
        text = read_infotext(args.image)
    except FileNotFoundError:
        raise ParameterError(f"{args.image}: no such file") from None
    except OSError as e:
        raise ParameterError(f"{args.image}: not an image that can be opened ({type(e).__name__})") from None
    if not text:
        raise ParameterError(f"{args.image}: holds no generation parameters")
    print(text)
    return 0


def add_generation_flags(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax: (word:1.2), [word], BREAK)")
    p.add_argument("--negative-prompt", "-n", dest="negative_prompt", metavar="TEXT")
    p.add_argument("--model", "-m", help="checkpoint file, diffusers folder or 'demo' (default: $MINISD_MODEL, "
                                         "else the bundled demo model)")
    p.add_argument("--steps", type=str, metavar="N")
    p.add_argument("--cfg-scale", "--scale", dest="cfg_scale", metavar="F", help="classifier-free guidance scale")
    p.add_argument("--sampler", metavar="NAME", help='A1111 label or id: "Euler a", "DPM++ 2M Karras", dpmpp_2m ...')
    p.add_argument("--schedule", metavar="NAME", help="sigma schedule: Automatic, Karras, Exponential, Uniform, ...")
    p.add_argument("--seed", metavar="N", help="-1 (default) draws one; image i of a run uses seed + i")
    p.add_argument("--width", "-W", metavar="W")
    p.add_argument("--height", "-H", metavar="H")
    p.add_argument("--batch-size", "--n_samples", dest="batch_size", metavar="N", help="images per batch")
    p.add_argument("--n-iter", "--n_iter", dest="n_iter", metavar="N", help="number of batches")
    p.add_argument("--clip-skip", dest="clip_skip", metavar="N")
    p.add_argument("--eta", metavar="F", help="noise of ancestral/DDIM samplers")
    p.add_argument("--guidance-rescale", dest="guidance_rescale", metavar="F")
    p.add_argument("--emphasis", choices=["Original", "No norm", "Ignore", "None"])
    p.add_argument("--tiled-vae", dest="tiled_vae", action=argparse.BooleanOptionalAction, default=None,
                   help="decode/encode in tiles (default: only when an untiled pass would not fit in memory)")
    p.add_argument("--sequential-guidance", dest="sequential_guidance", action=argparse.BooleanOptionalAction,
                   default=None, help="run the UNet on the prompt and the negative prompt one after the other: "
                   "half the activation memory, a little slower (default: only when batched would not fit)")
    p.add_argument("--outdir", default="outputs", help="folder for <counter>-<seed>.png files (default: outputs)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the single image to FILE instead")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="precision (default: fastest that keeps quality)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    if task == "generate":
        p.add_argument("--from-image", metavar="IMAGE", help="reuse the parameters stored in an image's metadata")
    if task in ("img2img", "inpaint"):
        p.add_argument("--init", "--init-img", dest="init", metavar="IMAGE", required=False, help="the starting image")
        p.add_argument("--strength", metavar="F", help="denoising strength 0..1 (default 0.75)")
        p.add_argument("--resize-mode", dest="resize_mode",
                       choices=["Just resize", "Crop and resize", "Resize and fill"])
    if task == "inpaint":
        p.add_argument("--mask", metavar="MASK", help="white (or opaque) = repaint")
        p.add_argument("--mask-blur", dest="mask_blur", metavar="N")
        p.add_argument("--inpaint-only-masked", dest="inpaint_only_masked", action="store_true", default=None,
                       help="generate the mask's neighbourhood at full size and paste it back")
        p.add_argument("--padding", metavar="PX", help="context around the mask for --inpaint-only-masked")
    p.set_defaults(run=cmd_generate, from_image=None)


class OneLineErrors(argparse.ArgumentParser):
    """argparse with usage errors as one line on stderr and exit code 2 (the full usage is in --help)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="minisd", description="Stable Diffusion from scratch in PyTorch.")
    parser.add_argument("--version", action="version", version=f"minisd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="describe a checkpoint: variant, components, parameters, hashes")
    info.add_argument("model", help="a .safetensors/.ckpt file, a diffusers folder, or 'demo'")
    info.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    info.set_defaults(run=cmd_info)

    convert = sub.add_parser("convert", help="convert a checkpoint: .ckpt -> .safetensors, precision, "
                                             "single file <-> diffusers folder (an OUT without suffix)")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--dtype", choices=DTYPES, help="precision of the written weights (default: as loaded, fp32)")
    convert.add_argument("--no-ema", action="store_true", help="keep the trained weights, not the EMA copy")
    convert.set_defaults(run=cmd_convert)

    for task, text in (("generate", "text to image"), ("img2img", "image to image"), ("inpaint", "repaint a mask")):
        add_generation_flags(sub.add_parser(task, help=text), task)

    train = sub.add_parser("train", help="train the bundled demo model (autoencoder, then UNet + text encoder)")
    from .train.cli import add_arguments
    add_arguments(train)
    train.set_defaults(run=cmd_train)

    pnginfo = sub.add_parser("pnginfo", help="print the generation parameters stored in an image")
    pnginfo.add_argument("image")
    pnginfo.set_defaults(run=cmd_pnginfo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("minisd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MinisdError, OSError) as e:
        if args.debug:
            raise
        print(f"minisd: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
