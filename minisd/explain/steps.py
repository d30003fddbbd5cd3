"""`minisd explain steps PROMPT`: the reverse process of one generation. At every sampler step the current
sample x (decoded at the model's scale, x / √(σ² + 1) = √ᾱ x_0 + √(1 − ᾱ) ε) and the denoiser's prediction
x̂_0 = D(x, σ), read through the sampler callback; the σ schedule the sampler walks is plotted beside them."""
from __future__ import annotations

import torch
from PIL import Image

from . import Explanation
from .drawing import figure_image, labelled_grid, new_figure, side_by_side
from .latents import decode


def generate_recorded(sd, prompt: str, **options) -> tuple[list, list[dict]]:
    """txt2img with every sampler step's σ, x and x̂_0 recorded (copies, on the CPU)."""
    records: list[dict] = []

    def callback(info: dict) -> None:
        records.append({"i": info["i"], "sigma": float(info["sigma"]), "sigma_hat": float(info["sigma_hat"]),
                        "x": info["x"][:1].float().cpu().clone(), "denoised": info["denoised"][:1].float().cpu().clone()})

    images = sd.txt2img(prompt, callback=callback, **options)
    return images, records


def sigma_plot(sigmas: list[float], width: int, height: int) -> Image.Image:
    """σ_i against the step i on a log axis, the last σ = 0 drawn at the bottom edge."""
    figure = new_figure(width, height)
    ax = figure.add_subplot()
    steps = list(range(len(sigmas)))
    ax.semilogy(steps[:-1], sigmas[:-1], "o-", ms=3, lw=1)
    ax.set_xlabel("step i", fontsize=8)
    ax.set_ylabel("σ_i (log)", fontsize=8)
    ax.set_title(f"σ schedule: {sigmas[0]:.3g} → {sigmas[-2]:.3g} → 0", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    return figure_image(figure)


def explain_steps(sd, prompt: str, *, cell: int = 72, **options) -> Explanation:
    """Two rows, one column per step: x_t and x̂_0, decoded; `options` are GenerationParams fields."""
    options.setdefault("seed", 1)
    images, records = generate_recorded(sd, prompt, **options)
    sigmas = [r["sigma"] for r in records] + [0.0]
    xs = torch.cat([r["x"] / (r["sigma_hat"] ** 2 + 1) ** 0.5 for r in records])
    x_images = decode(sd, xs)
    x0_images = decode(sd, torch.cat([r["denoised"] for r in records]))
    captions = [[f"step {r['i']}\nσ = {r['sigma']:.3g}" for r in records] + ["result"], [""] * len(records)]
    grid = labelled_grid([x_images + [images[0]], x0_images], captions=captions, cell=cell,
                         row_labels=["x_t", "x̂_0 = D(x, σ)"],
                         title=f'"{prompt}": {len(records)} steps; x_t = x / √(σ² + 1), the UNet\'s input; '
                               "x̂_0 the denoiser's prediction of the clean image")
    plot = sigma_plot(sigmas, 320, max(grid.height, 220))
    frames = [labelled_grid([[a, b]], captions=[[f"x_t   step {r['i']}, σ = {r['sigma']:.3g}", "x̂_0"]],
                            cell=2 * cell) for a, b, r in zip(x_images, x0_images, records)]
    frames.append(labelled_grid([[images[0]]], captions=[["the result"]], cell=2 * cell))
    facts = {"sigmas": sigmas, "steps": len(records), "image": images[0]}
    return Explanation(side_by_side(grid, plot), frames, facts)
