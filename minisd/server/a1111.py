"""AUTOMATIC1111's API shapes: the txt2img/img2img request models (A1111's field names and defaults; unknown
fields ignored, as A1111's pydantic models do), their translation to GenerationParams, and the response bodies."""
from __future__ import annotations

import base64
import binascii
import inspect
import io
import json
from typing import Any

from PIL import Image, ImageFilter, PngImagePlugin, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from ..errors import ParameterError
from ..hires_fix import IMAGE_RESAMPLERS, LATENT_MODES, target_size
from ..image import mask_to_l, parse_infotext
from ..params import SCHEDULE_LABELS, GenerationParams
from ..samplers import SAMPLERS, resolve_sampler
from ..schedule import resolve_schedule
from .jobs import GenerationResult

RESIZE_MODE_NAMES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill"}
# A1111's inpainting_fill numbers -> GenerationParams.inpainting_fill ("Masked content").
INPAINTING_FILL_NAMES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
# Our schedule ids as A1111 (1.9+) names them in /sdapi/v1/schedulers.
A1111_SCHEDULER_NAMES = {"ddim_uniform": "ddim"}
MAX_IMAGE_PIXELS = 8192 * 8192  # decoded uploads larger than this are refused (decompression bombs)


class ApiError(Exception):
    """An error answered as A1111 does: status code and {"error", "detail", "body", "errors"}."""

    def __init__(self, status: int, detail: str, error: str = "HTTPException"):
        super().__init__(detail)
        self.status, self.detail, self.error = status, detail, error


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # A1111 accepts and ignores fields it does not know

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: str | None = None


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    denoising_strength: float | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Request):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    denoising_strength: float = 0.75
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str = ""


# ---- request -> GenerationParams -------------------------------------------------------------------------

def _one_prompt(value: str | list[str], name: str) -> str:
    if isinstance(value, list):
        if len(set(value)) > 1:
            raise ApiError(422, f"{name}: one prompt per image is not supported; send one string")
        return value[0] if value else ""
    return value


def _sampler(name: str | None, fallback: str) -> str:
    label = name or fallback or "Euler"
    try:
        resolve_sampler(label)
    except ValueError:
        raise ApiError(404, f"Sampler not found: {label!r}") from None
    return label


def _refuse_hires_overrides(req: "Txt2ImgRequest") -> None:
    """The hires pass runs with the first pass's model, sampler, schedule and prompts; other ones are refused."""
    same = (None, "", "Use same checkpoint", "Use same sampler", "Use same scheduler")
    for name in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler"):
        if getattr(req, name) not in same:
            raise ApiError(422, f"{name} {getattr(req, name)!r}: the hires pass uses the first pass's settings in "
                                "minisd; leave it unset")
    for name, first in (("hr_prompt", req.prompt), ("hr_negative_prompt", req.negative_prompt)):
        if getattr(req, name) not in ("", first):
            raise ApiError(422, f"{name}: a prompt of its own for the hires pass is not supported by minisd")


