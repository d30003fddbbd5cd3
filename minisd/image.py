"""The image side of the pipeline: PIL <-> tensors, A1111's resize modes, inpainting masks and grids,
and A1111's infotext ("parameters" PNG chunk) with the model hashes it quotes; formats follow AUTOMATIC1111's webui."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, PngImagePlugin

from .errors import ParameterError

PathLike = str | os.PathLike

LANCZOS = Image.Resampling.LANCZOS
WHITE = (255, 255, 255)  # A1111's default img2img_background_color for transparent init images


# --------------------------------------------------------------------------------------------------
# PIL <-> tensor


# Larger images are refused before a pixel is decoded: 8192² is the largest size GenerationParams allows (below
# PIL's own decompression-bomb limits of 89 MP, warning, and 179 MP, error).
MAX_IMAGE_PIXELS = 8192 * 8192


def _unreadable(path: PathLike, error: BaseException) -> ParameterError:
    return ParameterError(f"{path}: not an image that can be read ({type(error).__name__})")


@contextlib.contextmanager
def _open_checked(path: PathLike, max_pixels: int):
    """PIL's lazy open (headers only), refusing more than `max_pixels` declared pixels before any decoding.
    FileNotFoundError passes through; anything else PIL raises on a damaged file becomes a ParameterError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with one line
            im = Image.open(path)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError:
        raise ParameterError(f"{path}: the image declares more pixels than minisd decodes "
                             f"({max_pixels:,} at most)") from None
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, struct.error, ...
        raise _unreadable(path, e) from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ParameterError(f"{path}: a {width}×{height} image has more pixels than minisd decodes "
                                 f"({max_pixels:,} at most)")
        yield im


def load_image(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read an image file fully into memory, turned upright by its EXIF orientation (as A1111 reads uploads).
    FileNotFoundError when there is no such file; ParameterError when it is not a readable image or declares
    more than `max_pixels` pixels (refused before decoding)."""
    with _open_checked(path, max_pixels) as im:
        try:
            im.load()
            return ImageOps.exif_transpose(im)  # a new image (a copy when there is nothing to turn)
        except Exception as e:  # noqa: BLE001 - as in _open_checked: a damaged file, whatever PIL raises
            raise _unreadable(path, e) from None


def open_user_image(path: PathLike, what: str) -> Image.Image:
    """`load_image` for a file a user named as `what` ("init image", "mask"): every failure is one line."""
    try:
        return load_image(path)
    except FileNotFoundError:
        raise ParameterError(f"{path}: {what} not found") from None
    except ParameterError as e:
        raise ParameterError(f"{what}: {e}") from None
    except OSError as e:
        raise ParameterError(f"{path}: {what} cannot be read ({e.strerror or type(e).__name__})") from None


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def flatten(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """RGB copy of `img`; transparent pixels are composited over `background` (white, as A1111 does for init images)."""
    if not _has_transparency(img):
        return img.convert("RGB")
    rgba = img.convert("RGBA")  # also turns palette/grey transparency into a real alpha channel
    canvas = Image.new("RGBA", rgba.size, background)
    canvas.paste(rgba, mask=rgba)  # alpha-weighted blend, the same integer arithmetic A1111 gets
    return canvas.convert("RGB")


def pil_to_tensor(img: Image.Image, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1]: x/255*2-1 in float32, bit-equal to diffusers' VaeImageProcessor.preprocess."""
    arr = np.asarray(flatten(img, background), dtype=np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    return x * 2.0 - 1.0


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) or (C, H, W) in [-1, 1], C = 3 (RGB) or 1 (L) -> PIL images.

    Same arithmetic as diffusers' postprocess ((x*0.5+0.5).clamp(0,1), *255, round half to even), so
    fp32 decodes give the same bytes. Half-precision input is upcast first (diffusers denormalises in the
    half dtype, which can differ by one level). NaN becomes black rather than an undefined uint8 cast.
    """
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 3|1, H, W) image tensor, got shape {tuple(x.shape)}")
    x = torch.nan_to_num(x.detach().to("cpu", torch.float32), nan=-1.0)
    x = (x * 0.5 + 0.5).clamp(0, 1)
    arr = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, H, W, C)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a) for a in arr]


# --------------------------------------------------------------------------------------------------
# Resizing (A1111 images.resize_image, without its optional upscaler models)

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
_RESIZE_ALIASES = {
    "just_resize": 0, "resize": 0, "stretch": 0,
    "crop_and_resize": 1, "crop": 1,
    "resize_and_fill": 2, "fill": 2,
}


def resize_mode_index(mode: str | int) -> int:
    """A1111's resize mode number (0 Just resize, 1 Crop and resize, 2 Resize and fill) from a label, id or number."""
    if isinstance(mode, int) and not isinstance(mode, bool):
        if mode in (0, 1, 2):
            return mode
    elif isinstance(mode, str):
        key = mode.strip().lower()
        for i, label in enumerate(RESIZE_MODES):
            if key == label.lower():
                return i
        if key.replace(" ", "_").replace("-", "_") in _RESIZE_ALIASES:
            return _RESIZE_ALIASES[key.replace(" ", "_").replace("-", "_")]
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES} or 0-2")


