"""`minisd batch` in one process (no Ray): one `{index:06d}.png` per JSONL line, identical to the same request
made through the library, seeds resolved per line, bad lines recorded without ending the run, and resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minisd
from minisd.batch import ResultsWriter, local_outcomes, read_lines, run_batch
from minisd.image import read_infotext

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def results(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "results.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def run(lines, outdir, **kw):
    seen = []
    summary = run_batch(lines, ResultsWriter(outdir), local_outcomes(dtype=torch.float32), quiet=True,
                        on_result=seen.append, **kw)
    return summary, seen


@pytest.fixture(scope="module")
def tiny_sd(tiny_checkpoint):
    return minisd.load(tiny_checkpoint, dtype=torch.float32)


def test_each_line_gives_the_image_of_the_same_library_call(tmp_path, tiny_checkpoint, tiny_sd):
    (tmp_path / "in").mkdir()
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    init.save(tmp_path / "in" / "init.png")
    jsonl = write_jsonl(tmp_path / "in" / "prompts.jsonl", [
        {"prompt": "a red circle", "width": 32, "height": 32, "steps": 3},
        "",  # blank lines are skipped, but keep the numbering of the lines after them
        {"prompt": "a blue square", "negative_prompt": "text", "size": "32x24", "steps": 2, "seed": 7,
         "sampler": "Euler a", "cfg_scale": 5},
        {"prompt": "repaint", "width": 32, "height": 32, "steps": 3, "init_image": "init.png", "strength": 0.6,
         "seed": -1},
    ])
    lines = read_lines(jsonl, base_seed=100, model=str(tiny_checkpoint))
    assert [line.index for line in lines] == [0, 2, 3]
    assert [line.request["seed"] for line in lines] == [100, 7, 103]  # own seed, else --seed + line index
    summary, seen = run(lines, tmp_path / "out")
    assert (summary.written, summary.skipped, summary.failed) == (3, 0, 0)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["000000.png", "000002.png", "000003.png"]

    expected = {0: tiny_sd.txt2img("a red circle", width=32, height=32, steps=3, seed=100)[0],
                2: tiny_sd.txt2img("a blue square", negative_prompt="text", width=32, height=24, steps=2, seed=7,
                                   sampler="Euler a", cfg_scale=5)[0],
                3: tiny_sd.img2img(init, "repaint", width=32, height=32, steps=3, strength=0.6, seed=103)[0]}
    for index, image in expected.items():
        path = tmp_path / "out" / f"{index:06d}.png"
        np.testing.assert_array_equal(pixels(path), np.asarray(image))
        assert read_infotext(path) == image.info["parameters"]
    assert "Sampler: Euler a" in read_infotext(tmp_path / "out" / "000002.png")
    entries = results(tmp_path / "out")
    assert [(e["index"], e["status"], e["file"], e["seed"]) for e in entries] == [
        (0, "ok", "000000.png", 100), (2, "ok", "000002.png", 7), (3, "ok", "000003.png", 103)]
    assert entries[1]["prompt"] == "a blue square" and entries[1]["infotext"] == expected[2].info["parameters"]


def test_bad_lines_are_reported_and_the_others_finish(tmp_path, tiny_checkpoint):
    jsonl = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "fine", "width": 32, "height": 32, "steps": 2},
        "not json",
        {"prompt": "x", "steps": 0},
        {"prompt": "x", "colour": "red"},
        {"prompt": "x", "batch_size": 2},
        {"prompt": "x", "width": 32, "height": 32, "steps": 2, "init_image": "missing.png"},  # fails on the worker
        {"prompt": "x", "width": 32, "height": 32, "steps": 2, "model": "nowhere.safetensors"},
        ["a list"],
        {"prompt": "also fine", "width": 32, "height": 32, "steps": 2, "seed": 5},
    ])
    summary, seen = run(read_lines(jsonl, model=str(tiny_checkpoint)), tmp_path / "out")
    assert (summary.written, summary.failed) == (2, 7)
    entries = {e["index"]: e for e in results(tmp_path / "out")}
    assert sorted(entries) == list(range(9))
    assert [entries[i]["status"] for i in range(9)] == ["ok"] + ["error"] * 7 + ["ok"]
    errors = {i: entries[i]["error"] for i in range(1, 8)}
    assert errors[1].startswith("line 2: not valid JSON")
    assert errors[2] == "line 3: steps must be between 1 and 1000, got 0"
    assert errors[3] == "line 4: unknown field 'colour'"
    assert errors[4].startswith("line 5: batch_size must be 1")
    assert errors[5] == f"line 6: {tmp_path / 'missing.png'}: init image not found"
    assert errors[6].startswith("line 7: ") and "nowhere.safetensors" in errors[6]
    assert errors[7] == "line 8: expected a JSON object, got list"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["000000.png", "000008.png"]


def test_a_rerun_skips_what_is_written_and_retries_what_failed(tmp_path, tiny_checkpoint):
    rows = [{"prompt": f"prompt {i}", "width": 32, "height": 32, "steps": 2} for i in range(4)]
    jsonl = write_jsonl(tmp_path / "prompts.jsonl", rows + [{"prompt": "late", "width": 32, "height": 32,
                                                              "steps": 2, "init_image": "later.png"}])
    out = tmp_path / "out"
    first, _ = run(read_lines(jsonl, model=str(tiny_checkpoint)), out)
    assert (first.written, first.failed) == (4, 1)
    before = {i: (out / f"{i:06d}.png").read_bytes() for i in range(4)}
    # A crash after image 2 was written but before its results line, and before image 3 was written:
    (out / "000003.png").unlink()
    kept = [e for e in results(out) if e["index"] not in (2, 3)]
    (out / "results.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept) + '{"index": 3, "sta')
    Image.new("RGB", (32, 32), "white").save(tmp_path / "later.png")  # the failed line can now run

    again, seen = run(read_lines(jsonl, model=str(tiny_checkpoint)), out)
    assert sorted(e["index"] for e in seen) == [3, 4]  # only what has no image
    assert (again.written, again.skipped, again.failed) == (2, 3, 0)
    assert (out / "000003.png").read_bytes() == before[3]  # same seed, same image
    entries = results(out)
    assert [e["index"] for e in entries] == [0, 1, 2, 3, 4] and {e["status"] for e in entries} == {"ok"}
    assert entries[2]["seed"] == 2 and entries[2]["infotext"] == read_infotext(out / "000002.png")


def test_cli_batch(tmp_path, tiny_checkpoint):
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "size": "32x32", "steps": 2},
                                               {"prompt": "b", "size": "32x32", "steps": 2, "sampler": "nope"}])
    cmd = [sys.executable, "-m", "minisd", "batch", str(jsonl), "--outdir", "out", "-m", str(tiny_checkpoint),
           "--seed", "40", "--dtype", "fp32"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=ENV)
    assert done.returncode == 1, done.stderr
    assert done.stdout == "wrote 1 image to out\n"
    assert done.stderr.splitlines()[-1] == "minisd: 1 of 2 lines failed: see out/results.jsonl"
    assert "Seed: 40," in read_infotext(tmp_path / "out" / "000000.png")
    assert results(tmp_path / "out")[1]["error"].startswith("line 2: unknown sampler")

    missing = subprocess.run(cmd[:4] + ["missing.jsonl", "--outdir", "out"], cwd=tmp_path, capture_output=True,
                             text=True, env=ENV)
    assert (missing.returncode, missing.stderr) == (2, "minisd: error: missing.jsonl: no such file\n")
    no_model = subprocess.run(cmd[:5] + ["--outdir", "out", "-m", "nowhere.safetensors"], cwd=tmp_path,
                              capture_output=True, text=True, env=ENV)
    assert (no_model.returncode, no_model.stderr) == (2, "minisd: error: nowhere.safetensors: model not found\n")


def test_ray_is_an_optional_extra(tmp_path):
    """The core never imports ray, and --ray without it is one line naming the extra."""
    code = ("import sys; import minisd, minisd.cli, minisd.batch; assert 'ray' not in sys.modules, 'ray imported'; "
            "sys.modules['ray'] = None; sys.exit(minisd.cli.main(['batch', 'p.jsonl', '--outdir', 'o', '--ray']))")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV)
    assert (done.returncode, done.stderr) == (2, "minisd: error: minisd batch --ray needs Ray: "
                                                 "pip install 'minisd[ray]'\n")
