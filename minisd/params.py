"""GenerationParams: every setting of one generation request, with its default and its validation in one
place (the CLI, the Python API and a server fill it), and its round trip through A1111's infotext."""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from .errors import ParameterError
from .image import RESIZE_MODES, format_infotext, parse_infotext
from .prompts import EMPHASIS_MODES
from .samplers import SAMPLERS, resolve_sampler
from .schedule import resolve_schedule

MAX_SIDE = 8192
MAX_STEPS = 1000
MAX_SEED = 2**32 - 1  # A1111's seed range; -1 draws one
# A1111's "Schedule type" labels for our schedule names.
SCHEDULE_LABELS = {"uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                   "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "simple": "Simple",
                   "ddim_uniform": "DDIM", "normal": "Normal", "lcm": "LCM"}


@dataclass
class GenerationParams:
    """One request. `sampler` takes A1111 labels ("DPM++ 2M Karras") and ids ("dpmpp_2m"); `schedule`
    "Automatic" means the sampler's own default. `strength` is img2img/inpaint's denoising strength."""
    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None   # None: the model's own resolution (512 for SD 1.x)
    height: int | None = None
    steps: int = 20
    cfg_scale: float = 7.5
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    strength: float = 0.75
    mask_blur: int = 4
    inpaint_only_masked: bool = False
    only_masked_padding: int = 32
    resize_mode: str = "Just resize"
    eta: float | None = None
    guidance_rescale: float = 0.0
    emphasis: str = "Original"
    tiled_vae: bool | None = None  # None: tile the VAE only when an untiled pass would not fit in memory
    # None: cond and uncond in one batched UNet call unless only two separate calls fit in memory
    sequential_guidance: bool | None = None
    output: str = "pil"

    def validated(self) -> "GenerationParams":
        """A copy with names made canonical and the seed drawn; raises ParameterError on bad values."""
        p = dataclasses.replace(self)
        for name in ("width", "height"):
            if getattr(p, name) is None:
                continue  # filled in from the model by StableDiffusion.generate
            value = _integer(name, getattr(p, name))
            if value % 8 or not 8 <= value <= MAX_SIDE:
                low, high = max(8, value // 8 * 8), max(8, (value + 7) // 8 * 8)
                hint = f"; nearest valid sizes: {low} or {high}" if low != high else f"; try {low}"
                raise ParameterError(f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value}{hint}")
            setattr(p, name, value)
        p.steps = _in_range("steps", _integer("steps", p.steps), 1, MAX_STEPS)
        p.batch_size = _in_range("batch size", _integer("batch size", p.batch_size), 1, 64)
        p.n_iter = _in_range("n_iter", _integer("n_iter", p.n_iter), 1, 10_000)
        p.clip_skip = _in_range("clip skip", _integer("clip skip", p.clip_skip), 1, 12)
        p.mask_blur = _in_range("mask blur", _integer("mask blur", p.mask_blur), 0, 256)
        p.only_masked_padding = _in_range("padding", _integer("padding", p.only_masked_padding), 0, MAX_SIDE)
        p.cfg_scale = _in_range("CFG scale", _number("CFG scale", p.cfg_scale), 0.0, 100.0)
        p.strength = _in_range("strength", _number("strength", p.strength), 0.0, 1.0)
        p.guidance_rescale = _in_range("guidance rescale", _number("guidance rescale", p.guidance_rescale), 0.0, 1.0)
        if p.eta is not None:
            p.eta = _in_range("eta", _number("eta", p.eta), 0.0, 10.0)
        seed = _integer("seed", p.seed)
        p.seed = random.randrange(MAX_SEED + 1) if seed == -1 else _in_range("seed", seed, 0, MAX_SEED)
        try:
            spec = resolve_sampler(str(p.sampler))
            automatic = str(p.schedule).strip().lower() in ("", "automatic")
            p.schedule = spec.schedule if automatic else resolve_schedule(str(p.schedule))
        except ValueError as e:
            raise ParameterError(str(e)) from None
        p.sampler = SAMPLERS[spec.key].label
        if p.resize_mode not in RESIZE_MODES:
            raise ParameterError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {p.resize_mode!r}")
        if p.emphasis not in EMPHASIS_MODES:
            raise ParameterError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {p.emphasis!r}")
        if p.output not in ("pil", "latent"):
            raise ParameterError(f"output must be 'pil' or 'latent', got {p.output!r}")
        return p

    def infotext(self, seed: int, *, model_hash: str, model_name: str, version: str, task: str = "txt2img") -> str:
        """A1111's "parameters" text for the image made with `seed` (call on validated params)."""
        fields: dict[str, object] = {
            "Steps": self.steps, "Sampler": self.sampler, "Schedule type": SCHEDULE_LABELS.get(self.schedule,
                                                                                          self.schedule),
            "CFG scale": self.cfg_scale, "Seed": seed, "Size": f"{self.width}x{self.height}",
            "Model hash": model_hash, "Model": model_name}
        if task != "txt2img":
            fields["Denoising strength"] = self.strength
        if task == "inpaint":
            fields["Mask blur"] = self.mask_blur
        if self.clip_skip != 1:
            fields["Clip skip"] = self.clip_skip
        if self.guidance_rescale:
            fields["CFG Rescale phi"] = self.guidance_rescale
        fields["Version"] = version
        return format_infotext(self.prompt, self.negative_prompt, fields)

    @classmethod
    def from_infotext(cls, text: str) -> "GenerationParams":
        """The parameters recorded in an A1111 infotext (fields it does not record keep their defaults)."""
        prompt, negative, fields = parse_infotext(text)
        p = cls(prompt=prompt, negative_prompt=negative)
        try:
            if "Size" in fields:
                p.width, p.height = (int(v) for v in fields["Size"].lower().split("x"))
            for key, name, kind in (("Steps", "steps", int), ("CFG scale", "cfg_scale", float), ("Seed", "seed", int),
                                    ("Clip skip", "clip_skip", int), ("Denoising strength", "strength", float),
                                    ("Mask blur", "mask_blur", int), ("CFG Rescale phi", "guidance_rescale", float)):
                if key in fields:
                    setattr(p, name, kind(fields[key]))
        except ValueError as e:
            raise ParameterError(f"unreadable generation parameters: {e}") from None
        p.sampler = fields.get("Sampler", p.sampler)
        p.schedule = fields.get("Schedule type", p.schedule)
        return p


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParameterError(f"{name} must be an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ParameterError(f"{name} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise ParameterError(f"{name} must be an integer, got {value!r}")
    return int(number)


def _number(name: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ParameterError(f"{name} must be a finite number, got {value!r}")
    return number


def _in_range(name: str, value, low, high):
    if not low <= value <= high:
        raise ParameterError(f"{name} must be between {low} and {high}, got {value}")
    return value
