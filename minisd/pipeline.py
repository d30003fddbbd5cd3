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

from .a1111_inpaint import A1111Inpainting
from .a1111_sigmas import A1111_FLOAT32_SCHEDULES, a1111_sigmas
from .brownian import BROWNIAN_SAMPLERS, BrownianTreeNoise
from .checkpoint import Components, load_components, original_state_dict, save_checkpoint
from .config import ModelConfig
from .deep_cache import DeepCacheUNet
from .denoiser import CFGDenoiser, LCMDenoiser, RefinerSwitch, guidance_interval, make_denoiser
from .embeddings import Embedding, EmbeddingDatabase, read_embedding
from .errors import CheckpointError, ParameterError
from .hashes import a1111_short_hash
from .image import load_mask, mask_bbox, pil_to_tensor, resize_image, tensor_to_pil
from .lora import LoadedLora, LoraStack, lora_components
from .memory import available_memory, estimate_generation_memory, estimate_vae_memory, keep_freed_memory
from .models.clip import CLIPTextModel
from .models.conditioner import size_vector
from .models.taesd import TinyAutoencoder, read_taesd
from .models.unet import UNetModel
from .models.vae import AutoencoderKL
from .params import GenerationParams
from .prompts import encode_prompt_pair, encode_sdxl_prompt_pair
from .samplers import resolve_sampler
from .schedule import DiscreteSchedule, img2img_sigmas
from .seeds import ImageNoise
from .tiled_vae import tiled_decode, tiled_encode
from .tokenizer import EOS_ID, CLIPTokenizer
from .vae_file import read_vae

