"""GenerationParams: every setting of one generation request, with its default and its validation in one
place (the CLI, the Python API and a server fill it), and its round trip through A1111's infotext."""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Mapping

from .errors import ParameterError
from .image import RESIZE_MODES, format_infotext, parse_infotext
from .prompts import EMPHASIS_MODES
from .a1111_inpaint import INPAINT_MODES, MASKED_CONTENT
from .rng import RNG_LABELS, normalize_rng
from .samplers import SAMPLERS, resolve_sampler
from .schedule import resolve_schedule

MAX_SIDE = 8192
MAX_STEPS = 1000
MAX_PROMPT_LENGTH = 10_000  # characters of the prompt and of the negative prompt
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
    # Speed options that change the image a little, off by default: guidance only on the steps i with
    # start <= i/steps < end (one UNet pass on the others; denoiser.guidance_interval), and DeepCache's reuse of
    # the deep UNet features, recomputed on every `cache_interval`-th UNet call only (deep_cache.py).
    cfg_interval: tuple[float, float] | None = None
    cache_interval: int = 1
    # SDXL base + refiner (A1111's "Refiner, switch at"): the fraction of the steps after which the refiner
    # attached to the model (StableDiffusion.refiner) takes over; None: 0.8 when a refiner is attached.
    refiner_switch_at: float | None = None
    output: str = "pil"
    # A1111's noise and seed options (rng.py, seeds.py). rng "cpu" is minisd's default for new images; an A1111
    # infotext without "RNG:" means "gpu" (from_infotext). subseed -1 draws one when subseed_strength > 0.
    rng: str = "cpu"
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    eta_noise_seed_delta: int = 0
    noise_multiplier: float = 1.0  # img2img: the noise is scaled by this before sampling
    sgm_noise_multiplier: bool = False  # start from noise · sqrt(1 + σ₀²) instead of noise · σ₀
    schedule_sigma_min: float | None = None
    schedule_sigma_max: float | None = None
    schedule_rho: float | None = None
    # Hires. fix (hires_fix.py): txt2img at width x height, upscale by hr_scale (or to hr_resize_x x hr_resize_y),
    # then img2img with `strength` for hr_steps (0: `steps`).
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_steps: int = 0
    hr_upscaler: str = "Latent"
    # Inpainting with an ordinary model: "minisd" re-imposes the noised original before every model call;
    # "a1111" blends as A1111 does (a1111_inpaint.py), with A1111's "Masked content" (inpainting_fill).
    inpaint_mode: str = "minisd"
    inpainting_fill: str = "original"

    def validated(self) -> "GenerationParams":
        """A copy with names made canonical and the seed drawn; raises ParameterError on bad values."""
        p = dataclasses.replace(self)
        for name in ("prompt", "negative_prompt"):  # bounds the chunks to encode: ≤ 4 tokens per character
            if isinstance(getattr(p, name), str) and len(getattr(p, name)) > MAX_PROMPT_LENGTH:
                raise ParameterError(f"{name.replace('_', ' ')} is {len(getattr(p, name)):,} characters long; "
                                     f"at most {MAX_PROMPT_LENGTH:,} are accepted")
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
        if p.refiner_switch_at is not None:
            p.refiner_switch_at = _in_range("refiner switch at", _number("refiner switch at", p.refiner_switch_at),
                                            0.0, 1.0)
        _validate_a1111_options(p)
        _validate_speed_options(p)
        return p

    def infotext(self, seed: int, *, model_hash: str, model_name: str, version: str, task: str = "txt2img",
                 extra: Mapping[str, object] | None = None) -> str:
        """A1111's "parameters" text for the image made with `seed` (call on validated params); `extra` fields
        (what the model carries: "VAE", "Lora hashes", "TI hashes") go before "Version", as in A1111."""
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
        fields.update(_a1111_fields(self, seed, task))
        fields.update(_speed_fields(self))
        fields.update(extra or {})
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
                                    ("Mask blur", "mask_blur", int), ("CFG Rescale phi", "guidance_rescale", float),
                                    ("Refiner switch at", "refiner_switch_at", float)):
                if key in fields:
                    setattr(p, name, kind(fields[key]))
        except ValueError as e:
            raise ParameterError(f"unreadable generation parameters: {e}") from None
        p.sampler = fields.get("Sampler", p.sampler)
        p.schedule = fields.get("Schedule type", p.schedule)
        _read_a1111_fields(p, fields)
        _read_speed_fields(p, fields)
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


