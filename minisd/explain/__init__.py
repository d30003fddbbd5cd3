"""Pictures of what the model does: the forward process (noising), the reverse process (steps), classifier-free
guidance, cross-attention maps and the latent space. Each module's function returns an `Explanation`; the
`minisd explain` command writes it. Drawing needs the optional extra `minisd[explain]` (matplotlib)."""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Explanation:
    """One command's result: the picture, the frames of its animation, and the numbers it shows."""
    picture: Image.Image
    frames: list[Image.Image]
    facts: dict = field(default_factory=dict)
