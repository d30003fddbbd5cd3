"""A deterministic checker for images of the shapes grammar (no learned model): colour segmentation into
background and object, then the object's colour (nearest palette entry), shape (best-fitting template in
its bounding box) and position (nearest anchor to the box centre)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import PALETTE, POSITIONS, SHAPES, CaptionSpec

_NAMES = list(PALETTE)
_COLORS = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)  # (K, 3)
OBJECT_THRESHOLD = 60.0  # RGB distance from the background beyond which a pixel belongs to a foreground
MIN_AREA = 0.015  # smallest object, as a fraction of the image (about 61 pixels at 64×64)
MIN_PURITY = 0.5  # a colour counts only if most of the object is that colour (not noise of that median)
ATTRIBUTES = ("background", "color", "shape", "position")


@dataclass
class Detection:
    """What the detector saw; attributes are None where no object was found."""
    background: str
    color: str | None
    shape: str | None
    position: str | None
    mask: np.ndarray  # (H, W) bool: the object's pixels
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1, inclusive
    shape_scores: dict[str, float]  # IoU of the mask with each shape template
    purity: float = 0.0  # share of the object's interior pixels nearest to its colour

    @property
    def found(self) -> bool:
        return self.color is not None


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Index into the palette of the nearest colour for each RGB row (…, 3)."""
    distances = ((rgb[..., None, :] - _COLORS) ** 2).sum(-1)
    return distances.argmin(-1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (breadth-first flood fill)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        region, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def shape_templates(bbox: tuple[int, int, int, int], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ideal masks of each shape filling the bounding box (pixel centres tested against the outline)."""
    x0, y0, x1, y1 = bbox
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    depth = (ys - (y0 - 0.5)) / (2 * ry)  # 0 at the apex row's top edge, 1 at the base
    return {
        "circle": ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0,
        "square": inside,
        "triangle": inside & (np.abs(xs - cx) <= rx * depth),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def detect(image: Image.Image) -> Detection:
    """Segment an image of the grammar and name its background, object colour, shape and position."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = rgb.shape
    labels = nearest_color(rgb)
    # The background is the commonest colour; its measured shade (median) is the reference, so a model
    # whose colours drift a little is still segmented cleanly.
    bg_index = int(np.bincount(labels.ravel(), minlength=len(_NAMES)).argmax())
    bg_shade = np.median(rgb[labels == bg_index], axis=0)
    foreground = np.sqrt(((rgb - bg_shade) ** 2).sum(-1)) > OBJECT_THRESHOLD
    mask = largest_component(foreground)
    background = _NAMES[bg_index]
    if mask.sum() < MIN_AREA * h * w:
        return Detection(background, None, None, None, mask, None, {}, 0.0)
    # Colour: the median of the interior (pixels whose 4 neighbours are all object), away from blended edges.
    interior = mask.copy()
    interior[1:] &= mask[:-1]
    interior[:-1] &= mask[1:]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    pixels = rgb[interior] if interior.any() else rgb[mask]
    color_index = int(nearest_color(np.median(pixels, axis=0)))
    purity = float((nearest_color(pixels) == color_index).mean())
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    scores = {name: iou(mask, template) for name, template in shape_templates(bbox, (h, w)).items()}
    shape = max(SHAPES, key=lambda s: scores[s])
    # Position from the box centre (a triangle's centroid sits low in its box; the box centre does not).
    fx, fy = (bbox[0] + bbox[2] + 1) / (2 * w), (bbox[1] + bbox[3] + 1) / (2 * h)
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][1][0] - fx) ** 2 + (POSITIONS[p][1][1] - fy) ** 2)
    return Detection(background, _NAMES[color_index], shape, position, mask, bbox, scores, purity)


def check(image: Image.Image | Detection, spec: CaptionSpec) -> dict[str, bool]:
    """Per-attribute agreement of an image with what its caption says (attributes the caption leaves
    open are not checked), and "all": every checked attribute matches. The object's colour must also be
    pure (`MIN_PURITY`): a noisy blob whose median happens to be right does not count."""
    found = image if isinstance(image, Detection) else detect(image)
    result = {"color": found.color == spec.color and found.purity >= MIN_PURITY, "shape": found.shape == spec.shape}
    if spec.position is not None:
        result["position"] = found.position == spec.position
    if spec.background is not None:
        result["background"] = found.background == spec.background
    result["all"] = all(result.values())
    return result
