"""minisd explain: each command on the tiny and the demo model writes a picture (and an animation) of the expected
layout; the attention probe sees the same probabilities as diffusers' attention; the demo model's colour words
attend to the object; the noising frames have the schedule's SNR; the docs' figures and code links are current."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import minisd
from minisd.cli import main
from minisd.explain.doclinks import DOCS, check_links, code_links
from minisd.train.shapes import JITTER, POSITIONS, SIZE_RANGE, ShapesDataset

PROMPT = "a red circle on the left, blue background"
CELL = {"noising": 96, "steps": 72, "guidance": 96, "attention": 96, "latents": 96}


@pytest.fixture(scope="module")
def demo():
    return minisd.load("demo", dtype=torch.float32)


@pytest.fixture(scope="module")
def shape_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "shape.png"
    ShapesDataset(5)[0].image.save(path)
    return path


def command_args(command: str, image) -> tuple[list[str], tuple[int, int, int]]:
    """CLI words, and the picture's layout: columns and rows of cells, and frames of its animation."""
    if command in ("noising", "latents"):
        return [str(image)], (6, 5, 21) if command == "noising" else (4, 2, 2)
    words = [PROMPT, "--steps", "3"]
    if command == "steps":
        return words, (4, 2, 4)  # 3 steps and the result; 3 step frames and the result
    if command == "guidance":
        return words + ["--scales", "0,1,7.5,15"], (4, 3, 4)
    return words, (8, 2, 9)  # 9 tokens + the image in rows of 8; one frame per token


