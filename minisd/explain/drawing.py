"""Drawing for the explain pictures: labelled grids of PIL images, colour-mapped heat maps and overlays,
matplotlib figures turned into PIL images, and writing a picture (PNG) or an animation (GIF/WebP).
matplotlib is imported only inside the functions that need it (the optional `minisd[explain]` extra)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import ParameterError

BACKGROUND = "white"
TEXT = (20, 20, 20)
PAD = 6           # pixels between cells
FONT_SIZE = 11
LINE = FONT_SIZE + 3
ANIMATED = (".gif", ".webp")


@functools.cache
def font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    """DejaVu Sans as matplotlib ships it: it has the Greek letters and maths signs of the captions (PIL's
    default font has not), and the same file everywhere keeps the pictures the same."""
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def fit(image: Image.Image, cell: int) -> Image.Image:
    """`image` scaled so its longer side is `cell` pixels: nearest-neighbour when enlarging (a 64-pixel image
    or an 8×8 latent keeps its pixels visible), Lanczos when shrinking."""
    w, h = image.size
    scale = cell / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == image.size:
        return image
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def text_height(lines: int) -> int:
    return lines * LINE + (2 if lines else 0)


def labelled_grid(rows: Sequence[Sequence[Image.Image | None]], *, captions: Sequence[Sequence[str]] | None = None,
                  row_labels: Sequence[str] | None = None, title: str | None = None, cell: int = 96,
                  label_width: int = 0) -> Image.Image:
    """Cells of `cell` pixels in rows; `captions[r][c]` (lines split on "\\n") is written under cell (r, c)
    (a column widens to its longest caption line), `row_labels[r]` to the left of row r, `title` on top.
    A None cell stays blank."""
    n_cols = max(len(r) for r in rows)
    widths = [cell] * n_cols
    for row in captions or []:
        for c, text in enumerate(row):
            for line in text.split("\n") if text else []:
                widths[c] = max(widths[c], int(font().getlength(line)) + 2)
    lefts = [sum(widths[:c]) + c * PAD for c in range(n_cols)]
    caption_lines = [max((len(c.split("\n")) for c in row if c), default=0) for row in (captions or [[]] * len(rows))]
    row_heights = [cell + text_height(lines) for lines in caption_lines]
    if row_labels and not label_width:
        label_width = max(int(font().getlength(line)) for label in row_labels for line in label.split("\n")) + PAD
    top = text_height(len(title.split("\n"))) + PAD if title else 0
    width = label_width + sum(widths) + n_cols * PAD + PAD
    if title:
        width = max(width, int(max(font().getlength(line) for line in title.split("\n"))) + 2 * PAD)
    height = top + sum(h + PAD for h in row_heights) + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.multiline_text((PAD, PAD), title, fill=TEXT, font=font(), spacing=3)
    y = top + PAD
    for r, row in enumerate(rows):
        if row_labels:
            draw.multiline_text((PAD, y + cell // 2 - LINE // 2), row_labels[r], fill=TEXT, font=font(), spacing=3)
        for c, image in enumerate(row):
            x = label_width + PAD + lefts[c]
            if image is not None:
                image = fit(image.convert("RGB"), cell)
                canvas.paste(image, (x + (widths[c] - image.width) // 2, y + (cell - image.height) // 2))
            text = captions[r][c] if captions and c < len(captions[r]) else ""
            if text:
                draw.multiline_text((x, y + cell + 2), text, fill=TEXT, font=font(), spacing=3)
        y += row_heights[r] + PAD
    return canvas


def side_by_side(*images: Image.Image) -> Image.Image:
    """Images next to each other, top-aligned, on the background colour."""
    width = sum(im.width for im in images) + PAD * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(im.height for im in images)), BACKGROUND)
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width + PAD
    return canvas


def stacked(*images: Image.Image) -> Image.Image:
    """Images one under the other, left-aligned."""
    height = sum(im.height for im in images) + PAD * (len(images) - 1)
    canvas = Image.new("RGB", (max(im.width for im in images), height), BACKGROUND)
    y = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (0, y))
        y += im.height + PAD
    return canvas


def colormap(values: np.ndarray, name: str) -> np.ndarray:
    """Values in [0, 1] (any shape) -> RGB uint8 (shape + (3,)) through a matplotlib colour map."""
    import matplotlib

    rgba = matplotlib.colormaps[name](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def heatmap(values: torch.Tensor | np.ndarray, lo: float, hi: float, name: str = "viridis") -> Image.Image:
    """A 2-D array drawn with colour map `name`, `lo` and `hi` at its two ends (one pixel per value)."""
    array = np.asarray(torch.as_tensor(values).detach().float().cpu(), dtype=np.float64)
    return Image.fromarray(colormap((array - lo) / (hi - lo), name))


def overlay(image: Image.Image, values: np.ndarray, alpha: float = 0.6, name: str = "jet") -> Image.Image:
    """A heat map in [0, 1] (the image's size) laid over a greyed copy of the image, as DAAM draws them."""
    grey = np.asarray(image.convert("L").convert("RGB"), dtype=np.float64)
    heat = colormap(values, name).astype(np.float64)
    return Image.fromarray((alpha * heat + (1 - alpha) * grey).round().astype(np.uint8))


def figure_image(figure) -> Image.Image:
    """A matplotlib Figure rendered by the Agg backend (no pyplot, no global state) as a PIL RGB image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def new_figure(width_px: int, height_px: int, dpi: int = 100):
    """A matplotlib Figure of the given pixel size (made without pyplot)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)


def output_path(path: str | Path | None, command: str, animate: bool) -> Path:
    """Where a command writes: the user's path (.png, or .gif/.webp for an animation), else
    outputs/explain/<command>.png|.gif; the folder is created."""
    if path is None:
        path = Path("outputs/explain") / (command + (".gif" if animate else ".png"))
    path = Path(path)
    suffix = path.suffix.lower()
    if animate and suffix not in ANIMATED:
        raise ParameterError(f"{path}: an animation is written as .gif or .webp")
    if not animate and suffix != ".png":
        raise ParameterError(f"{path}: a picture is written as .png (use --animate for .gif or .webp)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParameterError(f"{path.parent}: cannot create the output directory ({e.strerror})") from None
    return path


def save(path: Path, picture: Image.Image | None = None, frames: Sequence[Image.Image] | None = None,
         duration_ms: int = 400) -> Path:
    """Write a PNG (`picture`) or an animation (`frames`, by the suffix: GIF or lossless WebP), looping."""
    if path.suffix.lower() in ANIMATED:
        first, *rest = pad_frames(frames)
        options = {"lossless": True} if path.suffix.lower() == ".webp" else {"optimize": False}
        first.save(path, save_all=True, append_images=rest, duration=duration_ms, loop=0, **options)
    else:
        picture.save(path, optimize=True)
    return path


def pad_frames(frames: Sequence[Image.Image]) -> list[Image.Image]:
    """Frames of differing sizes on canvases of the largest size (an animation needs one size)."""
    width, height = max(f.width for f in frames), max(f.height for f in frames)
    out = []
    for f in frames:
        canvas = Image.new("RGB", (width, height), BACKGROUND)
        canvas.paste(f.convert("RGB"), (0, 0))
        out.append(canvas)
    return out
