"""The demo model's model card (Markdown), written from the facts of the run that made the model: data,
sizes, parameter counts, training time and hardware, evaluation, and the command that reproduces it."""
from __future__ import annotations

import dataclasses
import datetime
import platform
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .shapes import COLORS, POSITIONS, SHAPES, CaptionSpec


def hardware(device: torch.device) -> str:
    """The processor that trained the model, in words."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads (CPU)"


def model_card(cfg: TrainConfig, facts: dict[str, Any], evaluation: str | None, images: dict[str, str]) -> str:
    """The card's Markdown. `facts` come from `train_diffusion`, `evaluation` is a Markdown section or None,
    `images` maps a caption to a file name beside the card."""
    config, vae, params = facts["config"], facts["vae"], facts["parameters"]
    u, v, t, td = config.unet, config.vae, config.text, cfg.diffusion
    # The autoencoder's settings as it was trained (its stage may have run under another command).
    tv = dataclasses.replace(cfg.vae, **vae.get("train_config", {}))
    example = CaptionSpec("circle", "red", "left", "blue").text
    total = sum(params.values())
    lines = [
        "# minisd demo model",
        "",
        "A small text-to-image latent diffusion model in the Stable Diffusion 1.x layout (UNet, KL autoencoder, "
        "CLIP text encoder; original single-file key names), trained from scratch by `minisd train` on a "
        "synthetic dataset. It draws one shape on a plain background at 64×64 pixels:",
        "",
        "```",
        f'minisd generate "{example}"   # the default model; 64×64 is its default size',
        "```",
        "",
        "## Data",
        "",
        f"Synthetic and index-deterministic (`minisd/train/shapes.py`): one {', '.join(SHAPES)} in one of "
        f"{len(COLORS)} colours ({', '.join(COLORS)}) at one of {len(POSITIONS)} positions ({', '.join(POSITIONS)}) "
        f"on a background of another of those colours; size and position jitter a little. Captions such as "
        f'"{example}"; {td.omit_prob:.0%} of them leave out the position and {td.omit_prob:.0%} the background, '
        f'and {td.uncond_prob:.0%} are dropped to "" during training for classifier-free guidance. '
        f"The autoencoder saw {facts['vae']['steps'] * tv.batch_size:,} fresh images; the diffusion model "
        f"{facts['latents']:,} pre-encoded images with {facts['captions']:,} distinct captions.",
        "",
        "## Model",
        "",
        "| component | configuration | parameters |",
        "|---|---|---|",
        f"| UNet | {u.model_channels} channels × {u.channel_mult}, {u.num_res_blocks} res blocks per level, "
        f"attention at levels {u.attention_levels} and the middle, {u.num_heads} heads, context {u.context_dim} "
        f"| {params['unet']:,} |",
        f"| autoencoder | {v.channels} channels × {v.channel_mult}, {v.num_res_blocks} res block, "
        f"{v.latent_channels} latent channels (f = 8: 64×64 ↔ {v.latent_channels}×8×8), scaling factor "
        f"{v.scaling_factor:g} | {params['vae']:,} |",
        f"| text encoder | CLIP, width {t.hidden_size}, {t.num_hidden_layers} layers, {t.num_attention_heads} "
        f"head(s), the standard {t.vocab_size}-token vocabulary and tokenizer | {params['text_encoder']:,} |",
        f"| total | {facts['file_mib']:.1f} MiB as fp16 safetensors, EMA weights | {total:,} |",
        "",
        "Schedule: DDPM scaled-linear β from 0.00085 to 0.012 over 1000 steps, ε-prediction (SD 1.x).",
        "",
        "## Training",
        "",
        f"Hardware: {hardware(torch.device(cfg.device))}; torch {torch.__version__}; "
        f"finished {datetime.date.today().isoformat()}.",
        "",
        "| stage | steps × batch | learning rate | time | final loss |",
        "|---|---|---|---|---|",
        f"| autoencoder: L1 (object pixels ×{tv.object_weight:g}) + {tv.edge_weight:g}·edge L1 "
        f"+ {tv.kl_weight:g}·KL | {vae['steps']:,} × {tv.batch_size} "
        f"| {tv.lr:g}, warm-up {tv.warmup_steps}, cosine | {vae['minutes']:.1f} min | {vae['final_loss']:.4f} |",
        f"| latents: {facts['latents']:,} images encoded once | | | {facts['encode_minutes']:.1f} min | |",
        f"| UNet + text encoder: ε-MSE at uniform t, EMA {td.ema_decay:g} | {facts['steps']:,} × {td.batch_size} "
        f"| {td.lr:g}, warm-up {td.warmup_steps}, cosine | {facts['train_minutes']:.1f} min "
        f"| {facts['final_loss']:.4f} |",
        "",
        f"Autoencoder on held-out images: mean absolute error {vae['mae_255']:.2f}/255; the detector reads "
        f"{vae['detector_accuracy']:.1%} of the reconstructions correctly.",
        "",
    ]
    for caption, name in images.items():
        lines += [f"![{caption}]({name})", ""]
    if evaluation:
        lines += [evaluation, ""]
    lines += ["## Reproduce", "", "```", cfg.command or "minisd train all", "```", ""]
    return "\n".join(lines)
