"""Tests for minisd.image: tensors vs diffusers' image processor, A1111 resize/mask geometry worked out by
hand, blur vs scipy, infotext strings from A1111's rules, PNG metadata read back by the independent sd-parsers."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

import minisd.image as mi
from minisd.image import (
    blur_mask,
    format_infotext,
    image_grid,
    load_image,
    load_mask,
    mask_bbox,
    next_output_path,
    parse_infotext,
    pil_to_tensor,
    read_infotext,
    resize_image,
    save_output,
    save_png,
    tensor_to_pil,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def bands(width: int, height: int, spans, axis: str) -> Image.Image:
    """RGB image of solid bands: spans = [(start, stop, colour)] along x ('x') or y ('y')."""
    a = np.zeros((height, width, 3), np.uint8)
    for start, stop, colour in spans:
        if axis == "x":
            a[:, start:stop] = colour
        else:
            a[start:stop, :] = colour
    return Image.fromarray(a)


def near(arr: np.ndarray, colour, tol: int = 1) -> bool:
    return bool(np.all(np.abs(arr.astype(int) - np.array(colour)) <= tol))


# ---------------------------------------------------------------------------------------------- tensors


def test_pil_to_tensor_values_and_roundtrip():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    a[0, 0], a[0, 1], a[0, 2] = 0, 255, 128
    x = pil_to_tensor(Image.fromarray(a))
    assert x.shape == (1, 3, 6, 10) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert x[0, :, 0, 1].tolist() == [1.0, 1.0, 1.0]
    assert x[0, 0, 0, 2].item() == pytest.approx(128 / 255 * 2 - 1, abs=1e-7)
    # every 8-bit level survives the round trip
    (back,) = tensor_to_pil(x)
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), a)


def test_tensor_to_pil_rounding_by_hand():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 2 * (0.5 / 255) - 1]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    (im,) = tensor_to_pil(x)
    # 0 -> 127.5 -> 128 (half to even); 0.5/255 -> 0.5 -> 0 (half to even); out of range clamps
    assert np.asarray(im)[0, :, 0].tolist() == [0, 0, 128, 255, 255, 0]
    (grey,) = tensor_to_pil(torch.zeros(1, 1, 2, 2))
    assert grey.mode == "L" and np.asarray(grey).tolist() == [[128, 128], [128, 128]]
    assert len(tensor_to_pil(torch.zeros(3, 3, 4, 4))) == 3
    assert tensor_to_pil(torch.zeros(3, 4, 5))[0].size == (5, 4)


def test_tensors_match_diffusers_image_processor():
    ip = pytest.importorskip("diffusers.image_processor")
    proc = ip.VaeImageProcessor()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 16, generator=g) * 0.8
    # values whose denormalised *255 falls on .5 boundaries stress the rounding rule
    x[0, 0, 0] = torch.tensor([2 * ((k + 0.5) / 255) - 1 for k in range(0, 256, 16)], dtype=torch.float32)
    ours = tensor_to_pil(x)
    ref = proc.postprocess(x.clone(), output_type="pil")
    for a, b in zip(ours, ref):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    assert torch.equal(pil_to_tensor(img), proc.preprocess(img))


def test_load_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.new("RGB", (8, 4), RED).save(tmp_path / "o.jpg", exif=exif)
    im = load_image(tmp_path / "o.jpg")
    assert im.size == (4, 8) and near(np.asarray(im), RED, 2)
    Image.new("RGB", (8, 4)).save(tmp_path / "plain.png")
    assert load_image(tmp_path / "plain.png").size == (8, 4)


def test_rgba_init_image_composited_on_white():
    a = np.array([[[255, 0, 0, 51], [0, 0, 0, 0], [10, 20, 30, 255], [0, 0, 0, 51]]], np.uint8)
    x = pil_to_tensor(Image.fromarray(a, "RGBA"))
    px = ((x[0].permute(1, 2, 0) + 1) / 2 * 255).round().to(torch.uint8).tolist()[0]
    # 20% red over white: R = 255, G = B = 255 * 0.8 = 204; transparent -> white; opaque unchanged
    assert px == [[255, 204, 204], [255, 255, 255], [10, 20, 30], [204, 204, 204]]
    # palette image with a transparent index behaves the same
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    (back,) = tensor_to_pil(pil_to_tensor(p))
    assert np.asarray(back).tolist() == [[[255, 255, 255], [0, 0, 255]]]


# ---------------------------------------------------------------------------------------------- resizing


def test_just_resize_stretches():
    img = bands(100, 50, [(0, 50, RED), (50, 100, BLUE)], "x")
    out = resize_image(img, 64, 96)
    assert out.size == (64, 96)
    a = np.asarray(out)
    assert near(a[:, :28], RED) and near(a[:, 36:], BLUE)
    for mode in (0, "just_resize", "just resize"):
        assert np.array_equal(np.asarray(resize_image(img, 64, 96, mode)), a)


def test_crop_and_resize_geometry():
    # 200x100 -> 64x64: scaled to 128x64 (height fits), centred: columns 32..96 of the scaled image.
    img = bands(200, 100, [(0, 50, RED), (50, 150, GREEN), (150, 200, BLUE)], "x")
    out = resize_image(img, 64, 64, "Crop and resize")
    assert out.size == (64, 64)
    expected = img.resize((128, 64), Image.Resampling.LANCZOS).crop((32, 0, 96, 64))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert near(np.asarray(out)[:, 6:58], GREEN)  # the red and blue quarters are cut away

    # 300x200 -> 128x96: scaled to 144x96 (300*96//200), left = 64 - 72 = -8 -> columns 8..136
    img = bands(300, 200, [(0, 150, RED), (150, 300, BLUE)], "x")
    out = resize_image(img, 128, 96, 1)
    expected = img.resize((144, 96), Image.Resampling.LANCZOS).crop((8, 0, 136, 96))
    assert np.array_equal(np.asarray(out), np.asarray(expected))

    # portrait 100x200 -> 64x64: scaled to 64x128, rows 32..96
    img = bands(100, 200, [(0, 50, RED), (50, 150, GREEN), (150, 200, BLUE)], "y")
    out = resize_image(img, 64, 64, "crop")
    expected = img.resize((64, 128), Image.Resampling.LANCZOS).crop((0, 32, 64, 96))
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_resize_and_fill_geometry():
    # 200x100 -> 64x64: scaled to 64x32 at top = 32 - 16 = 16; margins repeat the edge rows.
    img = bands(200, 100, [(0, 30, RED), (30, 70, GREEN), (70, 100, BLUE)], "y")
    out = np.asarray(resize_image(img, 64, 64, "Resize and fill"))
    assert out.shape == (64, 64, 3)
    scaled = np.asarray(img.resize((64, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(out[16:48], scaled)
    assert near(out[:16], RED, 0) and near(out[48:], BLUE, 0)

    # odd height 63: top margin 31 - 16 = 15 rows, bottom 63 - 15 - 32 = 16 rows, no black line left
    out = np.asarray(resize_image(img, 64, 63, 2))
    assert np.array_equal(out[15:47], scaled)
    assert near(out[:15], RED, 0) and near(out[47:], BLUE, 0)

    # portrait 100x200 -> 64x64: scaled to 32x64 at left = 16; margins repeat the edge columns
    img = bands(100, 200, [(0, 30, RED), (30, 70, GREEN), (70, 100, BLUE)], "x")
    out = np.asarray(resize_image(img, 64, 64, "fill"))
    assert np.array_equal(out[:, 16:48], np.asarray(img.resize((32, 64), Image.Resampling.LANCZOS)))
    assert near(out[:, :16], RED, 0) and near(out[:, 48:], BLUE, 0)


def test_unknown_resize_mode():
    with pytest.raises(ValueError):
        resize_image(Image.new("RGB", (4, 4)), 8, 8, "zoom")
    with pytest.raises(ValueError):
        resize_image(Image.new("RGB", (4, 4)), 8, 8, 3)


# ---------------------------------------------------------------------------------------------- masks


def test_mask_white_is_repaint_and_resized():
    a = np.zeros((16, 32), np.uint8)
    a[:, :16] = 255  # left half white
    m = load_mask(Image.fromarray(a), 64, 64)
    assert m.shape == (1, 1, 64, 64) and m.dtype == torch.float32
    assert 0.0 <= m.min() and m.max() <= 1.0
    assert torch.allclose(m[..., :25], torch.ones(1)) and torch.allclose(m[..., 39:], torch.zeros(1))  # Lanczos: 3 px each side, x2
    # an RGB mask reads by luminance, grey stays partial, same size is not resampled
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = 255
    rgb[1, 1] = 128
    m = load_mask(Image.fromarray(rgb))
    assert m.shape == (1, 1, 4, 4)
    assert m[0, 0, 0, 0] == 1.0 and m[0, 0, 1, 1] == pytest.approx(128 / 255) and m[0, 0, 2, 2] == 0.0
    assert load_mask(Image.fromarray(rgb), invert=True)[0, 0, 0, 0] == 0.0


def test_mask_crop_mode_follows_init_image_geometry():
    # white band x 90..110 of 200x100; crop to 64x64 keeps columns 32..96 of the 128-wide scaled
    # mask, where the band sits at 57.6..70.4 -> 25.6..38.4 in the output
    a = np.zeros((100, 200), np.uint8)
    a[:, 90:110] = 255
    m = load_mask(Image.fromarray(a), 64, 64, "Crop and resize")[0, 0]
    assert m.shape == (64, 64)
    assert torch.all(m[:, 29:35] > 0.99)
    assert torch.all(m[:, :20] < 0.01) and torch.all(m[:, 45:] < 0.01)


def test_alpha_masks():
    # uniform black RGB; opaque = repaint, transparent = keep (A1111's reading of RGBA masks)
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4, 3] = 255
    a[0, 6, 3] = 200  # above the 128 threshold -> repaint
    a[1, 6, 3] = 100  # below -> keep
    m = load_mask(Image.fromarray(a, "RGBA"))[0, 0]
    assert torch.all(m[:, :4] == 1) and m[0, 6] == 1 and m[1, 6] == 0
    assert m[:, 4:].sum() == 1
    # the same through LA
    la = Image.fromarray(a[..., [0, 3]], "LA")
    assert torch.equal(load_mask(la)[0, 0], m)
    # a fully opaque RGBA mask is read by its colours: white = repaint
    b = np.zeros((8, 8, 4), np.uint8)
    b[..., 3] = 255
    b[2:4, 2:4, :3] = 255
    m = load_mask(Image.fromarray(b, "RGBA"))[0, 0]
    assert m.sum() == 4 and torch.all(m[2:4, 2:4] == 1)


def test_blur_matches_reflect101_gaussian():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    a = (rng.random((20, 30)) > 0.7).astype(np.float32)
    out = blur_mask(torch.from_numpy(a)[None, None], 4)
    assert out.shape == (1, 1, 20, 30) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    # scipy's "mirror" is cv2's BORDER_REFLECT_101; truncate 2.5 gives A1111's kernel size 2*int(2.5r+.5)+1
    ref = ndimage.gaussian_filter(a.astype(np.float64), sigma=4, mode="mirror", truncate=2.5)
    assert np.allclose(out[0, 0].numpy(), ref, atol=1e-6)
    ref = ndimage.gaussian_filter(a.astype(np.float64), sigma=(1.5, 6), mode="mirror", truncate=2.5)
    assert np.allclose(blur_mask(torch.from_numpy(a), 6, 1.5).numpy(), ref, atol=1e-6)
    # a kernel far wider than the image reflects repeatedly
    small = a[:3, :5]
    ref = ndimage.gaussian_filter(small.astype(np.float64), sigma=4, mode="mirror", truncate=2.5)
    assert np.allclose(blur_mask(torch.from_numpy(small), 4).numpy(), ref, atol=1e-6)
    # constants stay constant; radius 0 is the identity
    assert torch.allclose(blur_mask(torch.full((1, 1, 9, 7), 0.25), 3), torch.tensor(0.25))
    assert torch.equal(blur_mask(torch.from_numpy(a), 0), torch.from_numpy(a))


def test_load_mask_blur_before_resize():
    a = np.zeros((32, 32), np.uint8)
    a[8:24, 8:24] = 255
    m = load_mask(Image.fromarray(a), 64, 64, blur=2)
    assert m.shape == (1, 1, 64, 64) and 0 <= m.min() and m.max() <= 1
    soft = m[0, 0, 32]  # a row through the square: a soft ramp rather than a step
    assert 0.2 < soft[16] < 0.8 and soft[32] > 0.99 and soft[0] < 0.01


def _block(h, w, y1, y2, x1, x2):
    m = torch.zeros(1, 1, h, w)
    m[..., y1:y2, x1:x2] = 1
    return m


def test_mask_bbox_by_hand():
    m = _block(512, 512, 200, 232, 100, 228)
    assert mask_bbox(m) == (100, 200, 228, 232)
    # 128x32 region for 512x512: height grows to 128, 48 rows each side
    assert mask_bbox(m, 0, 512, 512) == (100, 152, 228, 280)
    # padding 8 -> (92, 192, 236, 240), 144x48 -> 144 tall: 48 each side
    assert mask_bbox(m, 8, 512, 512) == (92, 144, 236, 288)
    # at the top edge: (0, 0, 68, 20) wants 68 rows: y -24..44, moved down to 0..68
    assert mask_bbox(_block(256, 256, 0, 16, 0, 64), 4, 512, 512) == (0, 0, 68, 68)
    # at the bottom edge, 2:1 target: 64x6 wants 32 rows: 237..269, moved up to 224..256
    assert mask_bbox(_block(256, 256, 250, 256, 100, 164), 0, 512, 256) == (100, 224, 164, 256)
    # a tall region for a wide target grows in x: 10x100 wants 200 columns: -85..115 -> 0..200
    assert mask_bbox(_block(256, 256, 0, 100, 10, 20), 0, 512, 256) == (0, 0, 200, 100)
    # larger than the image: clipped to it
    assert mask_bbox(_block(50, 100, 20, 30, 0, 100), 0, 64, 64) == (0, 0, 100, 50)
    assert mask_bbox(torch.zeros(1, 1, 8, 8), 4, 64, 64) is None
    # float masks: set where an 8-bit mask would be nonzero; PIL masks by nonzero pixels
    f = torch.zeros(8, 8)
    f[1, 1], f[6, 6] = 0.001, 0.003
    assert mask_bbox(f) == (6, 6, 7, 7)
    assert mask_bbox(Image.fromarray((_block(8, 8, 2, 3, 4, 6)[0, 0].numpy() * 255).astype(np.uint8))) == (4, 2, 6, 3)


def test_image_grid():
    colours = [RED, GREEN, BLUE, (255, 255, 0), (0, 255, 255)]
    tiles = [Image.new("RGB", (8, 6), c) for c in colours]
    g = image_grid(tiles)  # 5 -> rows round(sqrt 5) = 2, cols 3
    assert g.size == (24, 12)
    a = np.asarray(g)
    for i, c in enumerate(colours):
        assert tuple(a[i // 3 * 6 + 3, i % 3 * 8 + 4]) == c
    assert tuple(a[9, 20]) == (0, 0, 0)  # empty sixth cell
    g = image_grid(tiles, cols=2)
    assert g.size == (16, 18) and tuple(np.asarray(g)[15, 4]) == (0, 255, 255)
    assert image_grid(tiles[:1]).size == (8, 6)
    assert image_grid(tiles[:4]).size == (16, 12)


# ---------------------------------------------------------------------------------------------- infotext

PROMPT = 'a photo of a cat, (masterpiece:1.2), "best"\nsecond line, by an artist'
NEGATIVE = "blurry, lowres\nbad hands"
PARAMS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7.5,
    "Seed": 42,
    "Size": "512x768",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Denoising strength": 0.75,
    "Clip skip": None,
    "Lora hashes": "add_detail: 7c6bad76eb54, film: 1a2b3c",
    "Hires prompt": 'two\nlines "quoted"',
    "Version": "minisd 0.1.0",
}
# Worked out from A1111's create_infotext: prompt, "\nNegative prompt: ", then "k: v" joined by ", ",
# None dropped, values with ',' ':' or newline JSON-quoted (json.dumps, non-ASCII kept).
EXPECTED = (
    'a photo of a cat, (masterpiece:1.2), "best"\n'
    "second line, by an artist\n"
    "Negative prompt: blurry, lowres\n"
    "bad hands\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, "
    'Lora hashes: "add_detail: 7c6bad76eb54, film: 1a2b3c", '
    'Hires prompt: "two\\nlines \\"quoted\\"", Version: minisd 0.1.0'
)


def test_format_infotext_exact():
    assert format_infotext(PROMPT, NEGATIVE, PARAMS) == EXPECTED
    # no negative prompt line when empty; a flag whose value equals its key is written bare
    text = format_infotext("cat", "", {"Steps": 1, "Sampler": "Euler", "Seed": 3, "Tiling": "Tiling"})
    assert text == "cat\nSteps: 1, Sampler: Euler, Seed: 3, Tiling"
    with pytest.raises(ValueError):
        format_infotext("cat", "", {"Bad:key": 1})


def test_parse_infotext_inverts_format():
    prompt, negative, params = parse_infotext(EXPECTED)
    assert prompt == PROMPT and negative == NEGATIVE
    assert params == {k: str(v) for k, v in PARAMS.items() if v is not None}


def test_parse_infotext_a1111_text():
    text = (
        "masterpiece, 1girl,\n"
        "  detailed background  \n"
        "Negative prompt: worst quality, (bad hands:1.3)\n"
        "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3761914539, Size: 512x768, "
        'Model hash: 6ce0161689, Lora hashes: "detail: ab12cd34ef56", Version: v1.6.0\n'
    )
    prompt, negative, params = parse_infotext(text)
    assert prompt == "masterpiece, 1girl,\ndetailed background"
    assert negative == "worst quality, (bad hands:1.3)"
    assert params["Sampler"] == "DPM++ 2M Karras" and params["Seed"] == "3761914539"
    assert params["Lora hashes"] == "detail: ab12cd34ef56" and params["Version"] == "v1.6.0"
    # fewer than three items on the last line: it is part of the prompt
    assert parse_infotext("a cat\nStyle: oil") == ("a cat\nStyle: oil", "", {})
    assert parse_infotext("Negative prompt: ugly\nSteps: 5, Seed: 1, Size: 8x8") == (
        "", "ugly", {"Steps": "5", "Seed": "1", "Size": "8x8"})


# ---------------------------------------------------------------------------------------------- files


def _png_chunk_types(path) -> list[bytes]:
    data = open(path, "rb").read()
    pos, types = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        types.append(data[pos + 4:pos + 8])
        pos += 12 + n
    return types


def test_png_read_back_by_sd_parsers(tmp_path):
    import sd_parsers
    img = Image.new("RGB", (8, 12), (10, 20, 30))
    path = save_png(img, tmp_path / "00000-42.png", EXPECTED)
    assert b"tEXt" in _png_chunk_types(path)
    with Image.open(path) as im:
        assert im.size == (8, 12) and np.asarray(im.convert("RGB"))[0, 0].tolist() == [10, 20, 30]

    info = sd_parsers.ParserManager().parse(path)
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in info.prompts] == [PROMPT]
    assert [p.value for p in info.negative_prompts] == [NEGATIVE]
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters["steps"] == "20"
    assert sampler.parameters["cfg_scale"] == "7.5"
    assert sampler.parameters["seed"] == "42"
    assert sampler.parameters["scheduler"] == "Karras"
    assert sampler.model.hash == "6ce0161689" and sampler.model.name == "v1-5-pruned-emaonly"
    assert info.metadata["Size"] == "512x768"

    assert read_infotext(path) == EXPECTED
    assert parse_infotext(read_infotext(path)) == (PROMPT, NEGATIVE, {k: str(v) for k, v in PARAMS.items() if v is not None})


def test_png_non_latin_text_uses_itxt(tmp_path):
    import sd_parsers
    text = format_infotext("猫, 🐱 on a mat", "ぼやけ", {"Steps": 4, "Sampler": "Euler a", "CFG scale": 5, "Seed": 7})
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "u.png", text)
    assert b"iTXt" in _png_chunk_types(path)
    assert read_infotext(path) == text
    info = sd_parsers.ParserManager().parse(path)
    assert info.prompts[0].value == "猫, 🐱 on a mat" and info.negative_prompts[0].value == "ぼやけ"


def test_read_infotext_jpeg_user_comment(tmp_path):
    import sd_parsers
    text = "a dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8"
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\0" + text.encode("utf-16-be")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", exif=exif)
    assert sd_parsers.ParserManager().parse(tmp_path / "a.jpg").prompts[0].value == "a dog"  # fixture is sound
    assert read_infotext(tmp_path / "a.jpg") == text
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    assert read_infotext(tmp_path / "b.png") is None


def test_save_png_never_overwrites(tmp_path, monkeypatch):
    path = save_png(Image.new("RGB", (4, 4), RED), tmp_path / "x.png", "first")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (4, 4), BLUE), path, "second")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.png"]

    # a writer that appears after the existence check still cannot be clobbered (the link refuses)
    monkeypatch.setattr(mi.os.path, "lexists", lambda p: False)
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (4, 4), BLUE), path, "third")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.png"]


def test_save_png_without_hardlinks(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(mi.os, "link", no_link)
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "y.png", "text")
    assert read_infotext(path) == "text" and os.listdir(tmp_path) == ["y.png"]
    before = path.read_bytes()
    monkeypatch.setattr(mi.os.path, "lexists", lambda p: False)
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (4, 4), RED), path, "other")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["y.png"]


def test_save_png_permissions_follow_umask(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = save_png(Image.new("RGB", (2, 2)), tmp_path / "p.png")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_next_output_path(tmp_path):
    out = tmp_path / "outputs" / "txt2img"
    assert next_output_path(out, 42) == out / "00000-42.png"  # created, empty: A1111 starts at 0
    for name in ["00007-1.png", "00003-9.png", "00011-3.jpg", "notes.txt", "grid-0099.png", ".00050-1.png.ab.tmp"]:
        (out / name).write_bytes(b"")
    assert next_output_path(out, 42) == out / "00012-42.png"
    p1 = save_output(Image.new("RGB", (2, 2)), out, 5, "t")
    p2 = save_output(Image.new("RGB", (2, 2)), out, 5, "t")
    assert (p1.name, p2.name) == ("00012-5.png", "00013-5.png")