def resize_image(img: Image.Image, width: int, height: int, mode: str | int = "Just resize") -> Image.Image:
    """Resize to exactly width x height with Lanczos, the way A1111 does for init images and masks.

    "Just resize" stretches. "Crop and resize" scales to cover the target and keeps the centre.
    "Resize and fill" scales to fit inside and fills the two margins by stretching the image's outermost
    row (or column) of pixels across them. The scaled size is the integer-floored aspect-preserving one,
    placed at (target//2 - scaled//2), as in A1111; where A1111 leaves a black line after the far margin
    (odd target sizes) the fill here reaches the edge.
    """
    index = resize_mode_index(mode)
    if index == 0:
        return img.resize((width, height), resample=LANCZOS)

    ratio, src_ratio = width / height, img.width / img.height
    cover = index == 1
    # Cover matches the width when the target is relatively wider, fit when it is relatively narrower;
    # the other side follows the source aspect, floored (A1111's integer arithmetic).
    if (ratio > src_ratio) if cover else (ratio < src_ratio):
        scaled_w, scaled_h = width, max(1, img.height * width // img.width)  # >= 1 for extreme aspects
    else:
        scaled_w, scaled_h = max(1, img.width * height // img.height), height
    resized = img.resize((scaled_w, scaled_h), resample=LANCZOS)
    left, top = width // 2 - scaled_w // 2, height // 2 - scaled_h // 2

    if cover:  # left, top <= 0: the centre crop
        return resized.crop((-left, -top, -left + width, -top + height))

    out = Image.new(img.mode, (width, height))
    out.paste(resized, (left, top))
    # A box of zero height (width) makes PIL sample the outermost row (column) for every output row,
    # which is how A1111 stretches the edge into the margin.
    below, right = height - top - scaled_h, width - left - scaled_w
    if top > 0:
        out.paste(resized.resize((width, top), box=(0, 0, width, 0)), (0, 0))
    if below > 0:
        out.paste(resized.resize((width, below), box=(0, scaled_h, width, scaled_h)), (0, top + scaled_h))
    if left > 0:
        out.paste(resized.resize((left, height), box=(0, 0, 0, height)), (0, 0))
    if right > 0:
        out.paste(resized.resize((right, height), box=(scaled_w, 0, scaled_w, height)), (left + scaled_w, 0))
    return out


# --------------------------------------------------------------------------------------------------
# Inpainting masks


def mask_to_l(img: Image.Image, round_alpha: bool = True) -> Image.Image:
    """The mask image as 8-bit 'L', 255 = repaint, with A1111's rule for alpha masks.

    An image with transparency that is not fully opaque is read by its alpha channel: opaque = repaint,
    transparent = keep (paint strokes on a transparent layer, as A1111's inpaint sketch and "inpaint
    upload" read RGBA masks), thresholded at alpha > 128 when `round_alpha`. Note ComfyUI's LoadImageMask
    ("alpha" channel) uses the opposite sense; minisd follows A1111. Any other image is read by its
    luminance: white = repaint, grey = partial.
    """
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda a: 255 if a > 128 else 0) if round_alpha else alpha
        img = rgba
    return img.convert("L")


def load_mask(
    img: Image.Image,
    width: int | None = None,
    height: int | None = None,
    resize_mode: str | int = "Just resize",
    blur: float = 0.0,
    invert: bool = False,
) -> torch.Tensor:
    """Inpainting mask as (1, 1, H, W) float32 in [0, 1], 1 = repaint (white, or opaque in an alpha mask).

    In A1111's order: read (see `mask_to_l`), invert, Gaussian blur of radius `blur` at the mask's own
    size, then resize to width x height with the init image's resize mode (Lanczos; overshoot clipped).
    Without width/height the mask keeps its size (for "inpaint only masked", which crops first).
    """
    l_mask = mask_to_l(img)
    m = torch.from_numpy(np.asarray(l_mask, dtype=np.float32) / 255.0)
    if invert:
        m = 1.0 - m
    if blur > 0:
        m = blur_mask(m, blur)
    if width is not None or height is not None:
        if width is None or height is None:
            raise ValueError("give both width and height, or neither")
        if (width, height) != (m.shape[1], m.shape[0]):
            # Resample in float ('F' mode) so a blurred edge is not quantised to 8 bits first.
            f_img = Image.fromarray(m.numpy(), mode="F")
            m = torch.from_numpy(np.asarray(resize_image(f_img, width, height, resize_mode), dtype=np.float32).copy())
    return m.clamp(0, 1)[None, None].contiguous()


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    # A1111 passes ksize = 2*int(2.5*sigma + 0.5) + 1 and sigma to cv2.GaussianBlur, whose kernel is the
    # sampled, normalised Gaussian.
    half = int(2.5 * sigma + 0.5)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-(t * t) / (2.0 * sigma * sigma))
    return k / k.sum()