def generation_params(req: _Request, *, max_size: int, max_batch: int, clip_skip: int = 1, randn_source: str = "CPU",
                      eta_noise_seed_delta: int = 0) -> GenerationParams:
    """The GenerationParams of an A1111 request (validated, seed drawn); ApiError for what cannot be honoured."""
    if req.script_name:
        raise ApiError(422, f"Script '{req.script_name}' not found", "HTTPException")
    if req.alwayson_scripts:
        raise ApiError(422, f"always-on script {sorted(req.alwayson_scripts)[0]!r} not found")
    if getattr(req, "enable_hr", False):
        _refuse_hires_overrides(req)
    if req.tiling:
        raise ApiError(422, "tiling is not supported by minisd")
    for name in ("width", "height"):
        if getattr(req, name) > max_size:
            raise ApiError(422, f"{name} {getattr(req, name)} is over this server's limit of {max_size} (--max-size)")
    if req.batch_size * req.n_iter > max_batch or req.batch_size > max_batch:
        raise ApiError(422, f"batch_size × n_iter = {req.batch_size * req.n_iter} images is over this server's limit "
                            f"of {max_batch} (--max-batch)")
    overrides = req.override_settings or {}
    schedule = req.scheduler or "Automatic"
    try:
        if schedule.strip().lower() not in ("", "automatic"):
            resolve_schedule(schedule)
    except ValueError as e:
        raise ApiError(404, f"Scheduler not found: {e}") from None
    sampler = _sampler(req.sampler_name, req.sampler_index)
    params = GenerationParams(
        prompt=_one_prompt(req.prompt, "prompt"), negative_prompt=_one_prompt(req.negative_prompt, "negative_prompt"),
        width=req.width, height=req.height, steps=req.steps, cfg_scale=req.cfg_scale, sampler=sampler,
        schedule=schedule, seed=req.seed, batch_size=req.batch_size, n_iter=req.n_iter,
        clip_skip=overrides.get("CLIP_stop_at_last_layers", clip_skip),
        rng=overrides.get("randn_source", randn_source),
        eta_noise_seed_delta=overrides.get("eta_noise_seed_delta", eta_noise_seed_delta),
        subseed=req.subseed, subseed_strength=req.subseed_strength,
        # A1111 sends -1 (its default) or 0 for "no seed resize".
        seed_resize_from_w=max(req.seed_resize_from_w, 0), seed_resize_from_h=max(req.seed_resize_from_h, 0))
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        params.enable_hr, params.hr_scale, params.hr_steps = True, req.hr_scale, req.hr_second_pass_steps
        params.hr_resize_x, params.hr_resize_y = req.hr_resize_x, req.hr_resize_y
        params.hr_upscaler = req.hr_upscaler or "Latent"  # A1111's default latent upscale mode
        if req.denoising_strength is not None:
            params.strength = req.denoising_strength
    # A1111 passes eta only to samplers that take it (webuiapi always sends eta=1.0).
    if req.eta is not None and "eta" in inspect.signature(resolve_sampler(sampler).fn).parameters:
        params.eta = req.eta
    if isinstance(req, Img2ImgRequest):
        if req.resize_mode not in RESIZE_MODE_NAMES:
            raise ApiError(422, f"resize_mode {req.resize_mode} is not supported (0 just resize, 1 crop and resize, "
                                "2 resize and fill)")
        params.strength = req.denoising_strength
        params.resize_mode = RESIZE_MODE_NAMES[req.resize_mode]
        params.mask_blur = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
        params.inpaint_only_masked = req.inpaint_full_res
        params.only_masked_padding = req.inpaint_full_res_padding
        if req.initial_noise_multiplier is not None:
            params.noise_multiplier = req.initial_noise_multiplier
        if req.mask:
            if req.inpainting_fill not in INPAINTING_FILL_NAMES:
                raise ApiError(422, f"inpainting_fill {req.inpainting_fill} is not one of 0 (fill), 1 (original), "
                                    "2 (latent noise), 3 (latent nothing)")
            params.inpainting_fill = INPAINTING_FILL_NAMES[req.inpainting_fill]
            if req.inpainting_fill in (2, 3):
                # Latent noise / latent nothing exist in A1111's own inpainting blend (a1111_inpaint.py); fill (done
                # on the pixels by the server) and original keep minisd's inpainting.
                params.inpaint_mode = "a1111"
    try:
        params = params.validated()
    except ParameterError as e:
        raise ApiError(422, str(e), "ParameterError") from None
    if params.enable_hr:  # the second pass's size is bounded by --max-size too
        width, height = target_size(params)[:2]
        if max(width, height) > max_size:
            raise ApiError(422, f"the hires fix size {width}x{height} is over this server's limit of {max_size} "
                                "(--max-size)")
    return params


# ---- images -----------------------------------------------------------------------------------------------

def decode_image(data: str, what: str) -> Image.Image:
    """A base64 image (an optional data: URL prefix is stripped, as A1111 does); ApiError if it is not one."""
    if not isinstance(data, str) or not data:
        raise ApiError(422, f"{what}: empty image")
    if data.startswith("data:image/"):
        data = data.split(";", 1)[1].split(",", 1)[-1] if ";" in data else data
    if data.startswith(("http://", "https://")):
        raise ApiError(422, f"{what}: image URLs are not fetched by this server; send base64")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: invalid base64", "InvalidImage") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ApiError(413, f"{what}: {image.width}x{image.height} is too large")
        image.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"{what}: not a readable image ({type(e).__name__})", "InvalidImage") from None
    return image


