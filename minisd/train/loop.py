"""What both training stages share: a run's progress against its step and time budgets, the learning-rate
schedule (linear warm-up, cosine decay), an exponential moving average of weights, the per-step random
generator that makes a resumed run see the same batches, and the resumable run-state file."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn


class Budget:
    """Progress of a run in [0, 1]: the larger of steps done / steps and minutes spent / minutes, so a run
    on a slow machine ends on time with its learning-rate schedule complete."""

    def __init__(self, steps: int, minutes: float | None, elapsed: float = 0.0):
        self.steps, self.seconds = steps, None if minutes is None else minutes * 60.0
        self.start = time.monotonic() - elapsed  # a resumed run continues its clock

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self, step: int) -> float:
        done = step / self.steps
        if self.seconds:
            done = max(done, self.elapsed / self.seconds)
        return min(done, 1.0)

    def finished(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def learning_rate(base: float, step: int, progress: float, warmup_steps: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up over the first steps (Adam's early updates are noisy), then cosine decay from `base`
    to `final_fraction·base` as progress goes from 0 to 1."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cosine = final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return base * warm * cosine


class EMA:
    """Exponential moving average of parameters (Polyak averaging), with CompVis `LitEma`'s warm-up:
    the decay is min(decay, (1 + n) / (10 + n)) after n updates, so early weights are soon forgotten."""

    def __init__(self, modules: Iterable[nn.Module], decay: float):
        self.decay, self.updates = decay, 0
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, modules: Iterable[nn.Module]) -> None:
        """Write the averaged weights into modules of the same architecture (in the same order)."""
        targets = [p for m in modules for p in m.parameters()]
        for target, value in zip(targets, self.shadow, strict=True):
            target.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for mine, saved in zip(self.shadow, state["shadow"], strict=True):
            mine.copy_(saved)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters: Iterable[torch.Tensor],
                   grad_clip: float, stage: str, step: int) -> float:
    """One update: backpropagate, clip the gradient norm, step. Returns the loss; a loss that is no longer
    finite stops the run rather than writing a broken model."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"{stage}: loss became {value} at step {step + 1}")
    return value


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one step's randomness (batch, timesteps, noise): a resumed run draws exactly
    what the uninterrupted run would have drawn, without saving generator states."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a run state atomically: a crash while saving leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    # Only tensors, numbers, strings and containers: the safe loader suffices.
    return torch.load(path, map_location="cpu", weights_only=True)


def parameter_count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
