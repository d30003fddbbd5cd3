"""The synthetic "shapes" dataset of the demo model: one circle, square or triangle of a named colour at a
named position on a plain background, with its caption ("a red circle on the left, blue background").
Every item is a pure function of (seed, index), so the dataset needs no files and never changes."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import NamedTuple

from PIL import Image, ImageDraw

# Far apart in RGB (every pair at least ~100 apart), so a colour survives the autoencoder and an imperfect
# model and is still named correctly by its nearest palette entry.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "orange": (255, 125, 0),
    "yellow": (250, 230, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 230),
    "purple": (160, 40, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Position name -> (phrase in the caption, centre as a fraction of width and height).
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "left": ("on the left", (0.25, 0.5)),
    "right": ("on the right", (0.75, 0.5)),
    "top": ("at the top", (0.5, 0.25)),
    "bottom": ("at the bottom", (0.5, 0.75)),
    "center": ("in the center", (0.5, 0.5)),
}
SIZE_RANGE = (0.32, 0.42)  # side of the shape's bounding box, as a fraction of the image side
JITTER = 0.04  # the centre moves by up to this fraction of the image side, so no two images are alike
SUPERSAMPLE = 4  # drawn 4× larger and box-filtered down: anti-aliased edges, pure interiors


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption says. `position` or `background` None: the caption does not mention it."""
    shape: str
    color: str
    position: str | None = None
    background: str | None = None

    @property
    def text(self) -> str:
        """The caption, e.g. "a red circle on the left, blue background"."""
        article = "an" if self.color[0] in "aeiou" else "a"
        words = f"{article} {self.color} {self.shape}"
        if self.position is not None:
            words += " " + POSITIONS[self.position][0]
        if self.background is not None:
            words += f", {self.background} background"
        return words

    @property
    def complete(self) -> bool:
        return self.position is not None and self.background is not None


class Sample(NamedTuple):
    image: Image.Image
    caption: str
    spec: CaptionSpec   # what the caption says
    truth: CaptionSpec  # everything the image shows (position and background always set)


def sample_caption(rng: random.Random, omit_prob: float = 0.0) -> CaptionSpec:
    """A random caption of the grammar; position and background are each left out with `omit_prob`."""
    color = rng.choice(COLORS)
    spec = CaptionSpec(shape=rng.choice(SHAPES), color=color, position=rng.choice(tuple(POSITIONS)),
                       background=rng.choice([c for c in COLORS if c != color]))
    if rng.random() < omit_prob:
        spec = replace(spec, position=None)
    if rng.random() < omit_prob:
        spec = replace(spec, background=None)
    return spec


def complete_spec(spec: CaptionSpec, rng: random.Random) -> CaptionSpec:
    """Fill in what the caption leaves open, at random (the background never equals the object's colour)."""
    position = spec.position or rng.choice(tuple(POSITIONS))
    background = spec.background or rng.choice([c for c in COLORS if c != spec.color])
    return replace(spec, position=position, background=background)


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Vertices of a square or an upward triangle whose bounding box is `side` wide and high around
    (cx, cy); None for a circle (drawn as an ellipse)."""
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(spec: CaptionSpec, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw the image of a caption: its unspecified attributes, the shape's size and its exact position
    come from `rng`."""
    spec = complete_spec(spec, rng)
    side = rng.uniform(*SIZE_RANGE) * size
    fx, fy = POSITIONS[spec.position][1]
    cx = (fx + rng.uniform(-JITTER, JITTER)) * size
    cy = (fy + rng.uniform(-JITTER, JITTER)) * size
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), PALETTE[spec.background])
    draw = ImageDraw.Draw(canvas)
    s = SUPERSAMPLE
    polygon = shape_polygon(spec.shape, cx * s, cy * s, side * s)
    if polygon is None:
        r = side * s / 2
        draw.ellipse([cx * s - r, cy * s - r, cx * s + r, cy * s + r], fill=PALETTE[spec.color])
    else:
        draw.polygon(polygon, fill=PALETTE[spec.color])
    return canvas.resize((size, size), Image.Resampling.BOX)


class ShapesDataset:
    """`ShapesDataset(seed)[i]` is always the same `Sample`: the caption, its omissions and the drawing
    all come from a generator seeded with (seed, i)."""

    def __init__(self, seed: int = 0, length: int = 1_000_000, size: int = 64, omit_prob: float = 0.0):
        self.seed, self.length, self.size, self.omit_prob = seed, length, size, omit_prob

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> random.Random:
        # Integer seeds hash the same in every process (unlike str/tuple hashing under PYTHONHASHSEED).
        return random.Random(self.seed * 0x9E3779B1 + index)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = self.rng(index)
        spec = sample_caption(rng, self.omit_prob)
        truth = complete_spec(spec, rng)
        return Sample(render(truth, rng, self.size), spec.text, spec, truth)


def parse_caption(text: str) -> CaptionSpec:
    """The inverse of `CaptionSpec.text` for captions of the grammar; raises ValueError otherwise."""
    words = text.strip().lower()
    background = None
    if "," in words:
        words, _, rest = words.partition(",")
        rest = rest.strip()
        if not rest.endswith(" background") or rest[: -len(" background")] not in PALETTE:
            raise ValueError(f"not a caption of the shapes grammar: {text!r}")
        background = rest[: -len(" background")]
    parts = words.split(" ", 3)
    if len(parts) < 3 or parts[0] not in ("a", "an") or parts[1] not in PALETTE or parts[2] not in SHAPES:
        raise ValueError(f"not a caption of the shapes grammar: {text!r}")
    position = None
    if len(parts) == 4:
        phrases = {phrase: name for name, (phrase, _) in POSITIONS.items()}
        if parts[3] not in phrases:
            raise ValueError(f"not a caption of the shapes grammar: {text!r}")
        position = phrases[parts[3]]
    return CaptionSpec(shape=parts[2], color=parts[1], position=position, background=background)