def inpaint_mask(mask: Image.Image, invert: bool) -> Image.Image:
    """The mask as 'L' (white = repaint, A1111's alpha rule), inverted for inpainting_mask_invert."""
    l_mask = mask_to_l(mask)
    return l_mask.point(lambda v: 255 - v) if invert else l_mask


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0 ("fill"): the masked area painted with the surrounding colours, by layering
    ever less blurred copies of the unmasked image (blur radii 256 down to 0 px, as A1111's masking.fill)."""
    keep = mask.convert("L").point(lambda v: 255 - v)
    visible = Image.new("RGBA", image.size, (0, 0, 0, 0))
    visible.paste(image.convert("RGBA"), (0, 0), keep)
    # Blur with premultiplied alpha ("RGBa") so the transparent hole does not pull the colours to black.
    premultiplied = visible.convert("RGBa")
    out = Image.new("RGBA", image.size, (0, 0, 0, 0))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def png_base64(image: Image.Image) -> str:
    """Raw base64 of a PNG carrying the image's infotext in a "parameters" chunk (no data: prefix)."""
    info = PngImagePlugin.PngInfo()
    if image.info.get("parameters"):
        info.add_text("parameters", image.info["parameters"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- responses --------------------------------------------------------------------------------------------

def info_json(result: GenerationResult, req: _Request) -> str:
    """A1111's `info` string (Processed.js()) for a finished job."""
    p = result.params
    seeds = result.seeds
    n = len(result.images)
    info = {
        "prompt": p.prompt, "all_prompts": [p.prompt] * n, "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * n, "seed": seeds[0] if seeds else p.seed, "all_seeds": seeds,
        "subseed": p.subseed, "all_subseeds": [p.subseed + i for i in range(n)],
        "subseed_strength": p.subseed_strength,
        "width": p.width, "height": p.height, "sampler_name": p.sampler, "cfg_scale": p.cfg_scale,
        "steps": p.steps, "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": result.model.model_name, "sd_model_hash": result.model_hash, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": p.seed_resize_from_w or -1,
        "seed_resize_from_h": p.seed_resize_from_h or -1,
        "denoising_strength": p.strength if result.task != "txt2img" or p.enable_hr else None,
        "extra_generation_params": {"Schedule type": SCHEDULE_LABELS.get(p.schedule, p.schedule)},
        "index_of_first_image": 0, "infotexts": result.infotexts, "styles": req.styles or [],
        "job_timestamp": result.job_timestamp, "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": False, "version": "minisd",
        # minisd's own: the job's id and its place in the queue (submission and start order), and whether
        # it was interrupted.
        "minisd_job": {"task_id": result.task_id, "submitted": result.number, "started": result.started,
                       "interrupted": result.interrupted},
    }
    return json.dumps(info)


def generation_response(result: GenerationResult, req: _Request) -> dict:
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"] = None
        parameters["mask"] = None
    return {"images": [png_base64(image) for image in result.images] if req.send_images else [],
            "parameters": parameters, "info": info_json(result, req)}


def samplers_list() -> list[dict]:
    return [{"name": spec.label, "aliases": [spec.key, *spec.aliases], "options": {"scheduler": spec.schedule}}
            for spec in SAMPLERS.values()]


def schedulers_list() -> list[dict]:
    out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]
    for key, label in SCHEDULE_LABELS.items():
        out.append({"name": A1111_SCHEDULER_NAMES.get(key, key), "label": label, "aliases": None,
                    "default_rho": 7.0 if key == "karras" else -1, "need_inner_model": False})
    return out


def upscalers_list() -> list[dict]:
    """A1111's /sdapi/v1/upscalers: the image upscalers of the hires fix (resamplers, no model files)."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in IMAGE_RESAMPLERS]


def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in LATENT_MODES]


def png_info(image: Image.Image) -> dict:
    """A1111's /sdapi/v1/png-info answer for an image."""
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    parameters: dict[str, Any] = {}
    if text:
        prompt, negative, fields = parse_infotext(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **fields}
    return {"info": text, "items": items, "parameters": parameters}
