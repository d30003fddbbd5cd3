"""OpenCLIP text-tower keys (`token_embedding.weight`, `transformer.resblocks.N.attn.in_proj_weight`, ...) to and
from transformers' CLIP text-model keys, the layout of diffusers' `text_encoder/` (SD 2.x) and `text_encoder_2/`
(SDXL) folders: a few renaming rules, the fused q/k/v projection split in three, `text_projection` transposed."""
from __future__ import annotations

import re

import torch

from .errors import CheckpointError

LAYERS = ("transformer.resblocks.", "text_model.encoder.layers.")
IN_LAYERS = [re.compile(re.escape(prefix) + r"(\d+)\.(.+)") for prefix in LAYERS]  # -> (index, name inside)
# (OpenCLIP, transformers) name pieces: inside one layer, then outside the layers.
IN_LAYER = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
            ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]
OUTSIDE = [("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
           ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
           ("ln_final.", "text_model.final_layer_norm.")]
FUSED = ("attn.in_proj_weight", "attn.in_proj_bias")  # torch.nn.MultiheadAttention's stacked [q; k; v]
SPLIT = {"attn.in_proj_weight": "self_attn.{}_proj.weight", "attn.in_proj_bias": "self_attn.{}_proj.bias"}
PROJECTION = ("text_projection", "text_projection.weight")  # OpenCLIP's x @ P is transformers' Linear with Pᵀ
POSITION_IDS = "text_model.embeddings.position_ids"  # a buffer some transformers versions save; recomputed


def _swap(name: str, rules: list[tuple[str, str]], to_open_clip: bool) -> str | None:
    src, dst = (1, 0) if to_open_clip else (0, 1)
    for rule in rules:
        if name.startswith(rule[src]):
            return rule[dst] + name[len(rule[src]):]
    return None


def to_transformers(state: dict[str, torch.Tensor], layers: int, with_projection: bool
                    ) -> dict[str, torch.Tensor]:
    """transformers' `CLIPTextModel` (`with_projection`: `CLIPTextModelWithProjection`) weights of an OpenCLIP
    tower, keeping its first `layers` layers. `logit_scale` has no place there and is left out."""
    out = {}
    for key, value in state.items():
        if key == PROJECTION[0]:
            if with_projection:
                out[PROJECTION[1]] = value.T.contiguous()
        elif layer := IN_LAYERS[0].fullmatch(key):
            index, inner = layer.groups()
            if int(index) >= layers:
                continue
            prefix = f"{LAYERS[1]}{index}."
            if inner in FUSED:
                for part, chunk in zip("qkv", value.chunk(3)):
                    out[prefix + SPLIT[inner].format(part)] = chunk.contiguous()
            else:
                out[prefix + (_swap(inner, IN_LAYER, to_open_clip=False) or inner)] = value
        elif key != "logit_scale":
            out[_swap(key, OUTSIDE, to_open_clip=False) or key] = value
    return out


def to_open_clip(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """OpenCLIP-layout weights of a transformers CLIP text model (with or without the `text_model.` level, which
    transformers 5 drops for `CLIPTextModel`). Names that fit no rule pass unchanged, for the strict load to name."""
    out, qkv = {}, {}
    for key, value in state.items():
        if key != PROJECTION[1] and not key.startswith("text_model."):
            key = "text_model." + key
        if key == POSITION_IDS:
            continue
        if key == PROJECTION[1]:
            out[PROJECTION[0]] = value.T.contiguous()
        elif layer := IN_LAYERS[1].fullmatch(key):
            index, inner = layer.groups()
            prefix = f"{LAYERS[0]}{index}."
            split = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", inner)
            if split:
                qkv.setdefault((prefix, split.group(2)), {})[split.group(1)] = value
            else:
                out[prefix + (_swap(inner, IN_LAYER, to_open_clip=True) or inner)] = value
        else:
            out[_swap(key, OUTSIDE, to_open_clip=True) or key] = value
    for (prefix, kind), parts in qkv.items():
        if len(parts) != 3:
            raise CheckpointError(f"{where}: {prefix.replace(LAYERS[0], LAYERS[1])}self_attn has only "
                                  f"{'/'.join(sorted(parts))} of the q, k and v projections")
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    return out