LATENT_SCALE = 8  # the autoencoder's spatial down-sampling factor
# A1111's defaults for the SDXL refiner's aesthetic-score conditioning (prompt, negative prompt).
REFINER_AESTHETIC_SCORE, REFINER_NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
DEFAULT_REFINER_SWITCH_AT = 0.8  # A1111's
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
        # An SDXL refiner that takes over after `refiner_switch_at` of the steps (A1111's "Refiner").
        self.refiner: StableDiffusion | None = None
        # Where <lora:name:w> and textual-inversion names in prompts are looked up (lora.py, embeddings.py).
        self.lora_dirs: list[Path] = []
        self.embedding_dirs: list[Path] = []
        self._added_embeddings: list[Embedding] = []
        # A swapped-in VAE file (--vae), and TAESD (models/taesd.py): previews, or every decode if decode_with_taesd.
        self.vae_source: Path | None = None
        self.taesd: TinyAutoencoder | None = None
        self.decode_with_taesd = False

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

    # ---- LoRA (lora.py) ---------------------------------------------------------------------------------

    @functools.cached_property
    def loras(self) -> LoraStack:
        """The LoRAs merged into this model's weights."""
        return LoraStack(lambda: lora_components(self.unet, self.text_encoder))

    def load_lora(self, path: str | os.PathLike, weight: float = 1.0, *, te_weight: float | None = None,
                  strict: bool = True) -> LoadedLora:
        """Merge a LoRA/LoCon/LoHa/LoKr file (kohya, diffusers or PEFT keys) with `weight` until `unload_loras`."""
        return self.loras.load(path, weight, te_weight=te_weight, strict=strict)

    def unload_loras(self) -> None:
        """Remove every merged LoRA: the original weights come back bit for bit."""
        self.loras.clear()

    # ---- textual inversion (embeddings.py) --------------------------------------------------------------

    @property
    def embeddings(self) -> EmbeddingDatabase:
        """The textual-inversion embeddings of `embedding_dirs` (rescanned when that list changes) and those added
        with `load_embedding`."""
        key = tuple(str(d) for d in self.embedding_dirs)
        if getattr(self, "_embeddings_for", None) != key:
            self._embeddings = EmbeddingDatabase(self.tokenizer, self.embedding_dirs, self._added_embeddings)
            self._embeddings_for = key
        return self._embeddings

    def load_embedding(self, path: str | os.PathLike, name: str | None = None) -> Embedding:
        """Read a textual-inversion file; prompts then use it by `name` (default: the file name without suffix)."""
        embedding = read_embedding(path, name)
        self._added_embeddings.append(embedding)
        self.embeddings.add(embedding)
        return embedding

    # ---- VAE swap and TAESD (vae_file.py, models/taesd.py) ----------------------------------------------

    def load_vae(self, path: str | os.PathLike) -> None:
        """Swap in the VAE of a file or diffusers folder (CompVis or diffusers names; .safetensors, .ckpt, .pt).
        A TAESD file (recognised by its keys) becomes the decoder of every image instead (`load_taesd`)."""
        vae = read_vae(path, self.config.vae, self.device, self.dtype)
        if isinstance(vae, TinyAutoencoder):
            self._use_taesd(vae, path, decode=True)
            return
        self.vae, self.vae_source = vae, Path(path)

    def load_taesd(self, path: str | os.PathLike, decode: bool = True) -> None:
        """Load TAESD/TAESDXL (published or diffusers layout): it decodes every image if `decode`, else only
        `preview_latents` (live previews) uses it."""
        self._use_taesd(read_taesd(path, self.device, self.dtype), path, decode)

    def _use_taesd(self, taesd: TinyAutoencoder, path: str | os.PathLike, decode: bool) -> None:
        if taesd.config.latent_channels != self.config.vae.latent_channels:
            raise CheckpointError(f"{path}: a TAESD for {taesd.config.latent_channels}-channel latents; this model's "
                                  f"have {self.config.vae.latent_channels}")
        if decode and taesd.decoder is None:
            raise CheckpointError(f"{path}: a TAESD encoder; decoding needs taesd_decoder")
        self.taesd, self.decode_with_taesd = taesd, decode
        if decode:
            self.vae_source = Path(path)

    def preview_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] with TAESD (fast; for previews), else with the full VAE."""
        if self.taesd is None or self.taesd.decoder is None:
            return self.decode_latents(latents)
        with torch.inference_mode():
            return torch.cat([self.taesd.decode(z.to(self.device, self.dtype)).float().clamp(-1, 1)
                              for z in latents.split(1)])

    def vae_infotext(self) -> dict[str, str]:
        """A1111's "VAE hash" (10 hex digits of the file's SHA-256) and "VAE" (its file name) for a swapped VAE."""
        if self.vae_source is None or not self.vae_source.exists():
            return {}
        from .hashes import sha256_model
        return {"VAE hash": sha256_model(self.vae_source)[:10], "VAE": self.vae_source.name}

    def infotext_fields(self) -> dict[str, str]:
        """What the model adds to an image's infotext: the VAE, the merged LoRAs' and the used embeddings' hashes."""
        return {**self.vae_infotext(), **self.loras.infotext(), **self.embeddings.infotext()}

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
                 callback: Callback | None = None, *, init_latents: torch.Tensor | None = None,
                 fix_steps: bool = False) -> list[Image.Image] | torch.Tensor:
        """The one sampling routine behind the three tasks; returns PIL images (each with its A1111
        infotext in `.info["parameters"]` and its seed in `.info["seed"]`) or, for output="latent", the
        latents (B, 4, H/8, W/8) before decoding. `init_latents` (scaled, (1 or B, 4, H/8, W/8)) makes it
        img2img from latents instead of an image; `fix_steps` runs exactly `steps` img2img steps (A1111's
        img2img_fix_steps, which its hires pass uses)."""
        size = self.config.image_size
        p = dataclasses.replace(params, width=size if params.width is None else params.width,
                                height=size if params.height is None else params.height).validated()
        if mask_image is not None and init_image is None:
            raise ParameterError("inpainting needs an init image as well as the mask")
        if p.enable_hr and init_image is None and init_latents is None:
            from .hires_fix import hires_fix
            return hires_fix(self, p, noise, callback)
        if p.inpaint_only_masked and mask_image is not None and p.output == "pil":
            return self._inpaint_only_masked(p, init_image, mask_image, noise, callback)
        task = "inpaint" if mask_image is not None else "img2img" if init_image is not None else "txt2img"
        if init_latents is not None:
            if init_image is not None or tuple(init_latents.shape[-2:]) != self._latent_shape(p)[1:]:
                raise ParameterError(f"init_latents must have the latent size {self._latent_shape(p)[1:]} "
                                     "and come without an init image")
            task = "img2img"
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
        # The prompt's <lora:name:w> are merged for this generation only (before inference mode: weights change).
        with self.loras.from_prompt(p.prompt, self.lora_dirs), torch.inference_mode():
            return self._generate(p, task, init_image, mask_image, noise, callback, tiled, init_latents, fix_steps)

    def _generate(self, p: GenerationParams, task: str, init_image, mask_image, noise, callback, tiled: bool,
                  init_latents: torch.Tensor | None = None, fix_steps: bool = False):
        spec = resolve_sampler(p.sampler)
        options = dict(spec.options)
        if p.eta is not None:
            if "eta" not in inspect.signature(spec.fn).parameters:
                raise ParameterError(f"the {p.sampler} sampler takes no eta")
            options["eta"] = p.eta
        schedule_options = {name: value for name, value in (("sigma_min", p.schedule_sigma_min),
                                                            ("sigma_max", p.schedule_sigma_max),
                                                            ("rho", p.schedule_rho)) if value is not None}

        def sigmas_for(steps: int) -> torch.Tensor:
            if spec.key in BROWNIAN_SAMPLERS and p.schedule in A1111_FLOAT32_SCHEDULES:
                # A1111's float32 σ bits: the Brownian tree rounds its query times to 1e-6 (a1111_sigmas.py).
                return a1111_sigmas(self.schedule, p.schedule, steps, discard_penultimate=spec.discard_penultimate_sigma,
                                    **schedule_options)
            try:
                return spec.sigmas(self.schedule, steps, p.schedule, **schedule_options)
            except TypeError:
                raise ParameterError(f"the {p.schedule} schedule takes none of {', '.join(schedule_options)}") from None
        if task == "txt2img":
            sigmas = sigmas_for(p.steps)
        else:
            sigmas = img2img_sigmas(sigmas_for, p.steps, p.strength, fix_steps=fix_steps)
        cond, uncond = self.conditioning(p)

        original = mask = concat = pixels = None
        if init_image is not None:
            pixels = pil_to_tensor(resize_image(init_image, p.width, p.height, p.resize_mode))
            original = self.encode_latents(pixels, tiled)
        elif init_latents is not None:
            original = init_latents.float().to(self.device)
        inpainting_model = self.config.unet.in_channels == 9
        a1111_inpaint = None  # A1111's inpainting with an ordinary model (a1111_inpaint.py)
        if mask_image is not None:
            mask = load_mask(mask_image, p.width, p.height, p.resize_mode, blur=p.mask_blur)
            sharp = load_mask(mask_image, p.width, p.height, p.resize_mode)
            latent_size = original.shape[-2:]
            latent_mask = F.interpolate(mask, size=latent_size, mode="area").to(self.device)
            if p.inpaint_mode == "a1111" and not inpainting_model:
                a1111_inpaint = A1111Inpainting(mask, tuple(latent_size), p.inpainting_fill, self.device)
            if inpainting_model:
                # The 9-channel model sees the mask and the latent of the image with the masked part removed.
                binary = (sharp >= 0.5).float()
                masked = self.encode_latents(pixels * (1 - binary), tiled)
                concat = torch.cat([F.interpolate(binary, size=latent_size, mode="nearest").to(self.device),
                                    masked], dim=1)
        elif inpainting_model:
            raise ParameterError("this is an inpainting model: use inpaint with a mask (or an ordinary model)")

        model = make_denoiser(self._unet_float32, self.schedule)
        refiner = self._refiner_denoiser(p)
        images, latents_out = [], []
        for iteration in range(p.n_iter):
            indices = [iteration * p.batch_size + j for j in range(p.batch_size)]
            # A1111: with a variation seed every image shares the seed and image i takes variation seed + i.
            seeds = [p.seed if p.subseed_strength else p.seed + i for i in indices]
            subseeds = [p.subseed + i for i in indices]
            # Image i's noise comes from its own generator (rng.py: torch's CPU one, or CUDA's emulated) seeded
            # with its seed: the same on every device and in every batch (seeds.py: A1111's seed options). The
            # generators then feed the sampler's own noise for that image.
            image_noise = ImageNoise(self._latent_shape(p), seeds, p.rng, subseeds, p.subseed_strength,
                                     (p.seed_resize_from_w, p.seed_resize_from_h), p.eta_noise_seed_delta)
            eps = image_noise.first()
            generators = image_noise.generators
            if noise is not None:
                eps = noise[iteration * p.batch_size:(iteration + 1) * p.batch_size].float().cpu()
            eps = eps.to(self.device)
            if task != "txt2img" and p.noise_multiplier != 1.0:
                eps = eps * p.noise_multiplier
            batch_concat = None if concat is None else concat.expand(p.batch_size, -1, -1, -1)
            if p.cache_interval > 1:  # DeepCache: a fresh cache for each sampling trajectory
                model.unet = functools.partial(self._unet_float32, unet=DeepCacheUNet(self.unet, p.cache_interval))
            interval = guidance_interval(sigmas, *p.cfg_interval) if p.cfg_interval else None
            denoiser = CFGDenoiser(model, cond, uncond, p.cfg_scale, rescale=p.guidance_rescale, concat=batch_concat,
                                   sequential=p.sequential_guidance, interval=interval)
            if refiner is not None:
                denoiser = RefinerSwitch(denoiser, refiner, self.schedule, p.refiner_switch_at)
            if spec.key == "lcm":
                denoiser = LCMDenoiser(denoiser, self.schedule)
            init_latent = original
            if a1111_inpaint is not None:
                init_latent = a1111_inpaint.init_latent(
                    original, lambda: ImageNoise(self._latent_shape(p), seeds, p.rng).first())
                denoiser = a1111_inpaint.denoiser(denoiser, init_latent)
            elif mask is not None and not inpainting_model:
                denoiser = InpaintDenoiser(denoiser, original, eps, latent_mask)
            # strength 1 replaces the image entirely: start from pure noise, as diffusers does.
            start = init_latent if original is not None and (p.strength < 1.0 or a1111_inpaint) else 0.0
            sigma_0 = float(sigmas[0])
            x = start + eps * ((1 + sigma_0**2) ** 0.5 if p.sgm_noise_multiplier else sigma_0)
            if spec.key in BROWNIAN_SAMPLERS:
                # A1111's SDE noise: one Brownian tree per image seed over the (float32) schedule.
                options["noise_sampler"] = BrownianTreeNoise(x, sigmas.float(), seeds, p.rng)

            def report(info: dict, iteration=iteration) -> None:
                if callback is not None:
                    callback({**info, "iteration": iteration, "steps": len(sigmas) - 1})

            latents = spec.fn(denoiser, x, sigmas.to(self.device), generator=generators, callback=report, **options)
            if a1111_inpaint is not None:
                latents = a1111_inpaint.finish(latents, init_latent)
            elif mask is not None and not inpainting_model:
                latents = latent_mask * latents + (1 - latent_mask) * original
            if p.output == "latent":
                latents_out.append(latents)
                continue
            decoded = self.decode_latents(latents, tiled)
            if mask is not None:
                # Composite in pixels: the original outside the mask, the blurred edge feathered inwards only.
                alpha = (mask * (sharp >= 0.5) if a1111_inpaint is None else a1111_inpaint.overlay_alpha).to(decoded.device)
                decoded = alpha * decoded + (1 - alpha) * pixels.to(decoded.device)
            for seed, subseed, image in zip(seeds, subseeds, tensor_to_pil(decoded)):
                image.info["parameters"] = dataclasses.replace(p, subseed=subseed).infotext(
                    seed, model_hash=self.model_hash, model_name=self.model_name, version=f"minisd {_version()}",
                    task=task, extra={**self.infotext_fields(), **self._refiner_infotext(p)})
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

    def conditioning(self, p: GenerationParams) -> tuple:
        """(cond, uncond) for the denoiser: text contexts (1, 77·k, D); for SDXL dicts of the context and the
        vector `y` (pooled text + sizes: the image size as original and target size, crop (0, 0); the refiner
        takes A1111's aesthetic scores 6 and 2.5 instead of the target size)."""
        embeddings = self.embeddings
        embeddings.used.clear()
        if self.config.family != "sdxl":
            return encode_prompt_pair(self.text_encoder, self.tokenizer, p.prompt, p.negative_prompt,
                                      clip_skip=p.clip_skip, emphasis=p.emphasis,
                                      pad_id=getattr(self.text_encoder, "pad_id", EOS_ID), embeddings=embeddings)
        (cond, pooled), (uncond, uncond_pooled) = encode_sdxl_prompt_pair(
            self.text_encoder, self.tokenizer, p.prompt, p.negative_prompt, clip_skip=p.clip_skip, emphasis=p.emphasis,
            embeddings=embeddings)
        sizes = [p.height, p.width, 0, 0]
        if self.config.variant == "sdxl-refiner":
            numbers, negative_numbers = sizes + [REFINER_AESTHETIC_SCORE], sizes + [REFINER_NEGATIVE_AESTHETIC_SCORE]
        else:
            numbers = negative_numbers = sizes + [p.height, p.width]
        return ({"context": cond, "y": size_vector(pooled, numbers)},
                {"context": uncond, "y": size_vector(uncond_pooled, negative_numbers)})

    def _refiner_denoiser(self, p: GenerationParams) -> CFGDenoiser | None:
        """The attached refiner's guided denoiser for `p` (its own prompt encoding and aesthetic scores)."""
        if self.refiner is None:
            return None
        if p.refiner_switch_at is None:
            p.refiner_switch_at = DEFAULT_REFINER_SWITCH_AT
        r = self.refiner
        if self.config.family != "sdxl" or r.config.family != "sdxl":
            raise ParameterError(f"a refiner needs an SDXL model and an SDXL refiner, not {self.config.variant} "
                                 f"and {r.config.variant}")
        cond, uncond = r.conditioning(p)
        return CFGDenoiser(make_denoiser(r._unet_float32, r.schedule), cond, uncond, p.cfg_scale,
                           rescale=p.guidance_rescale, sequential=p.sequential_guidance)

    def _refiner_infotext(self, p: GenerationParams) -> dict[str, object]:
        if self.refiner is None:
            return {}
        return {"Refiner": f"{self.refiner.model_name} [{self.refiner.model_hash}]",
                "Refiner switch at": p.refiner_switch_at}

    def _unet_float32(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | dict,
                      unet: Callable | None = None) -> torch.Tensor:
        """The UNet (or `unet`, e.g. a DeepCacheUNet around it) in its own precision, seen by the samplers in
        float32 (their arithmetic stays exact). SDXL's conditioning is a dict of the text context and the vector `y`."""
        dtype = self.dtype
        unet = self.unet if unet is None else unet
        if isinstance(context, dict):
            return unet(x.to(dtype), t, context["context"].to(dtype), y=context["y"].to(dtype)).float()
        return unet(x.to(dtype), t, context.to(dtype)).float()

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
        if self.taesd is not None and self.decode_with_taesd:
            return self.preview_latents(latents)
        out, float32_vae = [], None
        decode = (lambda vae, z: tiled_decode(vae, z)) if tiled else (lambda vae, z: vae.decode(z))
        for z in (latents / self.config.vae.scaling_factor).split(1):
            image = decode(self.vae, z.to(self.dtype)).float()
            if not torch.isfinite(image).all() and self.dtype != torch.float32:
                # made once per call and dropped after it: no lasting float32 copy, and a swapped VAE is seen
                if float32_vae is None:
                    float32_vae = _float32_decoder(self.vae)
                image = decode(float32_vae, z.float())
            out.append(image.clamp(-1, 1))
        return torch.cat(out)

    def compile(self, freezing: bool = True, **options) -> "StableDiffusion":
        """torch.compile the UNet and the VAE decoder in place, static shapes, weights frozen into the graph
        (`compiled.compile_module`): a one-time cost on the first image of each size, kept on disk in inductor's
        FX graph cache (~/.cache/minisd/inductor) for later processes. Load LoRAs before, not after."""
        from .compiled import compile_module
        compile_module(self.unet, freezing, **options)
        compile_module(self.vae.decoder, freezing, **options)
        return self


