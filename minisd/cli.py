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
from .params import GENERATION_PRESETS
from .precision import DTYPES

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_components
    from .precision import STORED, compute_choice

    c = load_components(args.model, device="cpu", dtype=STORED, config=None)
    path = Path(c.source)
    print(f"file:        {path}")
    print(f"variant:     {c.config.variant}")
    print(f"prediction:  {c.config.schedule.prediction_type}, default size {c.config.image_size}x{c.config.image_size}")
    if c.config.open_clip is not None and c.config.open_clip.dropped_last_layers:
        tower = c.config.open_clip
        print(f"OpenCLIP:    {tower.layers} of {tower.layers + tower.dropped_last_layers} layers stored")
    print(f"EMA weights: {'present, used' if c.has_ema else 'none'}")
    for name, module in (("unet", c.unet), ("vae", c.vae), ("text_encoder", c.text_encoder)):
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
        count = sum(p.numel() for p in module.parameters())
        print(f"{name + ':':13}{count:>13,} parameters  {', '.join(dtypes)} (stored)")
    print(f"compute:     {compute_choice('cpu')} on this machine's CPU")
    digest = sha256_model(path)
    print(f"sha256:      {digest}")
    print(f"model hash:  {digest[:10]}  (A1111 short hash)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_components, original_state_dict, save_checkpoint
    from .precision import STORED

    c = load_components(args.input, device="cpu", dtype=DTYPES[args.dtype] if args.dtype else STORED,
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
               "sequential_guidance": "sequential_guidance", "refiner_switch_at": "refiner_switch_at"}
# A1111 noise/seed options and hires fix (rng.py, seeds.py, hires_fix.py).
PARAM_FLAGS.update({"rng": "rng", "subseed": "subseed", "subseed_strength": "subseed_strength",
                    "seed_resize_from_w": "seed_resize_from_w", "seed_resize_from_h": "seed_resize_from_h",
                    "ensd": "eta_noise_seed_delta", "noise_multiplier": "noise_multiplier",
                    "sgm_noise_multiplier": "sgm_noise_multiplier", "hires": "enable_hr", "hr_scale": "hr_scale",
                    "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y", "hr_steps": "hr_steps",
                    "hr_upscaler": "hr_upscaler", "hr_strength": "strength", "inpaint_mode": "inpaint_mode",
                    "masked_content": "inpainting_fill"})
# Speed options (issue 13): guidance interval and DeepCache.
PARAM_FLAGS.update({"cfg_interval": "cfg_interval", "cache_interval": "cache_interval"})


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
    for field, value in GENERATION_PRESETS.get(getattr(args, "preset", None), {}).items():
        setattr(params, field, value)  # before the flags: what the user types wins over the preset
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
    from .image import open_user_image
    init = open_user_image(args.init, "init image") if getattr(args, "init", None) else None
    mask = open_user_image(args.mask, "mask") if getattr(args, "mask", None) else None
    if args.command == "img2img" and init is None or args.command == "inpaint" and (init is None or mask is None):
        raise ParameterError(f"{args.command} needs " + ("--init IMAGE and --mask MASK" if args.command == "inpaint"
                                                           else "--init IMAGE"))
    if args.output and params.batch_size * params.n_iter > 1:
        raise ParameterError("-o/--output names one file; use --outdir for several images")
    outdir = writable_output(args)
    model = args.model or os.environ.get("MINISD_MODEL") or "demo"
    sd = load(model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
              prediction=getattr(args, "prediction", None))
    if getattr(args, "refiner", None):  # SDXL base + refiner in one run
        sd.refiner = load(args.refiner, device=args.device, dtype=sd.dtype)
    params = add_model_extras(sd, args, params)
    if getattr(args, "preset", None) == "fast" and sd.taesd is None and not args.quiet:
        print("minisd: --preset fast decodes with the full VAE; give --vae taesd FILE for the tiny decoder",
              file=sys.stderr)
    if getattr(args, "compile", False):
        sd.compile()

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


def lora_argument(value: str) -> tuple[Path, float]:
    """--lora FILE[:WEIGHT]: the weight is what follows the last colon, when that is a number."""
    path, _, weight = value.rpartition(":")
    try:
        return (Path(path), float(weight)) if path else (Path(value), 1.0)
    except ValueError:
        return Path(value), 1.0


def recorded_vae(image: str, directories: list[str]) -> list[str] | None:
    """The VAE an image's infotext names ("VAE: file"), found in one of `directories`, as a --vae value."""
    from .image import parse_infotext, read_infotext

    name = parse_infotext(read_infotext(image) or "")[2].get("VAE")
    if not name:
        return None
    for directory in directories:
        if (Path(directory) / name).exists():
            return [str(Path(directory) / name)]
    raise ParameterError(f"{image} was made with the VAE {name}, which is not in {', '.join(directories)}")


def add_model_extras(sd, args: argparse.Namespace, params):
    """Apply --vae, --lora-dir, --embeddings-dir and --lora to a loaded model. Each --lora becomes a
    <lora:name:weight> tag of the prompt, so the image's infotext records it as A1111 would."""
    import dataclasses

    vae = getattr(args, "vae", None)
    if not vae and getattr(args, "from_image", None) and getattr(args, "vae_dir", None):
        vae = recorded_vae(args.from_image, args.vae_dir)
    if vae:
        if vae[0].lower() == "taesd":
            if len(vae) != 2:
                raise ParameterError("--vae taesd needs the TAESD decoder file: --vae taesd FILE")
            sd.load_taesd(vae[1])
        elif len(vae) == 1:
            sd.load_vae(vae[0])
        else:
            raise ParameterError(f"--vae takes FILE or 'taesd FILE', got {' '.join(vae)} (put the prompt first)")
    sd.lora_dirs = [Path(d) for d in getattr(args, "lora_dir", None) or []]
    sd.embedding_dirs = [Path(d) for d in getattr(args, "embeddings_dir", None) or []]
    tags = []
    for value in getattr(args, "lora", None) or []:
        path, weight = lora_argument(value)
        if not path.is_file():
            raise ParameterError(f"{path}: LoRA file not found")
        sd.lora_dirs.append(path)
        tags.append(f"<lora:{path.stem}:{weight:g}>")
    if tags:
        params = dataclasses.replace(params, prompt=" ".join([params.prompt, *tags]).strip())
    return params


def cmd_train(args: argparse.Namespace) -> int:
    from .train.cli import run
    torch.set_flush_denormal(True)
    return run(args)


def cmd_explain(args: argparse.Namespace) -> int:
    """`minisd explain ...`: pictures of the process (the optional `explain` extra: matplotlib)."""
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        raise ParameterError("minisd explain draws with matplotlib: pip install 'minisd[explain]'")
    from .explain.cli import run
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


def cmd_serve(args: argparse.Namespace) -> int:
    """`minisd serve`: the HTTP API and web page (the optional `server` extra: fastapi + uvicorn)."""
    import importlib.util
    import ipaddress

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ParameterError(f"minisd serve needs {' and '.join(missing)}: pip install 'minisd[server]'")
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not args.api_auth and not args.insecure:
        raise ParameterError(f"refusing to serve on {args.host} without --api-auth USER:PASS "
                             "(or --insecure to allow anyone on the network)")
    from .server.app import create_app, serve

    model = args.model or os.environ.get("MINISD_MODEL") or (None if args.models_dir else "demo")
    if args.ray:  # the same app as a Ray Serve ingress in front of generation replicas (ray_backend.py)
        from .ray_backend import require_ray, run_serve, serve_application
        require_ray("minisd serve --ray")
        if args.taesd:
            raise ParameterError("--taesd is not supported with --ray (previews use the latent approximation)")
        run_serve(serve_application(model, args.models_dir, replicas=args.replicas, autoscale=args.autoscale,
                                    device=args.device, dtype=args.dtype, api_auth=args.api_auth,
                                    max_size=args.max_size, max_batch=args.max_batch),
                  address=args.address, host=args.host, port=args.port)
        return 0
    app = create_app(model, args.models_dir, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                     taesd=args.taesd, api_auth=args.api_auth, max_size=args.max_size, max_batch=args.max_batch)
    serve(app, args.host, args.port)
    return 0


def replica_range(text: str) -> tuple[int, int]:
    """--autoscale MIN,MAX"""
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX such as 1,4, got {text!r}") from None
    return low, high


def cmd_batch(args: argparse.Namespace) -> int:
    """`minisd batch`: one image per JSONL line, locally or over a Ray cluster (the optional `ray` extra)."""
    from .batch import ResultsWriter, local_outcomes, read_lines, run_batch

    model = args.model or os.environ.get("MINISD_MODEL") or "demo"
    if model != "demo" and not Path(model).expanduser().exists():
        raise ParameterError(f"{model}: model not found")
    seed = args.seed
    if seed == -1:
        import random
        seed = random.randrange(2**32)
        print(f"base seed {seed}", file=sys.stderr)
    lines = read_lines(args.prompts, base_seed=seed, model=model)
    writer = ResultsWriter(args.outdir)
    if args.ray:
        from .ray_backend import ray_outcomes, require_ray
        require_ray("minisd batch --ray")
        outcomes = ray_outcomes(workers=args.workers, address=args.address, cpus_per_worker=args.cpus_per_worker,
                                gpus_per_worker=args.gpus_per_worker, device=args.device, dtype=args.dtype)
    else:
        outcomes = local_outcomes(args.device, DTYPES[args.dtype] if args.dtype else None)
    summary = run_batch(lines, writer, outcomes, quiet=args.quiet)
    print(f"wrote {summary.written} image{'s' * (summary.written != 1)} to {args.outdir}"
          + (f", {summary.skipped} already done" if summary.skipped else ""))
    if summary.failed:
        print(f"minisd: {summary.failed} of {len(lines)} lines failed: see {writer.results_path}", file=sys.stderr)
        return 1
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
    p.add_argument("--dtype", choices=DTYPES, help="precision (default: per CPU, see `minisd info`; or $MINISD_DTYPE)")
    p.add_argument("--prediction", choices=["eps", "v"], help="the model's parameterisation when its file does not "
                   "say (SD 2.x 768-v models: v; default: from the file, a .yaml beside it, or inferred)")
    p.add_argument("--refiner", metavar="FILE", help="an SDXL refiner that takes over after --refiner-switch-at "
                   "of the steps (A1111's Refiner)")
    p.add_argument("--refiner-switch-at", dest="refiner_switch_at", metavar="F", help="fraction of the steps "
                   "before the refiner takes over (default 0.8)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--cfg-interval", dest="cfg_interval", metavar="A,B", help="guide only the steps i with "
                   "A <= i/steps < B, one UNet pass instead of two on the others (e.g. 0,0.6; changes the image)")
    p.add_argument("--cache-interval", dest="cache_interval", metavar="N", help="DeepCache: recompute the UNet's "
                   "deep features on every N-th call only, reuse them in between (e.g. 3; changes the image)")
    p.add_argument("--preset", choices=sorted(GENERATION_PRESETS), help="fast: LCM sampler, 4 steps, CFG 1 (for "
                   "LCM models or an LCM-LoRA: --lora FILE); with --vae taesd FILE the tiny decoder. Flags win")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder (minutes once "
                   "per machine and image size, cached in ~/.cache/minisd/inductor; then faster steps)")
    p.add_argument("--lora", action="append", metavar="FILE[:W]", help="merge a LoRA/LoCon/LoHa/LoKr file with "
                   "weight W (default 1); repeatable. Prompts may also say <lora:name:W> (see --lora-dir)")
    p.add_argument("--lora-dir", action="append", metavar="DIR", help="where <lora:name:W> finds name.safetensors")
    p.add_argument("--embeddings-dir", action="append", metavar="DIR",
                   help="textual-inversion embeddings, used in prompts by file name")
    p.add_argument("--vae", nargs="+", metavar="FILE", help="another VAE (.safetensors/.ckpt/.pt or diffusers "
                   "folder), or 'taesd FILE' to decode with the tiny autoencoder TAESD")
    p.add_argument("--vae-dir", action="append", metavar="DIR", help="where --from-image finds the VAE an image "
                   "names")
    p.add_argument("--rng", type=str.lower, choices=["cpu", "gpu", "nv"], help="noise source: cpu (default), gpu "
                   "or nv (what torch.randn gives on an NVIDIA GPU, computed on the CPU: A1111's default)")
    p.add_argument("--subseed", "--variation-seed", dest="subseed", metavar="N", help="A1111's variation seed")
    p.add_argument("--subseed-strength", dest="subseed_strength", metavar="F", help="variation seed strength 0..1")
    p.add_argument("--seed-resize-from-w", dest="seed_resize_from_w", metavar="W", help="draw the seed's noise at "
                   "this width (A1111's 'Seed resize from')")
    p.add_argument("--seed-resize-from-h", dest="seed_resize_from_h", metavar="H")
    p.add_argument("--ensd", metavar="N", help="eta noise seed delta: the sampler's noise uses seed + N")
    p.add_argument("--sgm-noise-multiplier", dest="sgm_noise_multiplier", action=argparse.BooleanOptionalAction,
                   default=None, help="start from noise x sqrt(1 + sigma_max^2)")
    if task == "generate":
        p.add_argument("--from-image", metavar="IMAGE", help="reuse the parameters stored in an image's metadata")
        p.add_argument("--hires", action=argparse.BooleanOptionalAction, default=None,
                       help="A1111's Hires. fix: generate, upscale, redraw at the larger size")
        p.add_argument("--hr-scale", dest="hr_scale", metavar="F", help="hires upscale factor (default 2)")
        p.add_argument("--hr-resize-x", dest="hr_resize_x", metavar="W", help="hires target width (instead of scale)")
        p.add_argument("--hr-resize-y", dest="hr_resize_y", metavar="H", help="hires target height")
        p.add_argument("--hr-steps", dest="hr_steps", metavar="N", help="steps of the second pass (default: --steps)")
        p.add_argument("--hr-upscaler", dest="hr_upscaler", metavar="NAME",
                       help="Latent (default), Latent (antialiased|bicubic|bicubic antialiased|nearest|"
                            "nearest-exact), None, Lanczos, Nearest")
        p.add_argument("--hr-strength", "--denoising-strength", dest="hr_strength", metavar="F",
                       help="denoising strength of the second pass (default 0.75)")
    if task in ("img2img", "inpaint"):
        p.add_argument("--init", "--init-img", dest="init", metavar="IMAGE", required=False, help="the starting image")
        p.add_argument("--strength", metavar="F", help="denoising strength 0..1 (default 0.75)")
        p.add_argument("--noise-multiplier", dest="noise_multiplier", metavar="F", help="scale the noise (A1111)")
        p.add_argument("--resize-mode", dest="resize_mode",
                       choices=["Just resize", "Crop and resize", "Resize and fill"])
    if task == "inpaint":
        p.add_argument("--mask", metavar="MASK", help="white (or opaque) = repaint")
        p.add_argument("--mask-blur", dest="mask_blur", metavar="N")
        p.add_argument("--inpaint-only-masked", dest="inpaint_only_masked", action="store_true", default=None,
                       help="generate the mask's neighbourhood at full size and paste it back")
        p.add_argument("--padding", metavar="PX", help="context around the mask for --inpaint-only-masked")
        p.add_argument("--inpaint-mode", dest="inpaint_mode", choices=["minisd", "a1111"],
                       help="minisd (default): re-impose the noised original before each step; a1111: A1111's "
                            "blend into the denoised prediction")
        p.add_argument("--masked-content", dest="masked_content",
                       choices=["original", "latent noise", "latent nothing"], help="A1111's masked content")
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
    info.set_defaults(run=cmd_info)

    convert = sub.add_parser("convert", help="convert a checkpoint: .ckpt -> .safetensors, precision, "
                                             "single file <-> diffusers folder (an OUT without suffix)")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--dtype", choices=DTYPES, help="precision of the written weights (default: as the input stores them)")
    convert.add_argument("--no-ema", action="store_true", help="keep the trained weights, not the EMA copy")
    convert.set_defaults(run=cmd_convert)

    for task, text in (("generate", "text to image"), ("img2img", "image to image"), ("inpaint", "repaint a mask")):
        add_generation_flags(sub.add_parser(task, help=text), task)

    train = sub.add_parser("train", help="train the bundled demo model (autoencoder, then UNet + text encoder)")
    from .train.cli import add_arguments
    add_arguments(train)
    train.set_defaults(run=cmd_train)

    explain = sub.add_parser("explain", help="pictures of the process: noising, steps, guidance, attention, latents")
    from .explain.cli import add_arguments as add_explain_arguments
    add_explain_arguments(explain)
    explain.set_defaults(run=cmd_explain)

    pnginfo = sub.add_parser("pnginfo", help="print the generation parameters stored in an image")
    pnginfo.add_argument("image")
    pnginfo.set_defaults(run=cmd_pnginfo)

    serve = sub.add_parser("serve", help="HTTP server: AUTOMATIC1111-compatible API, OpenAI images API, web page")
    serve.add_argument("--model", "-m", help="startup model (default: $MINISD_MODEL, else the first file of "
                                             "--models-dir, else the demo model)")
    serve.add_argument("--models-dir", metavar="DIR", help="folder of .safetensors/.ckpt files clients may switch to")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--api-auth", metavar="USER:PASS", help="HTTP basic auth (several: comma separated)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-auth")
    serve.add_argument("--max-size", type=int, default=2048, metavar="PX", help="largest width/height (default 2048)")
    serve.add_argument("--max-batch", type=int, default=16, metavar="N", help="most images per request (default 16)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    serve.add_argument("--dtype", choices=DTYPES, help="precision (default: fastest that keeps quality)")
    serve.add_argument("--taesd", metavar="FILE", help="TAESD decoder for the live previews (default: A1111's "
                                                       "fixed latent-to-RGB map)")
    serve.add_argument("--ray", action="store_true", help="run on a Ray cluster as a Ray Serve application "
                                                          "(pip install 'minisd[ray]')")
    serve.add_argument("--address", help="with --ray: the cluster address (default: $RAY_ADDRESS, else local)")
    scaling = serve.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: generation replicas")
    scaling.add_argument("--autoscale", type=replica_range, metavar="MIN,MAX",
                         help="with --ray: scale the generation replicas between MIN and MAX on ongoing requests")
    serve.set_defaults(run=cmd_serve)

    batch = sub.add_parser("batch", help="one image per line of a JSONL file of requests, locally or on Ray")
    batch.add_argument("prompts", help="JSONL file: one request per line, GenerationParams fields "
                                       '(e.g. {"prompt": "a red circle", "seed": 3, "steps": 20}) and optional '
                                       "model, init_image, mask (paths relative to the file)")
    batch.add_argument("--outdir", required=True, help="folder for {index:06d}.png and results.jsonl; "
                                                       "a rerun skips the indices already written")
    batch.add_argument("--model", "-m", help="model of lines that name none (default: $MINISD_MODEL, else demo)")
    batch.add_argument("--seed", type=int, default=0, metavar="N", help="a line without a seed gets N + its line index "
                                                              "(default 0; -1 draws N once)")
    batch.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    batch.add_argument("--dtype", choices=DTYPES, help="precision (default: per device, see `minisd info`)")
    batch.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    batch.add_argument("--ray", action="store_true", help="generate on a Ray cluster (pip install 'minisd[ray]')")
    batch.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    batch.add_argument("--workers", type=int, default=1, metavar="N", help="Ray workers, each loads the model once")
    batch.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="N", help="CPUs of a Ray worker "
                                                                                      "(and its torch threads)")
    batch.add_argument("--gpus-per-worker", type=float, metavar="N", help="GPUs of a Ray worker "
                                                                         "(default: 1 when the cluster has GPUs)")
    batch.set_defaults(run=cmd_batch)
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
