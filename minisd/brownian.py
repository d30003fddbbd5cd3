"""A1111's noise for the SDE samplers: one Brownian motion per image over [σ_min, σ_max], sampled on a dyadic
tree (torchsde's BrownianTree: halfway splits, times rounded to 1e-6, child seeds from numpy's SeedSequence) and
normalised as k-diffusion's BrownianTreeNoiseSampler, (W(σ_next) − W(σ)) / sqrt|σ_next − σ|. Each leaf draw
comes from A1111's chosen noise source seeded by the tree's seed for that node."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch

from .rng import randn as source_randn

TOL = 1e-6      # torchsde BrownianTree defaults, which k-diffusion keeps
POOL_SIZE = 24
CACHE_SIZE = 64  # node increments kept; the rest are recomputed (same values) from their parents


class _Node:
    """An interval [start, end] of the tree; `midway`/children/`seed` exist once it has been split."""
    __slots__ = ("start", "end", "parent", "is_left", "spawn_key", "depth", "midway", "left", "right", "seed")

    def __init__(self, start: float, end: float, parent: "_Node | None", is_left: bool):
        self.start, self.end, self.parent, self.is_left = start, end, parent, is_left
        self.spawn_key, self.depth = (0, 0) if parent is None else (2 * parent.spawn_key + (0 if is_left else 1),
                                                                   parent.depth + 1)
        self.midway = self.left = self.right = self.seed = None


class BrownianTree:
    """W over [t0, t1] for one seed (`entropy`); `increment(ta, tb)` = W(tb) − W(ta), t0 ≤ ta ≤ tb ≤ t1.

    Values equal torchsde.BrownianTree(t0, w0, t1, entropy=seed) when torchsde's leaf draws are
    `randn(seed)` (A1111 routes them to its noise source): the root holds W(t1) − W(t0) = sqrt(t1 − t0)·z; a
    split of [s, e] at the (rounded) midpoint m draws z from the node's own seed and gives the left part the
    Brownian-bridge sample (m − s)/(e − s)·W + sqrt((m − s)(e − m)/(e − s))·z, the right part the rest."""

    def __init__(self, t0: float, t1: float, entropy: int, randn: Callable[[int], torch.Tensor]):
        t0, t1 = float(t0), float(t1)
        if not t0 <= t1:
            raise ValueError(f"need t0 <= t1, got {t0} and {t1}")
        self._ndigits = -int(math.log10(TOL))
        self.entropy, self._randn = int(entropy), randn
        root_seed = np.random.SeedSequence(entropy=self.entropy, pool_size=POOL_SIZE).generate_state(3)[0]
        self.root = _Node(self._round(t0), self._round(t1), None, True)
        self._root_w = randn(int(root_seed)) * math.sqrt(t1 - t0)
        self._cache: OrderedDict[_Node, torch.Tensor] = OrderedDict()

    def _round(self, t: float) -> float:
        return round(t, self._ndigits)

    def increment(self, ta: float, tb: float) -> torch.Tensor:
        ta = min(max(float(ta), self.root.start), self.root.end)
        tb = min(max(float(tb), self.root.start), self.root.end)
        if ta > tb:
            raise ValueError(f"need ta <= tb, got {ta} and {tb}")
        if ta == tb:
            return torch.zeros_like(self._root_w)
        pieces: list[_Node] = []
        self._locate(self.root, self._round(ta), self._round(tb), pieces)
        w = self._value(pieces[0])
        for node in pieces[1:]:
            w = w + self._value(node)
        return w

    # ---- the tree -----------------------------------------------------------------------------------------

    def _locate(self, node: _Node, ta: float, tb: float, out: list[_Node]) -> None:
        """Append the nodes that tile [ta, tb] within `node`, splitting where needed (torchsde's _loc)."""
        while True:
            if ta == node.start and tb == node.end:
                out.append(node)
                return
            if node.midway is None:
                self._split(node, tb if ta == node.start else ta)
            if tb <= node.midway:
                node = node.left
            elif ta >= node.midway:
                node = node.right
            else:
                self._locate(node.left, ta, node.midway, out)
                node, ta = node.right, node.midway

    def _split(self, node: _Node, target: float) -> None:
        """Halve `node`, then keep halving the child that holds `target` until a midpoint lands on it."""
        while True:
            node.midway = self._round(0.5 * (node.end + node.start))
            sequence = np.random.SeedSequence(entropy=self.entropy, spawn_key=(node.spawn_key, node.depth),
                                              pool_size=POOL_SIZE)
            node.seed = int(sequence.generate_state(4)[0])
            node.left = _Node(node.start, node.midway, node, True)
            node.right = _Node(node.midway, node.end, node, False)
            if target > node.midway:
                node = node.right
            elif target < node.midway:
                node = node.left
            else:
                return

    def _value(self, node: _Node) -> torch.Tensor:
        """W(end) − W(start) of `node`, from its parent's (the Brownian bridge), with an LRU cache."""
        if node.parent is None:
            return self._root_w
        cached = self._cache.get(node)
        if cached is not None:
            self._cache.move_to_end(node)
            return cached
        parent = node.parent
        w = self._value(parent)
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff, right_diff = parent.midway - parent.start, parent.end - parent.midway
        mean = left_diff * w * h_reciprocal
        var = left_diff * right_diff * h_reciprocal
        left_w = mean + math.sqrt(var) * self._randn(parent.seed)
        value = left_w if node.is_left else w - left_w
        self._cache[node] = value
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return value


class BrownianTreeNoise:
    """A1111's noise sampler for DPM++ SDE / 2M SDE / 3M SDE: one tree per image, seeded with the image's seed,
    over [smallest σ > 0, largest σ]; `(σ, σ_next)` -> normalised increments (B, C, H, W) in x's dtype.

    `source` is the noise source ("cpu", "gpu", "nv") of the trees' leaf draws (A1111 draws them in float32 with
    devices.randn_local and casts them to x's dtype)."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], seeds: Sequence[int],
                 source: str = "cpu"):
        sigmas = torch.as_tensor(sigmas).cpu()
        if len(seeds) != x.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {x.shape[0]}")
        self.dtype, self.device = x.dtype, x.device
        shape = tuple(x.shape[1:])

        def leaf(seed: int) -> torch.Tensor:
            return source_randn(source, seed, shape).to(x.dtype)

        t0, t1 = float(sigmas[sigmas > 0].min()), float(sigmas.max())
        self.trees = [BrownianTree(t0, t1, seed, leaf) for seed in seeds]
        self.sigma_dtype = sigmas.dtype if sigmas.is_floating_point() else torch.float32

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        # σ as k-diffusion holds it: a tensor of the schedule's dtype (float32 in A1111).
        sigma = float(torch.as_tensor(sigma, dtype=self.sigma_dtype))
        sigma_next = float(torch.as_tensor(sigma_next, dtype=self.sigma_dtype))
        low, high, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        w = torch.stack([tree.increment(float(low), float(high)) for tree in self.trees]) * sign
        scale = (torch.as_tensor(sigma_next, dtype=self.sigma_dtype)
                 - torch.as_tensor(sigma, dtype=self.sigma_dtype)).abs().sqrt()
        return (w / scale).to(self.device, self.dtype)


# The samplers A1111 gives this noise ("brownian_noise" in its sampler table), by minisd sampler key.
BROWNIAN_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})
