"""Stage 2 of the demo model: the UNet and a small CLIP text encoder trained together from scratch with
DDPM's ε-prediction loss (Ho et al. 2020, Algorithm 1) on latents of the trained autoencoder, 10% of the
captions dropped to "" for classifier-free guidance (Ho & Salimans 2022), and an EMA of the weights."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import load_components, original_state_dict, save_checkpoint
from ..config import ModelConfig
from ..models.clip import CLIPTextModel
from ..models.unet import UNetModel
from ..schedule import DiscreteSchedule
from ..tokenizer import EOS_ID, MAX_LENGTH, CLIPTokenizer
from .autoencoder import load_trained_vae, to_tensor
from .config import TrainConfig
from .loop import (EMA, Budget, learning_rate, load_state, optimizer_step, parameter_count, resolve_device,
                   save_state, step_generator)
from .plot import save_loss_curves
from .shapes import ShapesDataset

DATASET_SEED = 20_000  # added to the run's seed: the images of this stage (the autoencoder trained on others)


def caption_ids(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    """SD 1.x text-encoder input: BOS, the tokens, EOS, padded with EOS to 77 (captions here are short)."""
    ids = tokenizer.encode(text)
    if len(ids) > MAX_LENGTH:
        raise ValueError(f"caption longer than {MAX_LENGTH - 2} tokens: {text!r}")
    return ids + [EOS_ID] * (MAX_LENGTH - len(ids))


def init_unet(unet: UNetModel) -> None:
    """ldm's `zero_module`: the last layer of every residual branch and the output convolution start at
    zero, so the untrained UNet is a stack of identities that predicts ε = 0."""
    zero = [unet.out[2]]
    for name, module in unet.named_modules():
        if name.endswith((".out_layers", ".proj_out")):
            zero.append(module[-1] if isinstance(module, torch.nn.Sequential) else module)
    for module in zero:
        torch.nn.init.zeros_(module.weight)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def init_text_encoder(text_encoder: CLIPTextModel) -> None:
    """Token embeddings N(0, 1), positions N(0, 0.01²). CLIP's own 0.02 for tokens makes a word's embedding
    small against what the blocks add to the residual stream, so words that the UNet does not use yet stay
    nearly invisible in the encoder's output and never get a gradient: with 0.02, "on the left" and "at the
    top" encoded alike after 43 minutes of training and position stayed at chance (22%); with N(0, 1) every
    word is distinct from the first step: position at 50% after 12 minutes, 100% after the 60-minute run."""
    embeddings = text_encoder.text_model.embeddings
    torch.nn.init.normal_(embeddings.token_embedding.weight, std=1.0)
    torch.nn.init.normal_(embeddings.position_embedding.weight, std=0.01)


@torch.no_grad()
def encode_dataset(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Draw `num_latents` images and captions and encode the images once with the trained autoencoder:
    posterior means and standard deviations, so every step can sample z ~ q(z|x) as SD's training did."""
    vae, vae_config, _ = load_trained_vae(Path(cfg.out_dir) / "vae.pt", device)
    dataset = ShapesDataset(cfg.seed + DATASET_SEED, size=cfg.image_size, omit_prob=cfg.diffusion.omit_prob)
    count, means, stds, captions = cfg.diffusion.num_latents, [], [], []
    for start in tqdm(range(0, count, 64), desc="encoding latents", unit="batch", dynamic_ncols=True):
        samples = [dataset[i] for i in range(start, min(count, start + 64))]
        mean, logvar = vae.encode_moments(to_tensor([s.image for s in samples]).to(device))
        means.append(mean.float().cpu())
        stds.append((0.5 * logvar).exp().float().cpu())
        captions += [s.caption for s in samples]
    return {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions,
            "scaling_factor": vae_config.scaling_factor}