def _float32_decoder(vae: AutoencoderKL) -> AutoencoderKL:
    """A float32 copy of the decoding half of `vae` (`post_quant_conv`, `decoder`); its encoder stays on the meta
    device, unallocated: only `decode` and `tiled_decode` may be called on it."""
    import copy
    with torch.device("meta"):
        copied = AutoencoderKL(vae.config)
    copied.post_quant_conv = copy.deepcopy(vae.post_quant_conv).float()
    copied.decoder = copy.deepcopy(vae.decoder).float()
    return copied.eval()


def _version() -> str:
    from . import __version__
    return __version__


def load(source: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         use_ema: bool = True, allow_pickle: bool = True, config: ModelConfig | None = None,
         prediction: str | None = None) -> StableDiffusion:
    """Load a checkpoint: an original-layout .safetensors or .ckpt file, a diffusers folder, or "demo".
    `prediction` "eps" or "v" overrides the parameterisation the file states or minisd infers (SD 2.x).
    Raises `minisd.CheckpointError` with a one-line explanation for anything that cannot be loaded.
    On CPU, malloc is then told to keep freed memory for reuse (`memory.keep_freed_memory`)."""
    sd = StableDiffusion.from_components(
        load_components(source, device=device, dtype=dtype, use_ema=use_ema, allow_pickle=allow_pickle, config=config,
                        prediction=prediction))
    if sd.device.type == "cpu":
        keep_freed_memory()
    return sd
