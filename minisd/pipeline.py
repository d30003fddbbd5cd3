"""StableDiffusion: one loaded model (text encoder, UNet, autoencoder and their config) and the three tasks,
txt2img, img2img and inpaint, sharing one sampling routine: prompt -> conditioning, seed -> noise,
sampler(denoiser) -> latents -> VAE decode -> images with their A1111 infotext."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import Components, load_components, original_state_dict, save_checkpoint
from .config import ModelConfig
from .denoiser import CFGDenoiser, LCMDenoiser, make_denoiser
from .errors import ParameterError
from .hashes import a1111_short_hash
from .image import load_mask, mask_bbox, pil_to_tensor, resize_image, tensor_to_pil
from .memory import available_memory, estimate_generation_memory, estimate_vae_memory, keep_freed_memory
from .models.clip import CLIPTextModel
from .models.unet import UNetModel
from .models.vae import AutoencoderKL
from .params import GenerationParams
from .prompts import encode_prompt_pair
from .samplers import resolve_sampler
from .schedule import DiscreteSchedule, img2img_sigmas
from .tiled_vae import tiled_decode, tiled_encode
from .tokenizer import CLIPTokenizer

LATENT_SCALE = 8  # the autoencoder's spatial down-sampling factor
Callback = Callable[[dict], None]


class InpaintDenoiser:
    """Inpainting with an ordinary 4-channel model (the lecture's "fool the model"): before every model call
    the region to keep is replaced by the original latent noised to the current σ, and the prediction there
    is the original itself, so the sampler only ever changes the masked region (mask 1 = repaint)."""

    def __init__(self, inner: Callable, original: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        self.inner, self.original, self.noise, self.mask = inner, original, noise, mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        level = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        known = self.original + level * self.noise
        denoised = self.inner(self.mask * x + (1 - self.mask) * known, sigma)
        return self.mask * denoised + (1 - self.mask) * self.original


class StableDiffusion:
    """A loaded Stable Diffusion model; `minisd.load()` makes one."""

    def __init__(self, config: ModelConfig, unet: UNetModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 source: Path | None = None, has_ema: bool = False):
        self.config, self.unet, self.vae, self.text_encoder = config, unet, vae, text_encoder
        self.source, self.has_ema = source, has_ema

    @classmethod
    def from_components(cls, c: Components) -> "StableDiffusion":
        return cls(c.config, c.unet, c.vae, c.text_encoder, c.source, c.has_ema)

    @functools.cached_property
    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer()

    @functools.cached_property
    def schedule(self) -> DiscreteSchedule:
        return DiscreteSchedule.from_config(self.config.schedule)

    @functools.cached_property
    def model_hash(self) -> str:
        """A1111's short model hash of the loaded file ("" for models that were not loaded from one)."""
        return a1111_short_hash(self.source) if self.source and self.source.exists() else ""

    @property
    def model_name(self) -> str:
        return self.source.stem if self.source else "minisd"

    @property
    def device(self) -> torch.device:
        return self._any_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._any_weight.dtype

    @property
    def _any_weight(self) -> torch.Tensor:
        return next(self.unet.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under the original single-file key names."""
        return original_state_dict(self.unet, self.vae, self.text_encoder)

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write the model as an original-layout .safetensors, or a diffusers folder for a path with no suffix."""
        save_checkpoint(path, self.state_dict(), self.config, dtype)


    # ---- the three tasks -------------------------------------------------------------------------------

    def txt2img(self, prompt: str, *, noise: torch.Tensor | None = None, callback: Callback | None = None,
                **options) -> list[Image.Image] | torch.Tensor:
        """Images for `prompt`; every keyword is a `GenerationParams` field."""
        return self.generate(GenerationParams(prompt=prompt, **options), noise=noise, callback=callback)

    def img2img(self, init_image: Image.Image, prompt: str, *, noise: torch.Tensor | None = None,
                callback: Callback | None = None, **options) -> list[Image.Image] | torch.Tensor:
        """`init_image` redrawn after `prompt`; `strength` (0..1) says how much of it is noised away."""
        return self.generate(GenerationParams(prompt=prompt, **options), init_image=init_image, noise=noise,
                             callback=callback)

    def inpaint(self, init_image: Image.Image, mask_image: Image.Image, prompt: str, *,
                noise: torch.Tensor | None = None, callback: Callback | None = None,
                **options) -> list[Image.Image] | torch.Tensor:
        """Repaint the white part of `mask_image` (or the opaque part of an alpha mask) after `prompt`."""
        return self.generate(GenerationParams(prompt=prompt, **options), init_image=init_image,
                             mask_image=mask_image, noise=noise, callback=callback)

    def generate(self, params: GenerationParams, init_image: Image.Image | None = None,
                 mask_image: Image.Image | None = None, noise: torch.Tensor | None = None,
                 callback: Callback | None = None) -> list[Image.Image] | torch.Tensor:
        """The one sampling routine behind the three tasks; returns PIL images (each with its A1111
        infotext in `.info["parameters"]` and its seed in `.info["seed"]`) or, for output="latent", the
        latents (B, 4, H/8, W/8) before decoding."""
        size = self.config.image_size
        p = dataclasses.replace(params, width=size if params.width is None else params.width,
                                height=size if params.height is None else params.height).validated()
        if mask_image is not None and init_image is None:
            raise ParameterError("inpainting needs an init image as well as the mask")
        if p.inpaint_only_masked and mask_image is not None and p.output == "pil":
            return self._inpaint_only_masked(p, init_image, mask_image, noise, callback)
        task = "inpaint" if mask_image is not None else "img2img" if init_image is not None else "txt2img"
        total = p.batch_size * p.n_iter
        latent_shape = self._latent_shape(p)
        if noise is not None and tuple(noise.shape) != (total, *latent_shape):
            raise ParameterError(f"noise must have shape {(total, *latent_shape)}, got {tuple(noise.shape)}")
        tiled = p.tiled_vae if p.tiled_vae is not None else self._vae_needs_tiles(p.width, p.height)
        free = available_memory(self.device)

        def needed(sequential: bool) -> int:
            return estimate_generation_memory(self.config, p.width, p.height, p.batch_size, self.dtype,
                                              tiled_vae=tiled, sequential_guidance=sequential)
        sequential = p.sequential_guidance
        if sequential is None:
            sequential = free is not None and needed(False) > free
        p = dataclasses.replace(p, sequential_guidance=sequential)
        if free is not None and needed(sequential) > free:
            raise ParameterError(f"{p.width}x{p.height} with batch size {p.batch_size} needs about "
                                 f"{needed(sequential) / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB "
                                 f"is free; use a smaller size or batch size")
        with torch.inference_mode():
            return self._generate(p, task, init_image, mask_image, noise, callback, tiled)

    def _generate(self, p: GenerationParams, task: str, init_image, mask_image, noise, callback, tiled: bool):
        spec = resolve_sampler(p.sampler)
        options = dict(spec.options)
        if p.eta is not None:
            if "eta" not in inspect.signature(spec.fn).parameters:
                raise ParameterError(f"the {p.sampler} sampler takes no eta")
            options["eta"] = p.eta
        if task == "txt2img":
            sigmas = spec.sigmas(self.schedule, p.steps, p.schedule)
        else:
            sigmas = img2img_sigmas(lambda n: spec.sigmas(self.schedule, n, p.schedule), p.steps, p.strength)
        cond, uncond = encode_prompt_pair(self.text_encoder, self.tokenizer, p.prompt, p.negative_prompt,
                                          clip_skip=p.clip_skip, emphasis=p.emphasis)

        original = mask = concat = pixels = None
        if init_image is not None:
            pixels = pil_to_tensor(resize_image(init_image, p.width, p.height, p.resize_mode))
            original = self.encode_latents(pixels, tiled)
        inpainting_model = self.config.unet.in_channels == 9
        if mask_image is not None:
            mask = load_mask(mask_image, p.width, p.height, p.resize_mode, blur=p.mask_blur)
            sharp = load_mask(mask_image, p.width, p.height, p.resize_mode)
            latent_size = original.shape[-2:]
            latent_mask = F.interpolate(mask, size=latent_size, mode="area").to(self.device)
            if inpainting_model:
                # The 9-channel model sees the mask and the latent of the image with the masked part removed.
                binary = (sharp >= 0.5).float()
                masked = self.encode_latents(pixels * (1 - binary), tiled)
                concat = torch.cat([F.interpolate(binary, size=latent_size, mode="nearest").to(self.device),
                                    masked], dim=1)
        elif inpainting_model:
            raise ParameterError("this is an inpainting model: use inpaint with a mask (or an ordinary model)")

        model = make_denoiser(self._unet_float32, self.schedule)
        images, latents_out = [], []
        for iteration in range(p.n_iter):
            seeds = [p.seed + iteration * p.batch_size + j for j in range(p.batch_size)]
            # Image i's noise comes from its own CPU generator seeded seed + i: the same on every device and
            # in every batch. The generators then feed the sampler's own noise for that image.
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
            if noise is None:
                eps = torch.cat([torch.randn((1, *self._latent_shape(p)), generator=g) for g in generators])
            else:
                eps = noise[iteration * p.batch_size:(iteration + 1) * p.batch_size].float().cpu()
            eps = eps.to(self.device)
            batch_concat = None if concat is None else concat.expand(p.batch_size, -1, -1, -1)
            denoiser = CFGDenoiser(model, cond, uncond, p.cfg_scale, rescale=p.guidance_rescale, concat=batch_concat,
                                   sequential=p.sequential_guidance)
            if spec.key == "lcm":
                denoiser = LCMDenoiser(denoiser, self.schedule)
            if mask is not None and not inpainting_model:
                denoiser = InpaintDenoiser(denoiser, original, eps, latent_mask)
            # strength 1 replaces the image entirely: start from pure noise, as diffusers does.
            start = original if original is not None and p.strength < 1.0 else 0.0
            x = start + eps * float(sigmas[0])

            def report(info: dict, iteration=iteration) -> None:
                if callback is not None:
                    callback({**info, "iteration": iteration, "steps": len(sigmas) - 1})

            latents = spec.fn(denoiser, x, sigmas.to(self.device), generator=generators, callback=report, **options)
            if mask is not None and not inpainting_model:
                latents = latent_mask * latents + (1 - latent_mask) * original
            if p.output == "latent":
                latents_out.append(latents)
                continue
            decoded = self.decode_latents(latents, tiled)
            if mask is not None:
                # Composite in pixels: the original outside the mask, the blurred edge feathered inwards only.
                alpha = (mask * (sharp >= 0.5)).to(decoded.device)
                decoded = alpha * decoded + (1 - alpha) * pixels.to(decoded.device)
            for seed, image in zip(seeds, tensor_to_pil(decoded)):
                image.info["parameters"] = p.infotext(seed, model_hash=self.model_hash, model_name=self.model_name,
                                                      version=f"minisd {_version()}", task=task)
                image.info["seed"] = seed
                images.append(image)
        return torch.cat(latents_out) if p.output == "latent" else images

    def _inpaint_only_masked(self, p: GenerationParams, init_image, mask_image, noise, callback):
        """A1111's "inpaint only masked": generate the mask's neighbourhood at full resolution, paste it back."""
        full_mask = load_mask(mask_image, init_image.width, init_image.height)
        box = mask_bbox(full_mask, p.only_masked_padding, p.width, p.height)
        if box is None:
            raise ParameterError("the mask is empty: nothing to inpaint")
        crop_image, crop_mask = init_image.crop(box), mask_image.convert("RGBA").crop(box)
        inner = dataclasses.replace(p, inpaint_only_masked=False)
        patches = self.generate(inner, crop_image, crop_mask, noise, callback)
        alpha = load_mask(mask_image, init_image.width, init_image.height, blur=p.mask_blur)
        alpha = (alpha * (full_mask >= 0.5))[0, 0]
        results = []
        for patch in patches:
            canvas = init_image.convert("RGB").copy()
            pasted = canvas.copy()
            pasted.paste(patch.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS), box[:2])
            blend = Image.fromarray((alpha.clamp(0, 1).numpy() * 255).round().astype("uint8"), mode="L")
            canvas.paste(pasted, (0, 0), blend)
            canvas.info.update(patch.info)
            results.append(canvas)
        return results

    # ---- pieces -----------------------------------------------------------------------------------------

    def _latent_shape(self, p: GenerationParams) -> tuple[int, int, int]:
        return self.config.vae.latent_channels, p.height // LATENT_SCALE, p.width // LATENT_SCALE

    def _unet_float32(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet in its own precision, seen by the samplers in float32 (their arithmetic stays exact)."""
        dtype = self.dtype
        return self.unet(x.to(dtype), t, context.to(dtype)).float()

    def _vae_needs_tiles(self, width: int, height: int) -> bool:
        """Tile when an untiled VAE pass would take more than half of the free memory."""
        free = available_memory(self.device)
        return free is not None and estimate_vae_memory(self.config, width, height, self.dtype) > free / 2

    def encode_latents(self, pixels: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents (the posterior mean; deterministic)."""
        pixels = pixels.to(self.device, self.dtype)
        mean = tiled_encode(self.vae, pixels) if tiled else self.vae.encode(pixels)
        return mean.float() * self.config.vae.scaling_factor

    def decode_latents(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], one image at a time to bound memory (in tiles if `tiled`);
        a half-precision decode that overflows is redone in float32."""
        out = []
        decode = (lambda vae, z: tiled_decode(vae, z)) if tiled else (lambda vae, z: vae.decode(z))
        for z in (latents / self.config.vae.scaling_factor).split(1):
            image = decode(self.vae, z.to(self.dtype)).float()
            if not torch.isfinite(image).all() and self.dtype != torch.float32:
                image = decode(_float32_copy(self.vae), z.float())
            out.append(image.clamp(-1, 1))
        return torch.cat(out)

    def compile(self, **options) -> "StableDiffusion":
        """torch.compile the UNet and the VAE decoder (a one-time cost on the first image of each size)."""
        self.unet = torch.compile(self.unet, **options)
        self.vae.decoder = torch.compile(self.vae.decoder, **options)
        return self


def _float32_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy
    return copy.deepcopy(module).float()


def _version() -> str:
    from . import __version__
    return __version__


def load(source: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         use_ema: bool = True, allow_pickle: bool = True, config: ModelConfig | None = None) -> StableDiffusion:
    """Load a checkpoint: an original-layout .safetensors or .ckpt file, a diffusers folder, or "demo".
    Raises `minisd.CheckpointError` with a one-line explanation for anything that cannot be loaded.
    On CPU, malloc is then told to keep freed memory for reuse (`memory.keep_freed_memory`)."""
    sd = StableDiffusion.from_components(
        load_components(source, device=device, dtype=dtype, use_ema=use_ema, allow_pickle=allow_pickle, config=config))
    if sd.device.type == "cpu":
        keep_freed_memory()
    return sd