def diffusion_loss(unet: UNetModel, text_encoder: CLIPTextModel, x0: torch.Tensor, ids: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """‖ε − ε_θ(√ᾱ_t x0 + √(1 − ᾱ_t) ε, t, c)‖² (Algorithm 1, line 5), with c the encoded caption."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(x_t, t, text_encoder(ids)), noise)


def prepare_output(cfg: TrainConfig) -> None:
    """Refuse early (before an hour of training) to overwrite an existing model without --overwrite."""
    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it or --output to write elsewhere")


def train_diffusion(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the UNet + text-encoder stage and write the final model (EMA weights, fp16, one
    original-layout .safetensors). Returns the facts the model card reports."""
    prepare_output(cfg)
    out, tc, device = Path(cfg.out_dir), cfg.diffusion, resolve_device(cfg.device)
    state_path, latents_path = out / "diffusion_state.pt", out / "latents.pt"
    state: dict[str, Any] = load_state(state_path) if cfg.resume and state_path.exists() else {}

    started = time.monotonic()
    if latents_path.exists() and cfg.resume:
        data = load_state(latents_path)
    else:
        data = encode_dataset(cfg, device)
        save_state(latents_path, data)
    encode_minutes = (time.monotonic() - started) / 60
    tokenizer = CLIPTokenizer()
    unique = {caption: i for i, caption in enumerate(dict.fromkeys(data["captions"]))}
    vocabulary = torch.tensor([caption_ids(tokenizer, c) for c in unique])  # (captions, 77)
    caption_index = torch.tensor([unique[c] for c in data["captions"]])
    empty_ids = torch.tensor(caption_ids(tokenizer, ""))
    mean, std, scale = data["mean"], data["std"], data["scaling_factor"]
    alphas_cumprod = DiscreteSchedule.from_config(cfg.model.schedule).alphas_cumprod.float().to(device)

    torch.manual_seed(cfg.seed)  # the initial weights
    unet, text_encoder = UNetModel(cfg.model.unet), CLIPTextModel(cfg.model.text)
    init_unet(unet)
    init_text_encoder(text_encoder)
    unet, text_encoder = unet.to(device), text_encoder.to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMA([unet, text_encoder], tc.ema_decay)
    step, losses = 0, []
    if state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        step, losses = state["step"], list(state["losses"])
        print(f"diffusion: resuming at step {step}")
    budget = Budget(tc.steps, tc.minutes, state.get("elapsed", 0.0))

    def checkpoint() -> None:
        save_state(state_path, {"stage": "diffusion", "step": step, "elapsed": budget.elapsed,
                                "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                                "optimizer": optimizer.state_dict(), "ema": ema.state_dict(), "losses": losses})
        save_loss_curves(out / "diffusion_loss.png", {"diffusion loss (ε-prediction MSE)": losses})

    print(f"diffusion: UNet {parameter_count(unet) / 1e6:.2f}M + text encoder {parameter_count(text_encoder) / 1e6:.2f}M "
          f"parameters, {len(mean)} latents ({len(unique)} distinct captions), {tc.steps} steps of {tc.batch_size} "
          f"(or {tc.minutes} min) on {device}")
    bar = tqdm(total=tc.steps, initial=step, desc="diffusion", unit="step", dynamic_ncols=True)
    unet.train()
    text_encoder.train()
    while not budget.finished(step):
        lr = learning_rate(tc.lr, step, budget.progress(step), tc.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # All of this step's randomness from its own generator: a resumed run draws the same batches.
        g = step_generator(cfg.seed, step)
        index = torch.randint(len(mean), (tc.batch_size,), generator=g)
        t = torch.randint(0, len(alphas_cumprod), (tc.batch_size,), generator=g)
        noise = torch.randn((tc.batch_size, *mean.shape[1:]), generator=g)
        posterior = torch.randn((tc.batch_size, *mean.shape[1:]), generator=g)
        drop = torch.rand(tc.batch_size, generator=g) < tc.uncond_prob
        x0 = (mean[index] + std[index] * posterior) * scale  # z ~ q(z|x), scaled to unit variance
        ids = torch.where(drop[:, None], empty_ids, vocabulary[caption_index[index]])
        loss = diffusion_loss(unet, text_encoder, x0.to(device), ids.to(device), t.to(device), noise.to(device),
                              alphas_cumprod)
        losses.append(optimizer_step(optimizer, loss, params, tc.grad_clip, "diffusion", step))
        ema.update()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
        if step % cfg.save_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    train_minutes = budget.elapsed / 60

    # The shipped weights are the EMA weights, in fresh copies of the networks.
    unet_ema, text_ema = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema.copy_to([unet_ema, text_ema])
    vae, vae_config, vae_metrics = load_trained_vae(out / "vae.pt", torch.device("cpu"))
    config = ModelConfig(variant="sd1", image_size=cfg.image_size, unet=cfg.model.unet, vae=vae_config,
                         text=cfg.model.text, schedule=cfg.model.schedule)
    output = Path(cfg.output)
    prepare_output(cfg)
    if output.exists():
        output.unlink()  # --overwrite, checked above
    output.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(output, original_state_dict(unet_ema.cpu(), vae, text_ema.cpu()), config, dtype=torch.float16)
    load_components(output, device="cpu", dtype=torch.float32)  # the written file loads with its config
    print(f"diffusion: {step} steps in {train_minutes:.1f} min; wrote {output} "
          f"({output.stat().st_size / 2**20:.1f} MiB)")
    return {"config": config, "output": output, "file_mib": output.stat().st_size / 2**20,
            "steps": step, "train_minutes": train_minutes, "encode_minutes": encode_minutes,
            "final_loss": float(np.mean(losses[-100:])), "latents": len(mean), "captions": len(unique),
            "parameters": {"unet": parameter_count(unet), "text_encoder": parameter_count(text_encoder),
                           "vae": parameter_count(vae)},
            "vae": vae_metrics, "losses": losses}
