"""The `minisd` command line: argparse subcommands that parse, call the library, and turn every
`MinisdError` into one line on stderr with exit code 2 (`--debug` shows the traceback instead)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import __version__
from .errors import MinisdError
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minisd", description="Stable Diffusion from scratch in PyTorch.")
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
