"""LoRA (Hu et al. 2021) and its LyCORIS relatives LoCon, LoHa, LoKr: files in kohya/A1111, diffusers and PEFT
layouts read into per-layer weight deltas ΔW = (α/r)·up·down, merged into the model's weights (in float32, then
cast back) and removed exactly by restoring the original tensors, which are kept aside while any LoRA is merged."""
from __future__ import annotations

import hashlib
import os
from math import prod
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .errors import CheckpointError, ParameterError

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")

# The part of a key after the layer name -> the factor it holds. kohya/LyCORIS first, then PEFT and diffusers.
PARTS = {
    "lora_up.weight": "up", "lora_down.weight": "down", "lora_mid.weight": "mid", "alpha": "alpha",
    "lora_B.weight": "up", "lora_A.weight": "down", "lora.up.weight": "up", "lora.down.weight": "down",
    "lora_linear_layer.up.weight": "up", "lora_linear_layer.down.weight": "down",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b", "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "diff": "diff",  # LyCORIS "full" layers; their bias deltas (diff_b) are not supported and refused by name
    "dora_scale": "dora", "lora_magnitude_vector": "dora", "lora_magnitude_vector.weight": "dora",
}
_PART_PATTERN = re.compile(r"^(.+?)\.(" + "|".join(re.escape(p) for p in sorted(PARTS, key=len, reverse=True)) + r")$")
# diffusers' attention-processor layout (diffusers < 0.17): `attn1.processor.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")

# Where the layer names after each key prefix point (the component names of `lora_components`; None: a model family
# minisd does not run). kohya/A1111 flatten module paths with "_"; diffusers/PEFT keep the dots. SDXL's two text encoders are
# lora_te1_/lora_te2_ (kohya) and text_encoder/text_encoder_2 (diffusers); a new family adds its prefixes here.
PREFIXES = [
    ("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"), ("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"), ("diffusion_model.", "unet"), ("lora_prior_unet_", None),
]


class LoraError(ParameterError):
    """A LoRA file that cannot be applied to this model (unreadable, for another architecture, unmatched keys)."""


@dataclass(frozen=True)
class Target:
    """Where one layer's delta goes: `rows` of the parameter `param` of `module` (rows: a fused q/k/v
    projection that a file adapts as three layers); `name` for messages."""
    module: nn.Module
    param: str
    name: str
    rows: slice | None = None

    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    def shape(self) -> tuple[int, ...]:
        t = self.tensor()
        return tuple(t[self.rows].shape if self.rows is not None else t.shape)