def _reflect101(n: int, pad: int) -> torch.Tensor:
    """Source index for each position of a length-n axis padded by `pad` (cv2's default BORDER_REFLECT_101:
    ...c b | a b c d | c b..., repeated as far as the padding reaches)."""
    i = torch.arange(-pad, n + pad)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _blur_last_axis(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = _gaussian_kernel(sigma).to(x.dtype)
    half = (k.numel() - 1) // 2
    n = x.shape[-1]
    padded = x.index_select(-1, _reflect101(n, half))
    rows = padded.reshape(-1, 1, n + 2 * half)  # (rows, 1, n + 2*half) for conv1d
    return F.conv1d(rows, k.view(1, 1, -1)).reshape(x.shape)


def blur_mask(mask: torch.Tensor, radius: float, radius_y: float | None = None) -> torch.Tensor:
    """Gaussian blur over the last two axes (H, W) like A1111's mask_blur (sigma = radius; separate x/y radii).

    Same kernel size and reflect-101 border as A1111's cv2.GaussianBlur call, computed in float32.
    """
    radius_y = radius if radius_y is None else radius_y
    dtype = mask.dtype
    out = mask.to(torch.float32)
    if radius > 0:
        out = _blur_last_axis(out, radius)
    if radius_y > 0:
        out = _blur_last_axis(out.transpose(-1, -2), radius_y).transpose(-1, -2)
    return out.to(dtype).contiguous()


def mask_bbox(
    mask: torch.Tensor | Image.Image,
    padding: int = 0,
    width: int | None = None,
    height: int | None = None,
) -> tuple[int, int, int, int] | None:
    """Crop box (x1, y1, x2, y2) of the masked area for "inpaint only masked"; None for an empty mask.

    The tight box around nonzero pixels is grown by `padding` on each side and clamped to the mask
    (A1111's get_crop_region_v2). Given the processing width/height it is then widened in one direction
    to their aspect ratio, centred, shifted back inside the image where it would leave it, and clipped
    (A1111's expand_crop_region). A float mask counts a pixel as set where an 8-bit mask would be
    nonzero (value >= 0.5/255).
    """
    if isinstance(mask, Image.Image):
        m = np.asarray(mask.convert("L")) > 0
    else:
        t = mask.detach().to("cpu", torch.float32)
        t = t.reshape(-1, *t.shape[-2:]).amax(0)  # (H, W) union over any leading axes
        m = (t * 255 >= 0.5).numpy()
    img_h, img_w = m.shape
    cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
    if cols.size == 0:
        return None
    x1, x2 = int(cols[0]), int(cols[-1]) + 1
    y1, y2 = int(rows[0]), int(rows[-1]) + 1
    x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
    x2, y2 = min(x2 + padding, img_w), min(y2 + padding, img_h)
    if width is None or height is None:
        return x1, y1, x2, y2

    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _grow_span(y1, y2, (x2 - x1) / target, img_h)
    else:
        x1, x2 = _grow_span(x1, x2, (y2 - y1) * target, img_w)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, desired: float, limit: int) -> tuple[int, int]:
    extra = int(desired - (hi - lo))  # truncated, like A1111
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > limit:  # slide back inside, keeping the length
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Paste images row by row on a black RGB canvas; cells take the first image's size.

    Without `cols`, rows = round(sqrt(n)) as A1111's autodetect does, and cols = ceil(n / rows).
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    if cols is None:
        rows = max(1, round(math.sqrt(n)))
        cols = math.ceil(n / rows)
    else:
        if cols < 1:
            raise ValueError("cols must be >= 1")
        rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (i % cols * w, i // cols * h))
    return grid


# --------------------------------------------------------------------------------------------------
# Infotext: A1111's "parameters" text
#
#   <prompt, possibly several lines>
#   Negative prompt: <negative prompt, possibly several lines>     (omitted when empty)
#   Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: ..., ...

NEGATIVE_PREFIX = "Negative prompt:"

# One "Key: value" item of the parameters line. A value is either a JSON string (which may hold commas,
# colons, escaped quotes and \n) or the text up to the next comma. Equivalent to A1111's re_param.
_PARAM_ITEM = re.compile(
    r"""
    \s* (?P<key> \w [\w \-/]+ ) : \s*
    (?P<value> " (?: \\. | [^\\"] )+ "
             | [^,]* )
    (?: , | $ )
    """,
    re.VERBOSE,
)
_KEY = re.compile(r"\w[\w \-/]+")


def _quote(text: str) -> str:
    # A1111 JSON-quotes values holding ',', ':' or a newline. Values holding '"' or starting or ending
    # with whitespace are quoted too: A1111's parser would otherwise unquote or strip them (the last
    # value's trailing whitespace goes with the text's), so quoting is what lets them come back
    # unchanged (and A1111 reads the quoted form the same way).
    if any(c in text for c in ',:\n"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text  # not valid JSON after all: keep it verbatim, as A1111 does
    return text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """A1111's infotext: prompt, "Negative prompt: ..." (if any), then "Key: value, ..." in `params` order.

    None values are left out; a value equal to its key is written as the bare key (A1111's flags);
    values are str()-ed and quoted as described in `_quote`.
    """
    items = []
    for key, value in params.items():
        if value is None:
            continue
        if not _KEY.fullmatch(key):
            raise ValueError(f"infotext key {key!r} cannot be read back (letters, digits, _ space - / only)")
        text = str(value)
        items.append(key if text == key else f"{key}: {_quote(text)}")
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(items)}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of `format_infotext`, with A1111's parse_generation_parameters semantics.

    The last line is the parameters line when it holds at least three "Key: value" items; quoted
    values are unquoted, all values stay strings ("Size": "512x512"). Earlier lines are the prompt
    until one starts with "Negative prompt:", the rest the negative prompt; each line is stripped.
    """
    *lines, last = text.strip().split("\n")
    params: dict[str, str] = {}
    items = _PARAM_ITEM.findall(last)
    if len(items) >= 3:
        params = {key: _unquote(value) for key, value in items}
    else:
        lines.append(last)

    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        # Lines are joined with "\n", except onto an empty text (as A1111 does).
        if in_negative:
            negative = f"{negative}\n{line}" if negative else line
        else:
            prompt = f"{prompt}\n{line}" if prompt else line
    return prompt, negative, params


# --------------------------------------------------------------------------------------------------
# Files


def save_png(image: Image.Image, path: PathLike, infotext: str | None = None) -> Path:
    """Write `image` as PNG with the infotext in a "parameters" text chunk (tEXt, or iTXt when not Latin-1).

    The file appears complete or not at all: it is written to a temporary file in the same directory
    and then hard-linked into place, which fails instead of replacing. An existing `path` is never
    overwritten: FileExistsError, even against a concurrent writer.
    """
    path = Path(path)
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(path))
    pnginfo = None
    if infotext is not None:
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text("parameters", infotext)  # PIL picks iTXt for text outside Latin-1

    try:
        tmp, fd = _create_temp(path)
    except OSError as e:  # a read-only or full file system: name the file we meant to write
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", pnginfo=pnginfo)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # ENOSPC, EFBIG, EIO ...: the temporary file goes, `path` never appeared
            raise OSError(e.errno, e.strerror, str(path)) from None
        _link_new(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return path


def _create_temp(path: Path) -> tuple[Path, int]:
    # os.open with mode 0o666 lets the umask decide the final permissions (mkstemp would force 0600).
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


_NO_HARDLINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def _link_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and EEXIST rather than replacing an existing file
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARDLINKS:
            raise
        # A filesystem without hard links: exclusive create still never clobbers, at the cost of
        # readers possibly seeing the file before the copy ends.
        with open(path, "xb") as dst:
            try:
                with open(tmp, "rb") as src:
                    shutil.copyfileobj(src, dst)
            except BaseException:
                dst.close()
                os.unlink(path)
                raise


def _decode_user_comment(raw: bytes | str) -> str | None:
    """EXIF UserComment: an 8-byte charset id, then the text (A1111 writes "UNICODE" + UTF-16 big-endian)."""
    if isinstance(raw, str):
        return raw
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\x00":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        # No BOM: big-endian per the EXIF spec, unless the zero bytes sit at odd offsets (little-endian).
        little = body[1::2].count(0) > body[0::2].count(0)
        return body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    if head.rstrip(b"\x00") == b"ASCII" or head == b"\x00" * 8:
        return body.decode("latin-1").rstrip("\x00")
    return raw.decode("utf-8", errors="replace")


def read_infotext(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """The A1111 infotext of an image file: the PNG "parameters" chunk, else EXIF UserComment (JPEG/WebP).
    Errors as `load_image` (reading chunks after the pixel data decodes them, so the pixel limit applies)."""
    with _open_checked(path, max_pixels) as im:
        try:
            text = im.text.get("parameters") if im.format == "PNG" else None  # .text also sees chunks after IDAT
            if text is None:
                text = im.info.get("parameters")
            if text is None:
                raw = im.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD -> UserComment
                if raw:
                    text = _decode_user_comment(raw)
        except Exception as e:  # noqa: BLE001 - a damaged chunk or EXIF block, whatever PIL raises
            raise _unreadable(path, e) from None
    return None if text is None else str(text)


_COUNTER_PREFIX = re.compile(r"[0-9]+")


def next_output_path(outdir: PathLike, seed: int, suffix: str = ".png") -> Path:
    """`<outdir>/<counter:05>-<seed>.png`, counter = 1 + the largest number before the first '-' of any
    file name in outdir (0 in an empty one), as A1111 numbers its outputs. Creates outdir."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    highest = -1
    for name in os.listdir(outdir):
        first = os.path.splitext(name)[0].split("-")[0]
        if _COUNTER_PREFIX.fullmatch(first):
            highest = max(highest, int(first))
    counter = highest + 1
    while os.path.lexists(path := outdir / f"{counter:05}-{seed}{suffix}"):
        counter += 1
    return path


def save_output(image: Image.Image, outdir: PathLike, seed: int, infotext: str | None = None) -> Path:
    """Save to the next free `<counter:05>-<seed>.png` in outdir; retries when another process took the name."""
    for _ in range(1000):
        path = next_output_path(outdir, seed)
        try:
            return save_png(image, path, infotext)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free output name after 1000 tries", str(outdir))
