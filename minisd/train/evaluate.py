"""How well a model follows prompts of the shapes grammar, judged by the deterministic detector: txt2img
adherence per attribute (at any CFG scale), img2img (low strength keeps the layout, high strength takes
a new colour from the prompt) and inpainting (the new colour inside the mask, nothing changed outside)."""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw

from .detector import ATTRIBUTES, MIN_PURITY, check, detect, iou
from .shapes import COLORS, CaptionSpec, ShapesDataset, sample_caption

EVAL_SEED = 777  # prompts, init images and generation seeds: a stream the training never drew from
LAYOUT_IOU = 0.8  # img2img at strength 0.3 keeps the layout: object masks overlap at least this much
OUTSIDE_TOLERANCE = 2.0  # inpainting changes nothing outside the mask: mean change ≤ 2/255


class TextToImage(Protocol):
    """The part of `minisd.StableDiffusion` the evaluation uses (a test can pass a stand-in)."""

    def txt2img(self, prompt: str, **options: Any) -> list[Image.Image]: ...
    def img2img(self, init_image: Image.Image, prompt: str, **options: Any) -> list[Image.Image]: ...
    def inpaint(self, init_image: Image.Image, mask_image: Image.Image, prompt: str,
                **options: Any) -> list[Image.Image]: ...


@dataclass
class Adherence:
    """txt2img results over `prompts` prompts: the share of images right on each attribute and on all."""
    prompts: int
    cfg_scale: float | None  # None: the pipeline's default
    accuracy: dict[str, float]
    seconds_per_image: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (prompt, what the detector saw)
    images: list[Image.Image] = field(default_factory=list, repr=False)


def eval_specs(n: int, seed: int = EVAL_SEED) -> list[CaptionSpec]:
    """`n` complete captions (every attribute stated) drawn from the grammar."""
    rng = random.Random(seed)
    return [sample_caption(rng) for _ in range(n)]


def describe(image: Image.Image) -> str:
    d = detect(image)
    return f"{d.color} {d.shape} {d.position}, {d.background} background" if d.found else \
        f"no object, {d.background} background"


def adherence(model: TextToImage, n: int = 100, *, seed: int = EVAL_SEED, steps: int = 20,
              cfg_scale: float | None = None, size: int = 64, **options: Any) -> Adherence:
    """Generate one image per prompt (seed `seed + i`) and check every attribute with the detector."""
    if cfg_scale is not None:
        options["cfg_scale"] = cfg_scale
    hits = {name: 0 for name in (*ATTRIBUTES, "all")}
    seconds, failures, images = [], [], []
    for i, spec in enumerate(eval_specs(n, seed)):
        started = time.perf_counter()
        image = model.txt2img(spec.text, width=size, height=size, steps=steps, seed=seed + i, **options)[0]
        seconds.append(time.perf_counter() - started)
        result = check(image, spec)
        for name, ok in result.items():
            hits[name] += ok
        if not result["all"]:
            failures.append((spec.text, describe(image)))
        images.append(image)
    return Adherence(n, cfg_scale, {k: v / n for k, v in hits.items()}, statistics.median(seconds), failures, images)


def other_color(rng: random.Random, *avoid: str) -> str:
    return rng.choice([c for c in COLORS if c not in avoid])


def img2img_checks(model: TextToImage, n: int = 20, *, seed: int = EVAL_SEED, steps: int = 20, size: int = 64,
                   low: float = 0.3, high: float = 0.9, **options: Any) -> dict[str, float]:
    """On `n` dataset images: at strength `low` with the image's own caption the object mask is kept
    (IoU ≥ 0.8 with the input's); at strength `high` with another object colour in the prompt, the
    object takes that colour."""
    dataset, rng = ShapesDataset(seed, size=size), random.Random(seed)
    ious, recolored = [], 0
    for i in range(n):
        sample = dataset[i]
        kept = model.img2img(sample.image, sample.truth.text, strength=low, width=size, height=size, steps=steps,
                             seed=seed + i, **options)[0]
        ious.append(iou(detect(sample.image).mask, detect(kept).mask))
        new = replace(sample.truth, color=other_color(rng, sample.truth.color, sample.truth.background))
        changed = model.img2img(sample.image, new.text, strength=high, width=size, height=size, steps=steps,
                                seed=seed + i, **options)[0]
        found = detect(changed)
        recolored += found.color == new.color and found.purity >= MIN_PURITY
    return {"layout_kept": float(np.mean([v >= LAYOUT_IOU for v in ious])), "layout_iou_mean": float(np.mean(ious)),
            "recolored": recolored / n}


def object_mask(image: Image.Image, margin: int = 4) -> Image.Image:
    """White box around the detected object (its bounding box grown by `margin` pixels) on black."""
    d = detect(image)
    x0, y0, x1, y1 = d.bbox
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle([x0 - margin, y0 - margin, x1 + margin, y1 + margin], fill=255)
    return mask