@dataclass
class LoraLayer:
    """The factors a file holds for one layer, by part name (up, down, mid, alpha, hada_*, lokr_*, diff).
    `shape()` derives ΔW's shape from the factors' shapes alone, so a file's claim is checked against its layer
    before anything is multiplied; `delta()` calls it first."""
    key: str
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    # ---- shapes only (no arithmetic) ----

    def _get(self, part: str, dims: tuple[int, ...], kind: str) -> tuple[int, ...]:
        """The shape of factor `part`, which must exist and have one of `dims` dimensions."""
        tensor = self.parts.get(part)
        if tensor is None:
            raise LoraError(f"{self.key}: incomplete {kind} factors: {part} is missing "
                            f"(has {', '.join(sorted(self.parts))})")
        if tensor.dim() not in dims:
            raise LoraError(f"{self.key}: {part} has shape {list(tensor.shape)}, a {kind} factor has "
                            f"{' or '.join(map(str, dims))} dimensions")
        return tuple(tensor.shape)

    def _inconsistent(self, what: str) -> LoraError:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(self.parts.items()))
        return LoraError(f"{self.key}: inconsistent factor shapes ({what}): {shapes}")

    def _matmul_shape(self, a: str, b: str, kind: str) -> tuple[int, int]:
        """a (m, r) @ b (r, ...) flattened to (m, n)."""
        sa, sb = self._get(a, (2,), kind), self._get(b, (2, 4), kind)
        if sa[1] != sb[0]:
            raise self._inconsistent(f"{a} and {b} do not multiply")
        return sa[0], prod(sb[1:])

    def _cp_shape(self, t: str, a: str, b: str, kind: str) -> tuple[int, ...]:
        """Tucker/CP form einsum("ijkl,jr,ip->prkl", t, b, a), t (i, j, k, l), b (j, r), a (i, p)."""
        st, sa, sb = self._get(t, (4,), kind), self._get(a, (2,), kind), self._get(b, (2,), kind)
        if st[0] != sa[0] or st[1] != sb[0]:
            raise self._inconsistent(f"{t} does not join {a} and {b}")
        return sa[1], sb[1], st[2], st[3]

    def _rank(self, part: str) -> int:
        rank = self.parts[part].shape[0]
        if rank == 0:
            raise self._inconsistent(f"{part} has rank 0")
        return rank

    def shape(self) -> tuple[int, ...]:
        """ΔW's shape as the factors' shapes say, every factor present and every product consistent; LoraError
        otherwise. Intermediate products are never larger than a small multiple of the result (see _MAX_SPREAD)."""
        p = self.parts
        if "alpha" in p and p["alpha"].numel() != 1:
            raise LoraError(f"{self.key}: alpha has shape {list(p['alpha'].shape)}, it must be one number")
        if "dora" in p:
            raise LoraError(f"{self.key}: DoRA (weight-decomposed LoRA) is not supported")
        if "diff" in p:
            return tuple(p["diff"].shape)
        if "up" in p or "down" in p:
            if "up" not in p or "down" not in p:
                raise LoraError(f"{self.key}: has only one of the two LoRA factors (up/down)")
            up, down = self._get("up", (2, 4), "LoRA"), self._get("down", (2, 4), "LoRA")
            rank = self._rank("down")
            if "mid" in p:  # up (o, a[,1,1]) · mid (a, b, h, w) · down (b, i[,1,1])
                mid = self._get("mid", (4,), "LoCon")
                if prod(up[1:]) != mid[0] or mid[1] != rank:
                    raise self._inconsistent("up, mid and down do not multiply")
                out = (up[0], prod(down[1:]), mid[2], mid[3])
                self._check_spread(out, min(up[0] * mid[1], mid[0] * out[1]) * mid[2] * mid[3])
                return out
            if prod(up[1:]) != rank:
                raise self._inconsistent("up and down do not multiply")
            return (up[0], *down[1:])
        if "hada_w1_a" in p or "hada_w2_a" in p:  # LoHa: (w1a·w1b) ⊙ (w2a·w2b), the two of one shape
            if "hada_t1" in p or "hada_t2" in p:
                w1 = self._cp_shape("hada_t1", "hada_w1_a", "hada_w1_b", "LoHa")
                w2 = self._cp_shape("hada_t2", "hada_w2_a", "hada_w2_b", "LoHa")
                for t in ("hada_t1", "hada_t2"):
                    i, j, k, l = p[t].shape
                    self._check_spread(w1, min(i * w1[1], w1[0] * j) * k * l)
            else:
                w1 = self._matmul_shape("hada_w1_a", "hada_w1_b", "LoHa")
                w2 = self._matmul_shape("hada_w2_a", "hada_w2_b", "LoHa")
            if w1 != w2:  # ⊙ must not broadcast
                raise self._inconsistent(f"the two LoHa products are {list(w1)} and {list(w2)}")
            self._rank("hada_w1_b")
            return w1
        if "lokr_w1" in p or "lokr_w1_a" in p:  # LoKr: w1 ⊗ w2
            w1 = self._get("lokr_w1", (2,), "LoKr") if "lokr_w1" in p else \
                self._matmul_shape("lokr_w1_a", "lokr_w1_b", "LoKr")
            if "lokr_w1_b" in p:
                self._rank("lokr_w1_b")
            if "lokr_w2" in p:
                w2 = self._get("lokr_w2", (2, 4), "LoKr")
            elif "lokr_t2" in p:
                w2 = self._cp_shape("lokr_t2", "lokr_w2_a", "lokr_w2_b", "LoKr")
                i, j, k, l = p["lokr_t2"].shape
                self._check_spread(w2, min(i * w2[1], w2[0] * j) * k * l)
            else:
                w2 = self._matmul_shape("lokr_w2_a", "lokr_w2_b", "LoKr")
            if "lokr_w2_b" in p:
                self._rank("lokr_w2_b")
            w1 = w1 + (1,) * (len(w2) - len(w1))  # (a, b) ⊗ (c, d, kh, kw): the kernel belongs to w2 only
            return tuple(x * y for x, y in zip(w1, w2))
        raise LoraError(f"{self.key}: no LoRA factors (only {', '.join(sorted(self.parts))})")

    # A CP contraction's intermediate may exceed its result by this factor (ranks far above both of the layer's
    # dimensions); a real file's ranks stay below them, a hostile one could otherwise ask for gigabytes.
    _MAX_SPREAD = 16

    def _check_spread(self, out: tuple[int, ...], intermediate: int) -> None:
        if intermediate > self._MAX_SPREAD * max(prod(out), 1) + 2**16:
            raise self._inconsistent(f"a rank far above the layer's dimensions {list(out)}")

    # ---- arithmetic ----

    def delta(self) -> torch.Tensor:
        """ΔW in float32, before the user's weight; shaped as `shape()` says (reshaped to the target later).
        Callers that adapt a layer check `shape()` against it first (match_lora does)."""
        self.shape()  # every factor present and consistent before anything is multiplied
        p = {k: v.float() for k, v in self.parts.items()}
        alpha = float(p["alpha"]) if "alpha" in p else None
        if "diff" in p:
            return p["diff"]
        if "up" in p:
            up, down = p["up"], p["down"]
            rank = down.shape[0]
            scale = alpha / rank if alpha is not None else 1.0
            if "mid" in p:  # LoCon with a CP-decomposed kernel: 1×1 down, r×r×k×k mid, 1×1 up
                delta = _cp(p["mid"], up.flatten(1), down.flatten(1))
            elif down.dim() == 4:  # conv: (out, r, 1, 1) · (r, in, kh, kw)
                delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
            else:
                delta = up.flatten(1) @ down
            return delta * scale
        if "hada_w1_a" in p:  # LoHa (Hyeon-Woo et al. 2022): (w1a·w1b) ⊙ (w2a·w2b)
            rank = p["hada_w1_b"].shape[0]
            if "hada_t1" in p:  # CP form for convolutions
                w1 = _cp(p["hada_t1"], p["hada_w1_a"].T, p["hada_w1_b"])
                w2 = _cp(p["hada_t2"], p["hada_w2_a"].T, p["hada_w2_b"])
            else:
                w1, w2 = p["hada_w1_a"] @ p["hada_w1_b"].flatten(1), p["hada_w2_a"] @ p["hada_w2_b"].flatten(1)
            return w1 * w2 * (alpha / rank if alpha is not None else 1.0)
        # LoKr: w1 ⊗ w2 (Kronecker product)
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"].flatten(1)
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = _cp(p["lokr_t2"], p["lokr_w2_a"].T, p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"].flatten(1)
        rank = (p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else
                p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else None)
        scale = alpha / rank if alpha is not None and rank is not None else 1.0
        while w1.dim() < w2.dim():  # (a, b) ⊗ (c, d, kh, kw): the kernel belongs to w2 only
            w1 = w1.unsqueeze(-1)
        return torch.kron(w1.contiguous(), w2.contiguous()) * scale  # kron fails on some strided views


def _cp(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left (p, i) · core (i, j, k, l) · right (j, r) -> (p, r, k, l), contracting first the side whose
    intermediate is smaller (LoraLayer.shape bounds it)."""
    i, j, k, l = core.shape
    if left.shape[0] * j <= i * right.shape[1]:
        return torch.einsum("pjkl,jr->prkl", torch.einsum("pi,ijkl->pjkl", left, core), right)
    return torch.einsum("pi,irkl->prkl", left, torch.einsum("ijkl,jr->irkl", core, right))


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (.safetensors, or a zip pickle through the restricted unpickler)."""
    from .checkpoint import read_weights_file

    try:
        state, _, _ = read_weights_file(path, allow_pickle=True)
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    return state


def group_layers(state: Mapping[str, torch.Tensor], source: str = "") -> dict[str, LoraLayer]:
    """Layer key -> its factors. Keys of no known LoRA part are an error, named."""
    layers: dict[str, LoraLayer] = {}
    unknown = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            unknown.append(key)
            continue
        match = _PROCESSOR.search(key)
        if match:
            out = "to_out.0" if match.group(1) == "to_out" else match.group(1)
            stem, part = key[:match.start()] + "." + out, match.group(2)
        else:
            m = _PART_PATTERN.match(key)
            if m is None:
                unknown.append(key)
                continue
            stem, part = m.group(1), PARTS[m.group(2)]
        # PEFT adapter names (`lora_A.default.weight`) are not in the pattern; plain files have none.
        layers.setdefault(stem, LoraLayer(stem)).parts[part] = value
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise LoraError(f"{source}not a LoRA file: keys {', '.join(unknown[:3])}{more} are no LoRA factors")
    return layers


# ---- where the layers are -----------------------------------------------------------------------------------

def weight_layers(module: nn.Module) -> dict[str, Target]:
    """Every layer with a 2-d or 4-d `weight` under its module path (the file's names in our own layout)."""
    out = {}
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() in (2, 4) and not isinstance(sub, nn.Embedding):
            name = name.replace("_orig_mod.", "")  # the module inside a torch.compile wrapper (sd.compile())
            out[name] = Target(sub, "weight", name)
    return out


def unet_aliases(unet: nn.Module, layers: dict[str, Target]) -> dict[str, Target]:
    """The diffusers module paths of the UNet's layers (what LCM-LoRA, PEFT and many trainers write)."""
    from .diffusers_format import rename, unet_prefixes

    config = getattr(unet, "config", None)
    if config is None:
        return {}
    renamed = rename({name + ".": target for name, target in layers.items()}, unet_prefixes(config), to_original=False)
    return {name[:-1]: target for name, target in renamed.items()}


def fused_attention_aliases(module: nn.Module) -> dict[str, Target]:
    """Hugging Face CLIP names for an OpenCLIP text encoder (`transformer.resblocks.N`): q/k/v are row slices of
    the fused `attn.in_proj_weight`; out_proj, mlp.c_fc, mlp.c_proj are the layers out_proj, fc1, fc2."""
    out = {}
    pattern = re.compile(r"^(?:.*\.)?transformer\.resblocks\.(\d+)$")
    for name, sub in module.named_modules():
        m = pattern.match(name)
        if not m:
            continue
        hf = f"text_model.encoder.layers.{m.group(1)}."
        attn = getattr(sub, "attn", None)
        if attn is not None and isinstance(getattr(attn, "in_proj_weight", None), torch.Tensor):
            width = attn.in_proj_weight.shape[0] // 3
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[hf + "self_attn." + proj] = Target(attn, "in_proj_weight", f"{name}.attn.in_proj_weight[{proj}]",
                                                       slice(i * width, (i + 1) * width))
            if isinstance(getattr(attn, "out_proj", None), nn.Module):
                out[hf + "self_attn.out_proj"] = Target(attn.out_proj, "weight", f"{name}.attn.out_proj")
        mlp = getattr(sub, "mlp", None)
        for ours, theirs in (("c_fc", "fc1"), ("c_proj", "fc2")):
            layer = getattr(mlp, ours, None) if mlp is not None else None
            if isinstance(layer, nn.Module):
                out[hf + "mlp." + theirs] = Target(layer, "weight", f"{name}.mlp.{ours}")
    return out


# A component's other layouts, by component attribute; new model families add theirs here.
ALIASES: dict[str, Callable[[nn.Module, dict[str, Target]], dict[str, Target]]] = {
    "unet": unet_aliases,
    "text_encoder": lambda module, layers: fused_attention_aliases(module),
    "text_encoder_2": lambda module, layers: fused_attention_aliases(module),
}


def lora_components(unet: nn.Module, text_encoder: nn.Module) -> dict[str, nn.Module]:
    """The networks a LoRA file can name, by the component names of its keys. SDXL's conditioner holds CLIP ViT-L
    (`text_encoder`, kohya `lora_te1_`) and OpenCLIP bigG (`text_encoder_2`, `lora_te2_`) as its embedders."""
    out = {"unet": unet}
    embedders = getattr(text_encoder, "embedders", None)
    if embedders is None:  # SD 1.x (CLIP) or SD 2.x (OpenCLIP; its LoRAs use CLIP's names, see ALIASES)
        out["text_encoder"] = text_encoder
        return out
    for embedder in embedders:
        if hasattr(embedder, "transformer"):
            out["text_encoder"] = embedder.transformer
        elif hasattr(embedder, "model"):
            out["text_encoder_2"] = embedder.model
    return out


def layer_index(components: Mapping[str, nn.Module]) -> dict[str, dict[str, Target]]:
    """component -> {name: target} under every spelling a LoRA file may use (dotted and "_"-flattened)."""
    index = {}
    for component, module in components.items():
        layers = weight_layers(module)
        names = dict(layers)
        names.update(ALIASES.get(component, lambda m, l: {})(module, layers))
        index[component] = {**names, **{n.replace(".", "_"): t for n, t in names.items()}}
    return index


# ---- a loaded LoRA ------------------------------------------------------------------------------------------

@dataclass
class LoadedLora:
    """A LoRA matched against a model: its layers by target, and the weights it is merged with."""
    name: str
    path: Path | None
    layers: list[tuple[Target, LoraLayer, str]]  # (target, factors, component)
    unet_weight: float = 1.0
    te_weight: float = 1.0
    unmatched: list[str] = field(default_factory=list)

    def weight_for(self, component: str) -> float:
        return self.unet_weight if component == "unet" else self.te_weight


def match_lora(state: Mapping[str, torch.Tensor], components: Mapping[str, nn.Module], *, name: str = "",
               path: Path | None = None) -> LoadedLora:
    """Pair every layer of a LoRA state dict with the model layer it adapts; shapes are checked here."""
    where = f"{path}: " if path else f"{name}: " if name else ""
    layers = group_layers(state, where)
    if not layers:
        raise LoraError(f"{where}holds no LoRA layers")
    index = layer_index(components)
    matched, unmatched, other_model = [], [], []
    for key, layer in layers.items():
        prefix = next(((p, c) for p, c in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unmatched.append(key)
            continue
        component = prefix[1]
        if component is None or component not in index:
            other_model.append(prefix[0])
            continue
        target = index[component].get(key[len(prefix[0]):])
        if target is None:
            unmatched.append(key)
            continue
        try:
            shape = layer.shape()  # from the factors' shapes: nothing is multiplied before it fits the layer
        except LoraError as e:
            raise LoraError(f"{where}{e}") from None
        if prod(shape) != prod(target.shape()):
            raise LoraError(f"{where}{key}: its delta has shape {list(shape)} but {component}.{target.name} "
                            f"has {list(target.shape())} (a LoRA for another architecture?)")
        matched.append((target, layer, component))
    if other_model:
        raise LoraError(f"{where}a LoRA for another architecture: it adapts a component this model does not have "
                        f"({', '.join(sorted(set(other_model)))} keys)")
    if unmatched and not matched:
        raise LoraError(f"{where}no key matches a layer of this model (a LoRA for another architecture?), "
                        f"e.g. {', '.join(unmatched[:3])}")
    return LoadedLora(name, path, matched, unmatched=unmatched)


class LoraStack:
    """The LoRAs merged into one model. Each touched parameter's original is kept, and its merged value is always
    recomputed as original + Σ weight·ΔW in float32, cast once: order-independent, and unloading restores the
    original tensor bit for bit."""

    def __init__(self, components: Callable[[], Mapping[str, nn.Module]]):
        self._components = components
        self.loaded: list[LoadedLora] = []
        self._originals: dict[tuple[int, str], tuple[Target, torch.Tensor]] = {}

    def load(self, path: str | os.PathLike, weight: float = 1.0, *, te_weight: float | None = None,
             name: str | None = None, strict: bool = True) -> LoadedLora:
        """Merge the LoRA file at `path` with `weight` (and `te_weight` for the text encoders, default the same).
        strict: any key that matches no layer is an error naming it (else they are listed in `unmatched`)."""
        path = Path(path)
        lora = match_lora(read_lora_file(path), self._components(), name=name or path.stem, path=path)
        if lora.unmatched and strict:
            more = f" (and {len(lora.unmatched) - 3} more)" if len(lora.unmatched) > 3 else ""
            raise LoraError(f"{path}: keys that match no layer of this model: {', '.join(lora.unmatched[:3])}{more}")
        lora.unet_weight = float(weight)
        lora.te_weight = float(weight if te_weight is None else te_weight)
        self.add(lora)
        return lora

    def add(self, lora: LoadedLora) -> None:
        self.loaded.append(lora)
        self._refresh({self._key(t) for t, _, _ in lora.layers})

    def remove(self, lora: LoadedLora) -> None:
        self.loaded = [x for x in self.loaded if x is not lora]
        self._refresh({self._key(t) for t, _, _ in lora.layers})

    def clear(self) -> None:
        """Unmerge everything: every touched parameter gets its original tensor back."""
        self.loaded = []
        self._refresh(set(self._originals))

    @contextmanager
    def from_prompt(self, prompt: str, directories: Iterable[str | os.PathLike]):
        """Merge the prompt's `<lora:...>` tags (files looked up by name in `directories`) for one generation."""
        _, tags = extract_lora_tags(prompt)
        added = []
        try:
            for tag in tags:
                path = find_lora(tag.name, directories)
                lora = match_lora(read_lora_file(path), self._components(), name=tag.name, path=path)
                if lora.unmatched:
                    more = f" (and {len(lora.unmatched) - 3} more)" if len(lora.unmatched) > 3 else ""
                    raise LoraError(f"{path}: keys that match no layer of this model: "
                                    f"{', '.join(lora.unmatched[:3])}{more}")
                lora.te_weight, lora.unet_weight = tag.te_weight, tag.unet_weight
                self.add(lora)
                added.append(lora)
            yield added
        finally:
            for lora in added:
                self.remove(lora)

    def infotext(self) -> dict[str, str]:
        """A1111's "Lora hashes" field for the merged LoRAs: "name: addnet short hash, ..."."""
        named = [f"{lora.name}: {lora_short_hash(lora.path)}" for lora in self.loaded if lora.path is not None]
        return {"Lora hashes": ", ".join(named)} if named else {}

    @staticmethod
    def _key(target: Target) -> tuple[int, str]:
        return id(target.module), target.param

    @torch.no_grad()
    def _refresh(self, keys: set[tuple[int, str]]) -> None:
        deltas: dict[tuple[int, str], list[tuple[Target, LoraLayer, float]]] = {k: [] for k in keys}
        for lora in self.loaded:
            for target, layer, component in lora.layers:
                key = self._key(target)
                if key in deltas:
                    deltas[key].append((target, layer, lora.weight_for(component)))
        for key, items in deltas.items():
            if key not in self._originals:
                if not items:
                    continue
                target = items[0][0]
                self._originals[key] = (target, target.tensor().detach().clone())
            target, original = self._originals[key]
            if not items:  # nothing merged here any more: the original itself, bit for bit
                target.tensor().copy_(original)
                del self._originals[key]
                continue
            merged = original.to(torch.float32, copy=True)  # never an alias of the kept original
            for item_target, layer, weight in items:
                rows = item_target.rows if item_target.rows is not None else slice(None)
                view = merged[rows]
                view += weight * layer.delta().to(merged.device).reshape(view.shape)
            target.tensor().copy_(merged.to(original.dtype))


# ---- A1111 prompt syntax ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraTag:
    """One `<lora:name:weights>` of a prompt."""
    name: str
    te_weight: float
    unet_weight: float


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its extra-network tags, and its LoRA tags, as A1111 reads them: `<lora:name>` (weight 1),
    `<lora:name:w>` (both), `<lora:name:te:unet>`, or named `te=`/`unet=`; `<lyco:...>` is the same. Other kinds
    (hypernetworks) are refused by name."""
    from .prompts import extract_extra_networks

    text, networks = extract_extra_networks(prompt)
    tags = []
    for kind, args in networks:
        if kind not in ("lora", "lyco"):
            raise ParameterError(f"<{kind}:{':'.join(args)}>: extra networks of kind {kind!r} are not supported "
                                 f"(only <lora:name:weight>)")
        name, positional, named = args[0].strip(), [], {}
        for arg in args[1:]:
            key, eq, value = arg.partition("=")
            if eq:
                named[key.strip()] = value.strip()
            elif arg.strip():
                positional.append(arg.strip())
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ParameterError(f"<{kind}:{':'.join(args)}>: a LoRA weight must be a number") from None
        if not name:
            raise ParameterError(f"<{kind}:{':'.join(args)}>: a LoRA tag needs a name")
        tags.append(LoraTag(name, te, unet))
    return text, tags


def find_lora(name: str, directories: Iterable[str | os.PathLike]) -> Path:
    """The LoRA file called `name` (its stem) in one of `directories` (searched recursively); an entry that is
    a file stands for itself (--lora FILE)."""
    dirs = [Path(d) for d in directories]
    for entry in dirs:
        if entry.is_file() and entry.stem == name:
            return entry
    for directory in dirs:
        for suffix in LORA_SUFFIXES:
            direct = directory / f"{name}{suffix}"
            if direct.is_file():
                return direct
    for directory in dirs:
        if directory.is_dir():
            for found in sorted(directory.rglob("*")):
                if found.suffix in LORA_SUFFIXES and found.stem == name and found.is_file():
                    return found
    where = ", ".join(str(d) for d in dirs if d.is_dir()) or "no LoRA directory given (--lora-dir)"
    raise ParameterError(f"unknown LoRA {name!r}: no {name}.safetensors (or .pt) in {where}")


def lora_short_hash(path: str | os.PathLike) -> str:
    """A1111's LoRA short hash: 12 hex digits of kohya's "addnet" hash for .safetensors (SHA-256 of the tensor data,
    header skipped, so editing metadata keeps it), of the whole file's SHA-256 otherwise."""
    from .hashes import sha256_model

    path = Path(path)
    if path.suffix != ".safetensors":
        return sha256_model(path)[:12]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]
