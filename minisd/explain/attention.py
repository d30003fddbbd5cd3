"""`minisd explain attention PROMPT`: where each prompt token is looked at. The cross-attention probabilities
softmax(q kᵀ/√d) of every UNet layer (read through the attention probe of models/unet.py), averaged over heads and
layers per resolution, accumulated over the sampler steps, upsampled to the image and averaged over resolutions:
the word heat maps of DAAM (Tang et al. 2023), laid over the generated image."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..prompts import tokenize_prompt
from ..tokenizer import BOS_ID, EOS_ID
from . import Explanation
from .drawing import labelled_grid, overlay

TOKENS_PER_ROW = 8


class AttentionRecorder:
    """While active, sums the head-averaged cross-attention probabilities (image tokens × text tokens) of the
    first batch item (the prompt's half of a guided batch) per number of image tokens, i.e. per resolution."""

    def __init__(self, unet: torch.nn.Module):
        self.modules = [m for name, m in unet.named_modules() if name.endswith("attn2")]
        self.sums: dict[int, torch.Tensor] = {}
        self.calls: dict[int, int] = {}

    def probe(self, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor) -> None:
        q, k = q[0].float(), k[0].float()  # (heads, n, d), (heads, L, d)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(0).cpu()  # (n, L)
        n = probs.shape[0]
        self.sums[n] = self.sums[n] + probs if n in self.sums else probs
        self.calls[n] = self.calls.get(n, 0) + 1

    def __enter__(self) -> "AttentionRecorder":
        for module in self.modules:
            module.probe = self.probe
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            del module.probe  # back to the class default, None

    def maps(self, latent_size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
        """(L, H, W): per resolution the mean over layers and steps (DAAM sums over steps: the same map up
        to a constant), upsampled bicubically to the image, then averaged over resolutions."""
        out = []
        for n, total in self.sums.items():
            h, w = _grid(n, latent_size)
            square = (total / self.calls[n]).T.reshape(1, -1, h, w)  # (n, L) -> (1, L, h, w)
            out.append(F.interpolate(square, size=image_size, mode="bicubic", align_corners=False).clamp(min=0)[0])
        return torch.stack(out).mean(0)


def _grid(n: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a UNet level holding n tokens: the latent halved (rounding up) k times."""
    h, w = latent_size
    while h * w > n:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n:
        raise ValueError(f"no UNet level of a {latent_size} latent has {n} tokens")
    return h, w


def prompt_tokens(tokenizer, prompt: str) -> list[tuple[int, str]]:
    """(position in the context, text) of every prompt token: BOS, EOS and padding left out."""
    tokens = []
    for c, chunk in enumerate(tokenize_prompt(tokenizer, prompt)):
        for j, token_id in enumerate(chunk.ids):
            if token_id == EOS_ID:
                break
            if token_id != BOS_ID:
                tokens.append((c * len(chunk.ids) + j, tokenizer.decode([token_id]).strip()))
    return tokens


def attention_maps(sd, prompt: str, **options) -> tuple:
    """Generate `prompt` with the probe active: the image, the tokens and their maps (T, H, W), unnormalised."""
    options.setdefault("seed", 1)
    # One batched UNet call per step with the prompt first, so the recorder's first batch item is the prompt.
    options.setdefault("sequential_guidance", False)
    recorder = AttentionRecorder(sd.unet)
    with recorder:
        image = sd.txt2img(prompt, **options)[0]
    latent = (image.height // 8, image.width // 8)
    maps = recorder.maps(latent, (image.height, image.width))
    tokens = prompt_tokens(sd.tokenizer, prompt)
    return image, [text for _, text in tokens], maps[[position for position, _ in tokens]]


def explain_attention(sd, prompt: str, *, cell: int = 96, **options) -> Explanation:
    """The generated image and one overlay per prompt token (each map scaled to its own maximum)."""
    image, tokens, maps = attention_maps(sd, prompt, **options)
    overlays = [overlay(image, (m / m.max()).numpy() if float(m.max()) > 0 else np.zeros(m.shape)) for m in maps]
    cells = [image, *overlays]
    captions = ["generated", *[f'"{t}"\n{float(m.mean()):.3f} mean' for t, m in zip(tokens, maps)]]
    rows = [cells[i:i + TOKENS_PER_ROW] for i in range(0, len(cells), TOKENS_PER_ROW)]
    caption_rows = [captions[i:i + TOKENS_PER_ROW] for i in range(0, len(captions), TOKENS_PER_ROW)]
    picture = labelled_grid(rows, captions=caption_rows, cell=cell,
                            title=f'"{prompt}": cross-attention per token, averaged over heads and layers per '
                                  "resolution,\naccumulated over steps, upsampled and averaged over resolutions "
                                  "(each map scaled to its maximum;\nunder it the token's mean attention probability)")
    frames = [labelled_grid([[o]], captions=[[f'"{t}"']], cell=2 * cell) for t, o in zip(tokens, overlays)]
    facts = {"tokens": tokens, "maps": maps, "image": image}
    return Explanation(picture, frames, facts)
