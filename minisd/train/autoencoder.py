"""Stage 1 of the demo model: the KL autoencoder (Rombach et al. 2022, §3 and App. G) trained on fresh
shapes images every step with an L1 + edge reconstruction loss and a small KL term; its latent scaling
factor is 1/std of the latents, as SD's 0.18215 was measured."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..config import VAEConfig
from ..models.vae import AutoencoderKL
from .config import TrainConfig, VAETrainConfig
from .detector import check
from .loop import (Budget, learning_rate, load_state, optimizer_step, parameter_count, resolve_device, save_state,
                   step_generator)
from .plot import save_loss_curves
from .shapes import ShapesDataset

HELD_OUT_SEED = 10_000  # added to the run's seed: images the autoencoder never trains on


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float in [−1, 1]."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [−1, 1] -> PIL RGB images (rounded, clamped)."""
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def image_batch(dataset: ShapesDataset, step: int, batch_size: int) -> torch.Tensor:
    """Batch `step` of the image stream: consecutive dataset items, so every step sees new images."""
    return to_tensor([dataset[(step * batch_size + j) % len(dataset)].image for j in range(batch_size)])


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between horizontal and vertical finite differences: blurred edges cost extra."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def foreground_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): `weight` where a pixel differs from its image's median colour
    (the background, which covers most of every image), 1 elsewhere."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    return 1.0 + (weight - 1.0) * ((x - background).abs().sum(1, keepdim=True) > 0.1).float()


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, noise: torch.Tensor, cfg: VAETrainConfig
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 (object pixels weighted up) + edge reconstruction of a posterior sample z = μ + σ·n, plus
    β·KL(q(z|x) ‖ N(0, I)) averaged per latent element (KL of diagonal Gaussians:
    ½(μ² + σ² − 1 − log σ²))."""
    mean, logvar = vae.encode_moments(x)
    z = mean + (0.5 * logvar).exp() * noise
    reconstruction = vae.decode(z)
    l1 = ((reconstruction - x).abs() * foreground_weight(x, cfg.object_weight)).mean()
    edge = edge_l1(reconstruction, x)
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + cfg.edge_weight * edge + cfg.kl_weight * kl
    return loss, {"l1": l1.item(), "edge": edge.item(), "kl": kl.item()}


@torch.no_grad()
def scaling_factor(vae: AutoencoderKL, dataset: ShapesDataset, batches: int, batch_size: int,
                   device: torch.device) -> float:
    """1/std of posterior samples over `batches` batches, so the diffusion model sees unit-variance latents."""
    samples = []
    for b in range(batches):
        x = image_batch(dataset, b, batch_size).to(device, memory_format=torch.channels_last)
        mean, logvar = vae.encode_moments(x)
        noise = torch.randn(mean.shape, generator=step_generator(0, b)).to(device)
        samples.append((mean + (0.5 * logvar).exp() * noise).float().cpu())
    return 1.0 / torch.cat(samples).std().item()


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKL, dataset: ShapesDataset, count: int, device: torch.device
                          ) -> dict[str, float]:
    """Mean absolute error (0-255 scale) of reconstructed held-out images and the share whose every
    attribute the detector still reads correctly."""
    errors, correct = [], 0
    for start in range(0, count, 32):
        samples = [dataset[i] for i in range(start, min(count, start + 32))]
        x = to_tensor([s.image for s in samples]).to(device, memory_format=torch.channels_last)
        out = vae.decode(vae.encode(x))
        errors.append(((out.clamp(-1, 1) - x).abs().mean() * 127.5).item())
        correct += sum(check(image, s.truth)["all"] for image, s in zip(to_images(out), samples))
    return {"mae_255": float(np.mean(errors)), "detector_accuracy": correct / count}


def init_vae(vae: AutoencoderKL, initial_logvar: float = -6.0) -> None:
    """Zero the last layer of every residual branch (ResNet blocks, attention), so each block starts as the
    identity (as ldm's `zero_module` does for the UNet), and start the posterior narrow (σ ≈ 0.05): at the
    default σ ≈ 1 the decoder would first see mostly noise and learn to output average colours."""
    for name, module in vae.named_modules():
        if name.endswith((".conv2", ".proj_out")):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = initial_logvar  # second half of the moments: log σ²


def train_vae(cfg: TrainConfig) -> Path:
    """Train (or resume) the autoencoder stage; writes `out_dir/vae.pt` (config with the measured scaling
    factor, weights, metrics) and returns its path."""
    out, tc, device = Path(cfg.out_dir), cfg.vae, resolve_device(cfg.device)
    state_path, final_path = out / "vae_state.pt", out / "vae.pt"
    state: dict[str, Any] = load_state(state_path) if cfg.resume and state_path.exists() else {}
    if state.get("finished") and final_path.exists() and \
            Budget(tc.steps, tc.minutes, state["elapsed"]).progress(state["step"]) >= 1.0:
        print(f"vae: already trained ({final_path}); skipping (raise --vae-steps/--vae-minutes to continue)")
        return final_path

    torch.manual_seed(cfg.seed)  # the initial weights
    vae = AutoencoderKL(cfg.model.vae)
    init_vae(vae)
    vae = vae.to(device, memory_format=torch.channels_last)  # NHWC: faster CPU convolutions
    optimizer = torch.optim.AdamW(vae.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, losses = 0, []
    if state:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], list(state["losses"])
        print(f"vae: resuming at step {step}")
    dataset = ShapesDataset(cfg.seed, size=cfg.image_size)
    budget = Budget(tc.steps, tc.minutes, state.get("elapsed", 0.0))

    def checkpoint(finished: bool = False) -> None:
        save_state(state_path, {"stage": "vae", "step": step, "elapsed": budget.elapsed, "finished": finished,
                                "model": vae.state_dict(), "optimizer": optimizer.state_dict(), "losses": losses})
        save_loss_curves(out / "vae_loss.png", {"autoencoder loss (L1 + edge + KL)": losses})

    print(f"vae: {parameter_count(vae) / 1e6:.2f}M parameters, {tc.steps} steps of {tc.batch_size} images "
          f"(or {tc.minutes} min) on {device}")
    bar = tqdm(total=tc.steps, initial=step, desc="vae", unit="step", dynamic_ncols=True)
    vae.train()
    while not budget.finished(step):
        lr = learning_rate(tc.lr, step, budget.progress(step), tc.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = image_batch(dataset, step, tc.batch_size).to(device, memory_format=torch.channels_last)
        noise = torch.randn(x.shape[0], cfg.model.vae.latent_channels, x.shape[2] // 8, x.shape[3] // 8,
                            generator=step_generator(cfg.seed, step)).to(device)
        loss, parts = vae_loss(vae, x, noise, tc)
        losses.append(optimizer_step(optimizer, loss, vae.parameters(), tc.grad_clip, "vae", step))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", l1=f"{parts['l1']:.4f}", lr=f"{lr:.2e}")
        if step % cfg.save_every == 0:
            checkpoint()
    bar.close()
    train_minutes = budget.elapsed / 60
    vae.eval()
    held_out = ShapesDataset(cfg.seed + HELD_OUT_SEED, size=cfg.image_size)
    started = time.monotonic()
    factor = scaling_factor(vae, held_out, tc.scale_batches, tc.batch_size, device)
    metrics = reconstruction_report(vae, held_out, tc.eval_images, device)
    metrics |= {"steps": step, "minutes": train_minutes, "final_loss": float(np.mean(losses[-50:])),
                "parameters": parameter_count(vae), "scaling_factor": factor,
                "eval_seconds": time.monotonic() - started, "train_config": dataclasses.asdict(tc)}
    config = dataclasses.replace(cfg.model.vae, scaling_factor=round(factor, 5))
    weights = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    save_state(final_path, {"config": dataclasses.asdict(config), "state_dict": weights, "metrics": metrics})
    checkpoint(finished=True)
    for stale in ("latents.pt", "diffusion_state.pt"):  # made with the previous autoencoder's latents
        (out / stale).unlink(missing_ok=True)
    print(f"vae: {step} steps in {budget.elapsed / 60:.1f} min; scaling factor {factor:.4f}; reconstruction "
          f"MAE {metrics['mae_255']:.2f}/255, detector accuracy on reconstructions {metrics['detector_accuracy']:.1%}")
    return final_path


def load_trained_vae(path: Path, device: torch.device) -> tuple[AutoencoderKL, VAEConfig, dict[str, float]]:
    """The autoencoder written by `train_vae`, in eval mode, with its config and metrics."""
    saved = load_state(path)
    config = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
    vae = AutoencoderKL(config)
    vae.load_state_dict(saved["state_dict"])
    return vae.to(device).eval().requires_grad_(False), config, saved["metrics"]
