"""The demo model's architecture (a small SD 1.x-layout model for 64×64 images) and every hyperparameter
of its two training stages, as dataclasses that the command line fills."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import PRESETS, ModelConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"

DEMO_MODEL = PRESETS["demo"]  # the architecture: config.py's "demo" preset


@dataclass
class VAETrainConfig:
    """Autoencoder stage: L1 + edge reconstruction with a small KL term, on fresh images every step."""
    steps: int = 2400
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    edge_weight: float = 1.0   # L1 between image gradients: keeps the shapes' edges sharp
    object_weight: float = 5.0  # L1 weight of object pixels: the object is ~12% of the pixels but all the content
    kl_weight: float = 1e-5    # per latent element, relative to the per-pixel L1
    minutes: float | None = 15.0  # time budget; the learning-rate schedule is stretched over it
    scale_batches: int = 8     # batches whose latents set the scaling factor (1/std, as SD did)
    eval_images: int = 256     # held-out images whose reconstructions are measured at the end


@dataclass
class DiffusionTrainConfig:
    """UNet + text-encoder stage: ε-prediction MSE at uniform t (DDPM Algorithm 1) on pre-encoded latents."""
    steps: int = 7000
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    uncond_prob: float = 0.1   # captions dropped to "" so that classifier-free guidance works
    omit_prob: float = 0.1     # captions that leave out the position or the background (each)
    num_latents: int = 30000   # images encoded once by the trained autoencoder
    minutes: float | None = 60.0


@dataclass
class TrainConfig:
    """One training run: where it writes, on what device, and the two stages' settings."""
    out_dir: Path = Path("outputs/demo-train")
    output: Path = ASSETS / "demo.safetensors"
    card: Path | None = ASSETS / "DEMO_MODEL.md"
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)
    image_size: int = 64       # the side of the training images (the latents are 8× smaller)
    save_every: int = 250      # steps between resumable checkpoints of the run state
    resume: bool = False
    overwrite: bool = False    # replace an existing output model
    eval_prompts: int = 100    # prompts of the adherence check written into the model card (0: none)
    model: ModelConfig = DEMO_MODEL
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    diffusion: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    command: str = ""          # the command line that started the run, for the model card