@pytest.mark.parametrize("command", ["noising", "steps", "guidance", "attention", "latents"])
@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_command_writes_picture(command, model, tmp_path, tiny_checkpoint, shape_png, capsys):
    words, (cols, rows, _) = command_args(command, shape_png)
    size = ["-W", "64", "-H", "64"] if model == "tiny" else []  # the tiny preset's native size is 512
    out = tmp_path / f"{command}.png"
    model_path = str(tiny_checkpoint) if model == "tiny" else "demo"
    assert main(["explain", command, *words, *size, "--model", model_path, "-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert (im.format, im.mode) == ("PNG", "RGB")
        width, height = im.size
    cell = CELL[command]
    # the cells with 6-pixel gaps, plus row labels, captions (≤ 4 lines of 14 px), a title, a plot beside
    assert cols * (cell + 6) <= width <= 1600
    assert rows * (cell + 6) <= height <= rows * (cell + 6 + 4 * 14 + 2) + 60


@pytest.mark.parametrize("command,suffix", [("noising", ".gif"), ("steps", ".webp"), ("guidance", ".gif"),
                                            ("attention", ".gif"), ("latents", ".webp")])
def test_animation(command, suffix, tmp_path, shape_png):
    words, (_, _, frames) = command_args(command, shape_png)
    out = tmp_path / f"{command}{suffix}"
    assert main(["explain", command, *words, "--animate", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == ("GIF" if suffix == ".gif" else "WEBP")
        assert im.n_frames == frames
        sizes = set()
        for i in range(frames):
            im.seek(i)
            sizes.add(im.size)
        assert len(sizes) == 1


def test_bad_input_is_one_line(tmp_path, shape_png, monkeypatch, capsys):
    cases = [
        (["latents", str(tmp_path / "missing.png")], "missing.png: image not found"),
        (["latents", str(shape_png), "--animate", "-o", str(tmp_path / "x.png")], "animation is written as .gif"),
        (["noising", str(shape_png), "--timesteps", "0,1000", "-o", str(tmp_path / "n.png")], "timestep 1000"),
        (["steps", PROMPT, "--sampler", "nope", "-o", str(tmp_path / "s.png")], "unknown sampler"),
        (["guidance", PROMPT, "--scales", "1,x"], "expected a number"),
        (["steps", PROMPT, "-W", "60"], "multiple of 8"),
    ]
    for words, message in cases:
        assert exit_code(["explain", *words]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (words, err)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    assert main(["explain", "latents", str(shape_png)]) == 2
    assert "pip install 'minisd[explain]'" in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit argparse raises for a usage error."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_probe_sees_the_attention_of_diffusers(tiny_checkpoint, tiny_config, tmp_path):
    """The probabilities the probe reads (softmax(q kᵀ/√d) of each cross-attention call) equal those diffusers'
    attention computes on the same weights, layer by layer; unset, the UNet's output is unchanged."""
    from diffusers.models.attention_processor import AttnProcessor

    from minisd.explain.attention import AttentionRecorder
    from minisd.testing import reference_components

    sd = minisd.load(tiny_checkpoint, dtype=torch.float32)
    ref_unet = reference_components(tiny_checkpoint, tiny_config, tmp_path)[0]
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([500.0, 500.0])

    ours = []
    recorder = AttentionRecorder(sd.unet)
    probe = recorder.probe

    def record(module, q, k):
        ours.append(torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1))
        probe(module, q, k)

    recorder.probe = record
    with torch.no_grad():
        plain = sd.unet(x, t, context)
        with recorder:
            probed = sd.unet(x, t, context)
        after = sd.unet(x, t, context)
    assert torch.equal(plain, probed) and torch.equal(plain, after)
    assert all(m.probe is None for m in recorder.modules)

    theirs = []

    class Capture(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            if encoder_hidden_states is not None:
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
                theirs.append(attn.get_attention_scores(q, k, None))  # (B·heads, n, L)
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    ref_unet.set_attn_processor(Capture())
    with torch.no_grad():
        ref_unet(x, t, encoder_hidden_states=context)
    assert len(ours) == len(theirs) == len(recorder.modules) > 0
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine.reshape(ref.shape), ref, rtol=1e-4, atol=1e-6)
    # The recorder's per-resolution maps: the head mean of the first batch item, averaged over layers.
    for n, total in recorder.sums.items():
        layers = [ref.reshape(2, -1, *ref.shape[1:])[0].mean(0) for ref in theirs if ref.shape[1] == n]
        torch.testing.assert_close(total / recorder.calls[n], torch.stack(layers).mean(0), rtol=1e-4, atol=1e-6)


def object_box(spec, size: int = 64) -> np.ndarray:
    """Where the dataset draws the object for a caption's position: the centre ± (largest half side + jitter)."""
    fx, fy = POSITIONS[spec.position][1]
    half = (SIZE_RANGE[1] / 2 + JITTER) * size
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    return (np.abs(xs - fx * size) <= half) & (np.abs(ys - fy * size) <= half)


def test_demo_colour_word_attends_to_the_object(demo):
    from minisd.explain.attention import attention_maps

    data = ShapesDataset(123)
    for i in range(10):
        spec = data[i].truth
        _, tokens, maps = attention_maps(demo, spec.text, steps=8, seed=i)
        inside = object_box(spec)
        colour, background = maps[tokens.index(spec.color)].numpy(), maps[tokens.index("background")].numpy()
        assert colour[inside].mean() > colour[~inside].mean(), spec.text
        assert background[inside].mean() < background[~inside].mean(), spec.text


def test_noising_snr_matches_the_schedule(demo):
    """The frames' measured SNR, var(√ᾱ x_0) / var(√(1 − ᾱ) ε), is the schedule's ᾱ/(1 − ᾱ) (diffusers' ᾱ) within
    10% for dataset latents: the formula assumes unit-variance data, which the scaling factor gives over the
    dataset (128 images; a single image's latent can be off by 17%, as the docs' figure shows)."""
    from diffusers import DDPMScheduler

    from minisd.explain.figures import DATASET_SEED
    from minisd.explain.noising import DEFAULT_TIMESTEPS, noise_latent
    from minisd.image import pil_to_tensor

    data = ShapesDataset(DATASET_SEED)
    with torch.inference_mode():
        x0 = demo.encode_latents(torch.cat([pil_to_tensor(data[i].image) for i in range(128)]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    frames = noise_latent(x0, demo.schedule.alphas_cumprod, DEFAULT_TIMESTEPS, noise)
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    for t, frame in zip(DEFAULT_TIMESTEPS, frames):
        alpha_bar = float(reference[t])
        assert frame.t == t and frame.alpha_bar == pytest.approx(alpha_bar, rel=1e-5)
        assert frame.measured_snr == pytest.approx(alpha_bar / (1 - alpha_bar), rel=0.10), t
        torch.testing.assert_close(frame.latent, alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise)


def test_make_docs_regenerates_the_figures(demo, tmp_path):
    """`make docs` writes the committed figures again. Pixels may differ by a level or two where another CPU
    rounds float32 differently; anything more is a change of the figure."""
    from minisd.explain.figures import make_figures

    make_figures(demo, tmp_path)
    committed = sorted((DOCS / "figures").glob("*.png"))
    assert [p.name for p in committed] == sorted(p.name for p in tmp_path.glob("*.png"))
    for path in committed:
        with Image.open(path) as a, Image.open(tmp_path / path.name) as b:
            assert a.size == b.size, path.name
            difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert (difference > 2).mean() < 1e-3, (path.name, (difference > 0).mean())
        assert path.stat().st_size < 200_000, path.name


def test_doc_code_links_point_at_their_code(tmp_path):
    links = [link for doc in DOCS.glob("*.md") for link in code_links(doc)]
    assert len(links) >= 20
    assert check_links(DOCS) == [], "code moved: `make docs` re-anchors links whose text is still there"
    # The check can fail: a link one line off is reported.
    link = next(link for link in links if link.start == link.end and link.start > 1)
    bad = tmp_path / "bad.md"
    wrong = f"[`{link.text}`]({link.target}#L{link.start - 1})".replace(str(link.target), "../" + link.target.name)
    (tmp_path / link.target.name).write_text(link.target.read_text())
    bad.write_text(wrong)
    assert len(check_links(tmp_path)) == 1
