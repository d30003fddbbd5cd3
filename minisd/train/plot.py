"""Loss curves drawn with PIL (no plotting library): one panel per training stage, raw losses in a light
colour, their moving average on top, log-scaled loss axis."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 300, 48


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_panel(draw: ImageDraw.ImageDraw, top: int, title: str, losses: Sequence[float]) -> None:
    left, right, bottom = MARGIN + 16, WIDTH - 16, top + HEIGHT - MARGIN
    draw.text((left, top + 8), title, fill="black")
    draw.rectangle([left, top + MARGIN // 2, right, bottom], outline="black")
    values = [v for v in losses if v > 0 and math.isfinite(v)]
    if len(values) < 2:
        draw.text((left + 8, top + HEIGHT // 2), "no losses recorded", fill="gray")
        return
    lo, hi = math.log10(min(values)), math.log10(max(values))
    hi = hi if hi > lo else lo + 1.0

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * i / (len(values) - 1)
        y = bottom - (bottom - top - MARGIN // 2) * (math.log10(v) - lo) / (hi - lo)
        return x, y

    draw.line([point(i, v) for i, v in enumerate(values)], fill=(180, 200, 235), width=1)
    smooth = moving_average(values, max(1, len(values) // 50))
    draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 200), width=2)
    draw.text((4, top + MARGIN // 2), f"{10 ** hi:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{10 ** lo:.3g}", fill="black")
    draw.text((left, bottom + 6), "step 0", fill="black")
    draw.text((right - 70, bottom + 6), f"step {len(values)}", fill="black")


def save_loss_curves(path: Path, curves: dict[str, Sequence[float]]) -> None:
    """One panel per named curve (loss per step), stacked vertically, written as a PNG."""
    image = Image.new("RGB", (WIDTH, HEIGHT * max(1, len(curves))), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, losses) in enumerate(curves.items()):
        draw_panel(draw, k * HEIGHT, title, losses)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