def inpaint_checks(model: TextToImage, n: int = 20, *, seed: int = EVAL_SEED, steps: int = 20, size: int = 64,
                   strength: float = 1.0, **options: Any) -> dict[str, float]:
    """On `n` dataset images, repaint a box around the object with "a <new colour> <shape>": the object
    found afterwards has the new colour (pure, not noise) and lies inside the box, and outside the box
    the mean change is at most 2/255."""
    dataset, rng = ShapesDataset(seed + 1, size=size), random.Random(seed + 1)
    inside_ok, outside_ok, outside_change = 0, 0, []
    for i in range(n):
        sample = dataset[i]
        mask = object_mask(sample.image)
        color = other_color(rng, sample.truth.color, sample.truth.background)
        prompt = CaptionSpec(sample.truth.shape, color).text  # "a <colour> <shape>"
        out = model.inpaint(sample.image, mask, prompt, strength=strength, width=size,
                            height=size, steps=steps, seed=seed + i, **options)[0]
        inside = np.asarray(mask) > 127
        found = detect(out)
        inside_ok += (found.color == color and found.purity >= MIN_PURITY
                      and found.mask[inside].sum() >= 0.8 * found.mask.sum())
        before = np.asarray(sample.image.convert("RGB"), dtype=np.float32)
        after = np.asarray(out.convert("RGB"), dtype=np.float32)
        change = float(np.abs(after - before)[~inside].mean())
        outside_change.append(change)
        outside_ok += change <= OUTSIDE_TOLERANCE
    return {"new_color_inside": inside_ok / n, "unchanged_outside": outside_ok / n,
            "outside_change_255": float(np.mean(outside_change))}


def format_adherence(results: list[Adherence], default_cfg: float) -> str:
    """A Markdown table: one row per CFG scale, one column per attribute."""
    lines = ["| CFG scale | prompts | " + " | ".join(ATTRIBUTES) + " | all (adherence) | s/image |",
             "|---|---|" + "---|" * (len(ATTRIBUTES) + 2)]
    for r in results:
        scale = r.cfg_scale if r.cfg_scale is not None else default_cfg
        label = "0 (unconditional)" if scale == 0 else "1 (unguided)" if scale == 1 else f"{scale:g}"
        cells = " | ".join(f"{r.accuracy[a]:.0%}" for a in ATTRIBUTES)
        lines.append(f"| {label} | {r.prompts} | {cells} | **{r.accuracy['all']:.0%}** | {r.seconds_per_image:.2f} |")
    return "\n".join(lines)


def evaluation_report(model: TextToImage, n: int = 100, *, image_checks: int = 20, steps: int = 20, size: int = 64,
                      seed: int = EVAL_SEED) -> tuple[str, list[Adherence]]:
    """The whole evaluation as a Markdown section: adherence at CFG 0 (the unconditional model: what the
    images owe to the prompt), at CFG 1 (the conditional model, unguided) and at the pipeline's default CFG,
    the img2img and the inpainting checks. Also returns the adherence results (with their images), the
    default CFG's last."""
    from ..params import GenerationParams  # the pipeline's defaults: sampler and CFG scale

    defaults = GenerationParams()
    results = [adherence(model, n, seed=seed, steps=steps, cfg_scale=scale, size=size) for scale in (0.0, 1.0)]
    results.append(adherence(model, n, seed=seed, steps=steps, size=size))
    lines = ["## Evaluation", "",
             f"{n} prompts drawn from the caption grammar, one image each (fresh seeds), {steps} steps of "
             f"{defaults.sampler}, {size}×{size}; the deterministic detector (`minisd/train/detector.py`) checks "
             f"every attribute; adherence = all four right. `python bench/demo_eval.py` reruns it.", "",
             format_adherence(results, defaults.cfg_scale), ""]
    if image_checks:
        i2i = img2img_checks(model, image_checks, seed=seed, steps=steps, size=size)
        inp = inpaint_checks(model, image_checks, seed=seed, steps=steps, size=size)
        lines += [f"img2img on {image_checks} dataset images: at strength 0.3 the layout is kept (object IoU ≥ "
                  f"{LAYOUT_IOU}) in {i2i['layout_kept']:.0%} (mean IoU {i2i['layout_iou_mean']:.2f}); at strength "
                  f"0.9 with another colour in the prompt the object takes it in {i2i['recolored']:.0%}.", "",
                  f"Inpainting a box around the object with \"a <new colour> <shape>\" (strength 1.0): the new colour "
                  f"inside the mask in {inp['new_color_inside']:.0%}, nothing changed outside in "
                  f"{inp['unchanged_outside']:.0%} (mean change {inp['outside_change_255']:.2f}/255).", ""]
    lines.append(f"Time per {steps}-step image at the default CFG: {results[-1].seconds_per_image:.2f} s.")
    return "\n".join(lines), results