# ---- A1111's seed, noise, schedule and hires fields ----------------------------------------------------------

HR_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                "Latent (nearest)", "Latent (nearest-exact)", "None", "Lanczos", "Nearest")
# (infotext key, field, type) of the plain numeric fields.
_A1111_NUMBERS = (("Variation seed", "subseed", int), ("Variation seed strength", "subseed_strength", float),
                  ("ENSD", "eta_noise_seed_delta", int), ("Noise multiplier", "noise_multiplier", float),
                  ("Schedule max sigma", "schedule_sigma_max", float),
                  ("Schedule min sigma", "schedule_sigma_min", float), ("Schedule rho", "schedule_rho", float),
                  ("Hires upscale", "hr_scale", float), ("Hires steps", "hr_steps", int))


def _validate_a1111_options(p: GenerationParams) -> None:
    p.rng = normalize_rng(p.rng)
    p.subseed_strength = _in_range("variation seed strength", _number("variation seed strength",
                                                                     p.subseed_strength), 0.0, 1.0)
    subseed = _integer("variation seed", p.subseed)
    if subseed == -1 and p.subseed_strength > 0:
        subseed = random.randrange(MAX_SEED + 1)
    p.subseed = subseed if subseed == -1 else _in_range("variation seed", subseed, 0, MAX_SEED)
    for name in ("seed_resize_from_w", "seed_resize_from_h", "hr_resize_x", "hr_resize_y"):
        setattr(p, name, _in_range(name, _integer(name, getattr(p, name)), 0, MAX_SIDE))
    p.eta_noise_seed_delta = _in_range("ENSD", _integer("ENSD", p.eta_noise_seed_delta), 0, 2**63 - 2**33)
    p.noise_multiplier = _in_range("noise multiplier", _number("noise multiplier", p.noise_multiplier), 0.0, 10.0)
    for name in ("schedule_sigma_min", "schedule_sigma_max", "schedule_rho"):
        if getattr(p, name) is not None:
            value = _number(name, getattr(p, name))
            if value <= 0:
                raise ParameterError(f"{name} must be positive, got {value}")
            setattr(p, name, value)
    p.hr_scale = _in_range("hires upscale", _number("hires upscale", p.hr_scale), 1.0, 8.0)
    p.hr_steps = _in_range("hires steps", _integer("hires steps", p.hr_steps), 0, MAX_STEPS)
    if p.inpaint_mode not in INPAINT_MODES:
        raise ParameterError(f"inpaint mode must be one of {', '.join(INPAINT_MODES)}, got {p.inpaint_mode!r}")
    if p.inpainting_fill not in MASKED_CONTENT:
        raise ParameterError(f"masked content must be one of {', '.join(MASKED_CONTENT)}, got {p.inpainting_fill!r}")
    if p.hr_upscaler not in HR_UPSCALERS:
        raise ParameterError(f"hires upscaler must be one of {', '.join(HR_UPSCALERS)}, got {p.hr_upscaler!r}")


def _a1111_fields(p: GenerationParams, seed: int, task: str) -> dict[str, object]:
    """The infotext fields of the options above that differ from A1111's defaults, with "RNG" always written
    (a bare A1111 infotext means GPU noise, minisd's default is CPU)."""
    fields: dict[str, object] = {}
    if p.subseed_strength:
        fields["Variation seed"] = p.subseed
        fields["Variation seed strength"] = p.subseed_strength
    if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0:
        fields["Seed resize from"] = f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"
    if p.eta_noise_seed_delta:
        fields["ENSD"] = p.eta_noise_seed_delta
    if task != "txt2img" and p.noise_multiplier != 1.0:
        fields["Noise multiplier"] = p.noise_multiplier
    if task == "inpaint" and p.inpainting_fill != "original":
        fields["Masked content"] = p.inpainting_fill
    if task == "inpaint" and p.inpaint_only_masked:
        fields["Inpaint area"] = "Only masked"
        fields["Masked area padding"] = p.only_masked_padding
    if p.sgm_noise_multiplier:
        fields["SGM noise multiplier"] = True
    for key, name in (("Schedule max sigma", "schedule_sigma_max"), ("Schedule min sigma", "schedule_sigma_min"),
                      ("Schedule rho", "schedule_rho")):
        if getattr(p, name) is not None:
            fields[key] = getattr(p, name)
    if p.emphasis != "Original":
        fields["Emphasis"] = p.emphasis
    if task == "txt2img" and p.enable_hr:
        fields["Denoising strength"] = p.strength
        if p.hr_resize_x or p.hr_resize_y:
            fields["Hires resize"] = f"{p.hr_resize_x}x{p.hr_resize_y}"
        else:
            fields["Hires upscale"] = p.hr_scale
        if p.hr_steps:
            fields["Hires steps"] = p.hr_steps
        fields["Hires upscaler"] = p.hr_upscaler
    fields["RNG"] = RNG_LABELS[p.rng]
    return fields


