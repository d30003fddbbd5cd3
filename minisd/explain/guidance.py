"""`minisd explain guidance PROMPT --scales 0,1,3,7.5,15`: classifier-free guidance (Ho & Salimans 2022). The
same seed at several guidance scales s, and at one step the two predictions it combines, the conditional
ε(x, c) and the unconditional ε(x, ∅), their difference, and the guided ε_∅ + s (ε_c − ε_∅)."""
from __future__ import annotations

import torch

from ..denoiser import make_denoiser
from ..errors import ParameterError
from ..prompts import encode_prompt_pair
from . import Explanation
from .drawing import heatmap, labelled_grid
from .latents import decode
from .steps import generate_recorded

DEFAULT_SCALES = (0.0, 1.0, 3.0, 7.5, 15.0)


def predictions_at(sd, prompt: str, negative_prompt: str, x: torch.Tensor, sigma: float, clip_skip: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """D(x, σ) with the prompt and with the negative prompt ("" = unconditional), as CFGDenoiser forms them."""
    cond, uncond = encode_prompt_pair(sd.text_encoder, sd.tokenizer, prompt, negative_prompt, clip_skip=clip_skip)

    def unet(x_in, t, context):
        return sd.unet(x_in.to(sd.dtype), t, context.to(sd.dtype)).float()

    model = make_denoiser(unet, sd.schedule)
    x = x.to(sd.device)
    return model(x, sigma, cond).cpu(), model(x, sigma, uncond).cpu()


def explain_guidance(sd, prompt: str, *, scales=DEFAULT_SCALES, at_scale: float | None = None,
                     at_step: int | None = None, cell: int = 96, **options) -> Explanation:
    """One image per scale (same seed), and the predictions at step `at_step` (default: a quarter of the way)
    of the run at `at_scale` (default: 7.5 if among the scales, else the largest)."""
    scales = [float(s) for s in scales]
    if not scales:
        raise ParameterError("--scales needs at least one guidance scale")
    options.setdefault("seed", 1)
    at_scale = (7.5 if 7.5 in scales else max(scales)) if at_scale is None else float(at_scale)
    images, chosen = [], None
    for scale in scales:
        result, records = generate_recorded(sd, prompt, cfg_scale=scale, **options)
        images.append(result[0])
        if scale == at_scale:
            chosen = records
    if chosen is None:
        raise ParameterError(f"the step shown is taken from the run at scale {at_scale}, which is not among --scales")
    step = len(chosen) // 4 if at_step is None else at_step
    if not 0 <= step < len(chosen):
        raise ParameterError(f"--at-step must be in 0..{len(chosen) - 1}")
    record = chosen[step]
    sigma = record["sigma_hat"]
    negative = options.get("negative_prompt", "")
    with torch.inference_mode():
        d_cond, d_uncond = predictions_at(sd, prompt, negative, record["x"], sigma, options.get("clip_skip", 1))
    guided = d_uncond + at_scale * (d_cond - d_uncond)
    # In ε terms, ε = (x − D)/σ: the guidance direction is ε_c − ε_∅ = (D_∅ − D_c)/σ.
    eps_difference = ((d_uncond - d_cond) / sigma)[0]
    decoded = decode(sd, torch.cat([d_uncond, d_cond, guided]))
    magnitude = eps_difference.norm(dim=0)
    top = float(eps_difference.abs().max())
    rows = [images, [*decoded, heatmap(magnitude, 0, float(magnitude.max()) or 1.0, "magma")],
            [heatmap(c, -top, top, "coolwarm") for c in eps_difference]]
    captions = [[f"s = {s:g}" for s in scales],
                ["x̂_0 with ∅", "x̂_0 with c", f"x̂_0 guided\ns = {at_scale:g}",
                 f"‖ε_c − ε_∅‖\n(0 to {float(magnitude.max()):.2f})"],
                [f"channel {i}" + (f"\n(−{top:.2f} to +{top:.2f})" if i == 0 else "") for i in range(len(eps_difference))]]
    picture = labelled_grid(rows, captions=captions, cell=cell,
                            row_labels=["images", f"step {step}\nσ = {sigma:.3g}", "ε_c − ε_∅"],
                            title=f'"{prompt}", seed {options["seed"]}: guided ε̃ = ε_∅ + s (ε_c − ε_∅); '
                                  f"s = 0 ignores the prompt, s = 1 is the conditional model alone")
    frames = [labelled_grid([[image]], captions=[[f"s = {s:g}"]], cell=2 * cell) for s, image in zip(scales, images)]
    facts = {"scales": scales, "step": step, "sigma": sigma, "difference_norm": float(magnitude.mean())}
    return Explanation(picture, frames, facts)
