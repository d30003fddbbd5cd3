"""`minisd train [vae|unet|all]`: train the bundled demo model. Stage 1 trains the autoencoder, stage 2 the
UNet and text encoder and writes one fp16 .safetensors with a model card; `--resume` continues a run."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import torch

from .config import DiffusionTrainConfig, TrainConfig, VAETrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `minisd train` (so the main CLI can mount them as a subcommand)."""
    v, d, c = VAETrainConfig(), DiffusionTrainConfig(), TrainConfig()
    parser.add_argument("stage", nargs="?", choices=("vae", "unet", "all"), default="all",
                        help="vae: the autoencoder; unet: the UNet and text encoder (needs a trained vae in "
                             "--out-dir); all: both (default)")
    parser.add_argument("--out-dir", type=Path, default=c.out_dir, help=f"run folder (default {c.out_dir})")
    parser.add_argument("--output", type=Path, default=c.output, help="the model file (default: the bundled demo)")
    parser.add_argument("--card", default=str(c.card), help="model card path, or 'none'")
    parser.add_argument("--device", default=c.device, help="cpu (default), cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=c.seed)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); on a busy machine 1 can be faster")
    parser.add_argument("--resume", action="store_true", help="continue from the run state in --out-dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--save-every", type=int, default=c.save_every, help="steps between run-state saves")
    parser.add_argument("--eval-prompts", type=int, default=c.eval_prompts,
                        help="prompts of the adherence check in the model card (0: skip the evaluation)")
    for prefix, defaults, minutes in (("vae", v, "15"), ("unet", d, "60")):
        parser.add_argument(f"--{prefix}-steps", type=int, default=defaults.steps)
        parser.add_argument(f"--{prefix}-batch-size", type=int, default=defaults.batch_size)
        parser.add_argument(f"--{prefix}-lr", type=float, default=defaults.lr)
        parser.add_argument(f"--{prefix}-minutes", type=float, default=defaults.minutes,
                            help=f"time budget of the stage (default {minutes}; 0: none); the learning-rate "
                                 f"schedule ends at whichever of steps and minutes comes first")
    parser.add_argument("--num-latents", type=int, default=d.num_latents, help="images encoded for stage 2")


def config_from_args(args: argparse.Namespace, command: str) -> TrainConfig:
    def minutes(value: float | None) -> float | None:
        return value if value else None

    vae = dataclasses.replace(VAETrainConfig(), steps=args.vae_steps, batch_size=args.vae_batch_size, lr=args.vae_lr,
                              minutes=minutes(args.vae_minutes))
    diffusion = dataclasses.replace(DiffusionTrainConfig(), steps=args.unet_steps, batch_size=args.unet_batch_size,
                                    lr=args.unet_lr, minutes=minutes(args.unet_minutes), num_latents=args.num_latents)
    return TrainConfig(out_dir=args.out_dir, output=args.output,
                       card=None if args.card.lower() == "none" else Path(args.card), device=args.device,
                       seed=args.seed, threads=args.threads, save_every=args.save_every, resume=args.resume,
                       overwrite=args.overwrite,
                       eval_prompts=args.eval_prompts, vae=vae, diffusion=diffusion, command=command)


def finish(cfg: TrainConfig, facts: dict) -> None:
    """Evaluate the written model (optional) and write the model card, its loss curves and samples."""
    from ..pipeline import load
    from ..image import image_grid
    from .evaluate import evaluation_report
    from .loop import load_state
    from .plot import save_loss_curves

    evaluation, images = None, {}
    card = cfg.card
    if card is not None:
        card.parent.mkdir(parents=True, exist_ok=True)
        vae_state = Path(cfg.out_dir) / "vae_state.pt"
        vae_losses = load_state(vae_state)["losses"] if vae_state.exists() else []
        loss_png = card.with_name(card.stem + "_loss.png")
        save_loss_curves(loss_png, {"autoencoder loss": vae_losses, "diffusion loss": facts["losses"]})
        images["training loss"] = loss_png.name
    if cfg.eval_prompts:
        print(f"evaluating {facts['output']} on {cfg.eval_prompts} prompts ...")
        sd = load(facts["output"], device=cfg.device)
        evaluation, results = evaluation_report(sd, cfg.eval_prompts, image_checks=min(20, cfg.eval_prompts),
                                                    size=cfg.image_size)
        print(evaluation)
        if card is not None:
            samples = card.with_name(card.stem + "_samples.png")
            image_grid(results[-1].images[:32], cols=8).save(samples)
            images["samples at the default CFG for the first evaluation prompts"] = samples.name
    if card is not None:
        from .card import model_card

        card.write_text(model_card(cfg, facts, evaluation, images))
        print(f"wrote {card}")


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Run the stages that `args.stage` names; `command` is the command line the model card records
    (default: this process's own)."""
    from .autoencoder import train_vae
    from .diffusion import prepare_output, train_diffusion

    cfg = config_from_args(args, command or shlex.join(["minisd", *sys.argv[1:]]))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if args.stage in ("unet", "all"):
        prepare_output(cfg)  # fail now, not after the autoencoder's quarter of an hour
    if args.stage in ("vae", "all"):
        train_vae(cfg)
    if args.stage in ("unet", "all"):
        if not (Path(cfg.out_dir) / "vae.pt").exists():
            print(f"error: no trained autoencoder in {cfg.out_dir}; run `minisd train vae` first", file=sys.stderr)
            return 2
        facts = train_diffusion(cfg)
        finish(cfg, facts)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `minisd train ...` and `python -m minisd.train ...` (argv: the words after `train`)."""
    parser = argparse.ArgumentParser(prog="minisd train", description=__doc__)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # tiny EMA / Adam values must not slow the CPU down
    return run(args, shlex.join(["minisd", "train", *argv]))