def _read_a1111_fields(p: GenerationParams, fields: dict[str, str]) -> None:
    """Fill `p` from A1111's infotext fields; no "RNG" means GPU, except in minisd's own older images."""
    try:
        for key, name, kind in _A1111_NUMBERS:
            if key in fields:
                setattr(p, name, kind(fields[key]))
        for key, names in (("Seed resize from", ("seed_resize_from_w", "seed_resize_from_h")),
                           ("Hires resize", ("hr_resize_x", "hr_resize_y"))):
            if key in fields:
                setattr(p, names[0], int(fields[key].lower().split("x")[0]))
                setattr(p, names[1], int(fields[key].lower().split("x")[1]))
    except (ValueError, IndexError) as e:
        raise ParameterError(f"unreadable generation parameters: {e}") from None
    if "RNG" in fields:
        p.rng = fields["RNG"]
    else:
        p.rng = "cpu" if fields.get("Version", "").startswith("minisd") else "gpu"
    p.sgm_noise_multiplier = fields.get("SGM noise multiplier", "False").strip().lower() == "true"
    if "Emphasis" in fields:
        p.emphasis = fields["Emphasis"]
    p.inpaint_only_masked = fields.get("Inpaint area", "Whole picture") == "Only masked"
    p.inpainting_fill = fields.get("Masked content", p.inpainting_fill)
    if "Mask blur" in fields and not fields.get("Version", "").startswith("minisd"):
        p.inpaint_mode = "a1111"  # reproducing an A1111 inpainting
    if "Masked area padding" in fields:
        p.only_masked_padding = fields["Masked area padding"]
    p.enable_hr = any(key in fields for key in ("Hires upscale", "Hires resize", "Hires upscaler", "Hires steps"))
    if "Hires upscaler" in fields:
        p.hr_upscaler = fields["Hires upscaler"]


# ---- speed options (issue 13) --------------------------------------------------------------------------------

# `minisd generate --preset NAME`: field values set before the user's flags. "fast" is the few-step workflow of
# LCM models and LCM-LoRA (4 steps, CFG 1: one UNet pass per step).
GENERATION_PRESETS: dict[str, dict[str, object]] = {"fast": {"sampler": "LCM", "steps": 4, "cfg_scale": 1.0}}

def parse_cfg_interval(value: object) -> tuple[float, float] | None:
    """"A,B" (or a pair) -> (A, B) with 0 <= A < B <= 1, fractions of the steps; None stays None."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        start, end = (_number("CFG interval", v) for v in parts)
    except (TypeError, ValueError):
        raise ParameterError(f"CFG interval must be two fractions of the steps 'A,B', got {value!r}") from None
    if not 0.0 <= start < end <= 1.0:
        raise ParameterError(f"CFG interval must satisfy 0 <= A < B <= 1 (fractions of the steps), got {value!r}")
    return (start, end)


def _validate_speed_options(p: GenerationParams) -> None:
    p.cfg_interval = parse_cfg_interval(p.cfg_interval)
    if p.cfg_interval == (0.0, 1.0):
        p.cfg_interval = None  # every step guided: the plain computation
    p.cache_interval = _in_range("cache interval", _integer("cache interval", p.cache_interval), 1, MAX_STEPS)


def _speed_fields(p: GenerationParams) -> dict[str, object]:
    fields: dict[str, object] = {}
    if p.cfg_interval is not None:
        fields["CFG interval"] = f"{p.cfg_interval[0]:g},{p.cfg_interval[1]:g}"
    if p.cache_interval > 1:
        fields["Cache interval"] = p.cache_interval
    return fields


def _read_speed_fields(p: GenerationParams, fields: dict[str, str]) -> None:
    if "CFG interval" in fields:
        p.cfg_interval = parse_cfg_interval(fields["CFG interval"])
    if "Cache interval" in fields:
        p.cache_interval = _integer("cache interval", fields["Cache interval"])
