"""The generation commands as a user runs them: files named <counter>-<seed>.png with A1111 metadata that
outside readers understand, reproduction from that metadata, Ctrl-C, and one-line errors for bad input."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minisd.image import read_infotext

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def minisd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minisd", *args], cwd=cwd, capture_output=True, text=True, env=ENV)


def png_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.png"))


def test_generate_writes_numbered_files_with_metadata_read_by_sd_parsers(tmp_path, tiny_checkpoint):
    from sd_parsers import ParserManager

    result = minisd("generate", "a red circle, (blue background:1.2)", "-n", "blurry, text", "-m",
                    str(tiny_checkpoint), "-W", "64", "-H", "48", "--steps", "3", "--seed", "41", "--batch-size", "2",
                    "--sampler", "Euler a", "--cfg-scale", "6.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert png_files(tmp_path / "outputs") == ["00000-41.png", "00001-42.png"]
    assert "seed 42" in result.stdout
    info = ParserManager().parse(str(tmp_path / "outputs" / "00001-42.png"))
    prompt, = info.prompts
    negative, = info.negative_prompts
    assert prompt.value == "a red circle, (blue background:1.2)" and negative.value == "blurry, text"
    sampler, = info.samplers
    assert sampler.name == "Euler a" and sampler.parameters["steps"] == "3"
    assert sampler.parameters["cfg_scale"] == "6.5" and sampler.parameters["seed"] == "42"
    assert info.metadata["Size"] == "64x48"
    assert sampler.model.hash == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()[:10]
    assert sampler.model.name == tiny_checkpoint.stem

    printed = minisd("pnginfo", str(tmp_path / "outputs" / "00001-42.png"), cwd=tmp_path)
    assert printed.returncode == 0 and printed.stdout.strip() == read_infotext(tmp_path / "outputs" / "00001-42.png")
    assert "Seed: 42, Size: 64x48" in printed.stdout


def test_from_image_regenerates_the_identical_image(tmp_path, tiny_checkpoint):
    first = minisd("generate", "a green square", "-m", str(tiny_checkpoint), "-W", "32", "-H", "32", "--steps", "4",
                   "--sampler", "DPM++ 2M Karras", "--clip-skip", "2", "-o", "first.png", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = minisd("generate", "--from-image", "first.png", "-m", str(tiny_checkpoint), "-o", "again.png",
                   cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("first.png", "again.png"))
    assert np.array_equal(a, b)
    assert read_infotext(tmp_path / "first.png") == read_infotext(tmp_path / "again.png")
    assert "Clip skip: 2" in read_infotext(tmp_path / "first.png")


def test_img2img_and_inpaint_commands(tmp_path, tiny_checkpoint):
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "init.png")
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    common = ["-m", str(tiny_checkpoint), "-W", "32", "-H", "32", "--steps", "3", "--seed", "1"]
    i2i = minisd("img2img", "blue", "--init", "init.png", "--strength", "0.5", *common, cwd=tmp_path)
    assert i2i.returncode == 0, i2i.stderr
    inp = minisd("inpaint", "blue", "--init", "init.png", "--mask", "mask.png", "--mask-blur", "2", *common,
                 cwd=tmp_path)
    assert inp.returncode == 0, inp.stderr
    text = read_infotext(tmp_path / "outputs" / "00001-1.png")
    assert "Denoising strength: 0.75" in text and "Mask blur: 2" in text


BAD = {
    "missing init image": (["img2img", "x", "--init", "nope.png"], "nope.png: init image not found"),
    "not an image": (["img2img", "x", "--init", "notes.png"], "init image: notes.png: not an image"),
    "width 500": (["generate", "x", "-W", "500"], "nearest valid sizes: 496 or 504"),
    "steps 0": (["generate", "x", "--steps", "0"], "steps must be between 1 and 1000"),
    "strength 1.5": (["img2img", "x", "--init", "ok.png", "--strength", "1.5"], "strength must be between"),
    "batch size 0": (["generate", "x", "--batch-size", "0"], "batch size must be between"),
    "unknown sampler": (["generate", "x", "--sampler", "Euler z"], "valid samplers: Euler a, Euler"),
    "cfg not a number": (["generate", "x", "--cfg-scale", "lots"], "CFG scale must be a number"),
    "unwritable output directory": (["generate", "x", "--outdir", "a-file/sub"], "cannot create the output directory"),
    "mask of an inpaint without mask": (["inpaint", "x", "--init", "ok.png"], "needs --init IMAGE and --mask MASK"),
    "unknown flag": (["generate", "x", "--stepz", "3"], "unrecognized arguments: --stepz"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tiny_checkpoint, case):
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "a-file").write_text("a file, not a folder")
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    before = png_files(tmp_path)
    args, phrase = BAD[case]
    result = minisd(*args, "-m", str(tiny_checkpoint), "--steps" if "--steps" not in args else "--seed", "2",
                    cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert phrase in result.stderr
    assert png_files(tmp_path) == before


def test_never_overwrites_an_existing_file(tmp_path, tiny_checkpoint):
    (tmp_path / "mine.png").write_bytes(b"precious")
    result = minisd("generate", "x", "-m", str(tiny_checkpoint), "-W", "16", "-H", "16", "--steps", "1", "-o",
                    "mine.png", cwd=tmp_path)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (tmp_path / "mine.png").read_bytes() == b"precious"


def test_ctrl_c_stops_cleanly(tmp_path, tiny_checkpoint):
    process = subprocess.Popen([sys.executable, "-m", "minisd", "generate", "x", "-m", str(tiny_checkpoint), "-W",
                                "256", "-H", "256", "--steps", "1000", "--seed", "3"], cwd=tmp_path, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "outputs").exists():
        time.sleep(0.2)
    time.sleep(3)  # well inside the sampling loop by now
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert png_files(tmp_path) == [] and not [p for p in (tmp_path / "outputs").iterdir()]
