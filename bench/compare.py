"""Speed and memory of minisd against diffusers (the reference) on one machine, in one run (issue 7).

Both sides load the very same original-layout fp16 .safetensors with random weights (the full SD 1.5
architecture; speed does not depend on the values), get the same inputs and steps, and take turns: minisd,
diffusers, minisd, diffusers, ... for every measurement. Each is run in fp32, in bf16, and in each side's own
fastest configuration ("best"); OpenVINO joins as a third column when it is installed. The result is a markdown
table on stdout (median [min-max], ratio) and a JSON file in bench/results/. bench/README.md explains the rows.

    python bench/compare.py                      # the full benchmark (about an hour on 2 cores)
    python bench/compare.py --quick              # 256x256, 10 steps, 2 repetitions
    python bench/compare.py --quick --sections unet,vae,workflow --variants best   # issue 13's rows, minutes
    python bench/compare.py --sections compile --variants best     # torch.compile cost, cold and warm cache
    python bench/compare.py --config tiny --quick --sections unet,quality   # a smoke test in seconds

Sections: load (fresh-process load time and peak RSS), unet (one guided UNet step), vae (one decode), text (the
text encoder), e2e (txt2img), quality (bf16/best error against fp32), workflow (whole images in each side's best
configuration: standard; CFG only on the first steps; DeepCache; the fast LCM preset with the tiny decoder),
compile (torch.compile: first call with a cold and a warm on-disk cache, then the compiled step; not in the
default set). Variants: fp32, bf16, best (each side's fastest configuration). Every row names the CPU kind.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from minisd.config import PRESETS, ModelConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SECTIONS = ("load", "unet", "vae", "text", "e2e", "quality", "workflow", "compile")
DEFAULT_SECTIONS = SECTIONS[:-1]  # compile costs minutes per process: only when asked for
VARIANTS = ("fp32", "bf16", "best")
CONFIGS = ("sd1", "tiny")  # presets of minisd.config
TIMED = ("unet", "vae", "text", "e2e")  # the measurements made inside one process, in this order
SIDES = ("minisd", "diffusers", "openvino")
# The table's row names.
LOAD_TIME_LABEL, LOAD_RSS_LABEL = "load (s)", "load peak RSS (GiB)"
UNET_LABEL = "UNet step (s)"
LABELS = {"unet": UNET_LABEL, "vae": "VAE decode (s)", "text": "text encoder (s)", "e2e": "txt2img (s)"}
QUALITY_LABELS = {"unet": "UNet step: rel. error vs fp32", "vae": "VAE decode: rel. error vs fp32",
                  "text": "text encoder: rel. error vs fp32", "e2e": "final latent: rel. error vs fp32"}
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
FAST_STEPS = 4  # the fast preset's steps (minisd's GENERATION_PRESETS["fast"])
WORKFLOWS = ("standard", "cfg", "cache", "fast")
GUIDANCE = 7.5
SEED = 1
GIB = 2**30


# ---- small helpers ---------------------------------------------------------------------------------------

def log(message: str) -> None:
    """Progress on stderr, so that stdout carries only the table; with this process's RSS now and at its peak."""
    rss, peak = (proc_status_kib(name) / 2**20 for name in ("VmRSS", "VmHWM"))
    print(f"[{time.strftime('%H:%M:%S')} RSS {rss:4.1f}/{peak:4.1f} GiB] {message}", file=sys.stderr, flush=True)


def proc_status_kib(field_name: str) -> int:
    """A field of /proc/self/status in KiB: VmHWM is this process's peak RSS. (ru_maxrss is not used: Linux
    carries it across exec, so a fresh subprocess would report its parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so that RSS
    reflects the models now held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, b being the reference."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def variant_dtype(variant: str) -> torch.dtype | None:
    """The dtype a variant asks for; None for "best" (each side chooses)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(variant)


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and advice, which would drown the progress log."""
    warnings.filterwarnings("ignore")
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


# ---- settings --------------------------------------------------------------------------------------------

@dataclass
class Settings:
    config_name: str
    size: int                  # image side in pixels; latents are size / 8
    steps: int
    reps: int
    e2e_reps: int
    sections: tuple[str, ...]
    variants: tuple[str, ...]
    compile: bool
    openvino: bool
    checkpoint: Path
    matmul_size: int
    cfg_cutoff: float = 0.4
    cache_interval: int = 3

    @property
    def config(self) -> ModelConfig:
        return PRESETS[self.config_name]

    @property
    def latent(self) -> int:
        return self.size // 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256x256 (32x32 latent), 10 steps, 2 repetitions: with "
                   "--variants best a few minutes")
    p.add_argument("--config", default="sd1", choices=CONFIGS, help="sd1: the full SD 1.5 model; tiny: smoke tests")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but compile)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--reps", type=int, help="timed repetitions per side (default 3, --quick 2)")
    p.add_argument("--e2e-reps", type=int, help="timed repetitions of end-to-end generation (default 1)")
    p.add_argument("--size", type=int, help="image side in pixels (default 512, --quick 256)")
    p.add_argument("--steps", type=int, help="sampling steps end to end (default 20, --quick 10)")
    p.add_argument("--checkpoint", type=Path,
                   help="random-weight checkpoint to use; written there first if missing "
                        "(default: bench/results/<config>-random-fp16.safetensors)")
    p.add_argument("--compile", action="store_true", help="minisd's best configuration calls sd.compile()")
    p.add_argument("--cfg-cutoff", type=float, default=0.4,
                   help="workflow: CFG on the steps up to int(steps x F), as diffusers' SDCFGCutoffCallback "
                        "(cutoff_step_ratio=F); minisd --cfg-interval 0,(int(steps x F) + 1)/steps (default 0.4)")
    p.add_argument("--cache-interval", type=int, default=3, help="workflow: minisd's DeepCache interval (default 3)")
    p.add_argument("--no-openvino", action="store_true", help="leave OpenVINO out even when it is installed")
    p.add_argument("--output", type=Path, help="JSON file (default: bench/results/compare-<timestamp>.json)")
    # Internal: one checkpoint load in a fresh process (the "load" section runs the script itself this way).
    p.add_argument("--load-child", nargs=2, metavar=("SIDE", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--diffusers-config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--compile-child", metavar="SIDE", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    def names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
        chosen = tuple(s.strip() for s in text.split(",") if s.strip())
        unknown = set(chosen) - set(allowed)
        if unknown:
            raise SystemExit(f"unknown {what}: {', '.join(sorted(unknown))} (choose from {', '.join(allowed)})")
        return tuple(s for s in allowed if s in chosen)  # canonical order

    size = args.size or (256 if args.quick else 512)
    if size % 8 or size < 64:
        raise SystemExit("--size must be a multiple of 8, at least 64")
    if any(n is not None and n < 1 for n in (args.reps, args.e2e_reps, args.steps)):
        raise SystemExit("--reps, --e2e-reps and --steps must be at least 1")
    name = "sd15" if args.config == "sd1" else args.config
    checkpoint = args.checkpoint or RESULTS / f"{name}-random-fp16.safetensors"
    return Settings(config_name=args.config, size=size, steps=args.steps or (10 if args.quick else 20),
                    reps=args.reps if args.reps is not None else (2 if args.quick else 3),
                    e2e_reps=args.e2e_reps if args.e2e_reps is not None else 1,
                    sections=names(args.sections, SECTIONS, "sections"),
                    variants=names(args.variants, VARIANTS, "variants"), compile=args.compile,
                    openvino=not args.no_openvino and importlib.util.find_spec("openvino") is not None,
                    checkpoint=checkpoint, matmul_size=1024 if args.config == "tiny" else 4096,
                    cfg_cutoff=args.cfg_cutoff, cache_interval=args.cache_interval)


# ---- the checkpoint and the diffusers config folder ------------------------------------------------------

def ensure_checkpoint(path: Path, config_name: str) -> None:
    """Write the random-weight checkpoint once (about a minute for SD 1.5) and reuse it afterwards. SD 1.5 is
    written as a real SD file, without minisd's config metadata; the tiny config cannot be inferred from its
    shapes, so it keeps its metadata."""
    if path.exists():
        log(f"checkpoint: reusing {path}")
        return
    from minisd.testing import write_checkpoint
    log(f"checkpoint: writing random fp16 weights to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial" + path.suffix)
    write_checkpoint(partial, PRESETS[config_name], seed=0, dtype=torch.float16,
                     record_config=config_name != "sd1")
    os.replace(partial, path)  # never leave a half-written cache behind


def warm_page_cache(path: Path) -> None:
    """Read the file once so that every timed load finds it in the page cache, not on disk."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def write_pipeline_folder(folder: Path, config: ModelConfig) -> Path:
    """Everything `StableDiffusionPipeline.from_single_file(config=folder)` reads besides the weights, so that it
    runs offline: component configs, tokenizer files, the Euler scheduler and model_index.json."""
    import diffusers
    from minisd.testing import diffusers_config_folder
    from minisd.tokenizer import write_hf_files

    diffusers_config_folder(folder, config)
    write_hf_files(folder / "tokenizer")
    euler_scheduler().save_config(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def euler_scheduler():
    """diffusers' equivalent of minisd's sampler "Euler" with schedule "Simple" (timesteps 999, 949, ...)."""
    from diffusers import EulerDiscreteScheduler
    from minisd.testing import SD_SCHEDULER
    return EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="trailing")


def cfg_cutoff_end(steps: int, ratio: float) -> float:
    """minisd's --cfg-interval end equal to SDCFGCutoffCallback(cutoff_step_ratio=ratio): diffusers drops the
    guidance after step int(steps · ratio) (0-based), so steps 0 .. int(steps · ratio) are guided."""
    return min(1.0, (int(steps * ratio) + 1) / steps)


def write_taesd_folder(folder: Path) -> Path:
    """A random-weight TAESD in diffusers' AutoencoderTiny layout (SD 1.x latents), loaded by both sides."""
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(str(folder))
    return folder


def cpu_kind() -> str:
    """The CPU kind as the hardware reports it (what decides minisd's default precision and layout)."""
    flags = set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])) if Path("/proc/cpuinfo").exists() else set()
    kind = "AMX" if "amx_bf16" in flags else "AVX-512, no AMX" if "avx512f" in flags else \
        "AVX2" if "avx2" in flags else platform.machine()
    assumed = os.environ.get("MINISD_ASSUME_AMX", "").strip()
    return kind + (f" (minisd told MINISD_ASSUME_AMX={assumed})" if assumed else "")


# ---- the inputs ------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """The same inputs for every side, made once in float32 (each side casts them to its dtype)."""
    x: torch.Tensor        # noisy latent, cond + uncond (2, 4, h, w)
    t: torch.Tensor        # timestep (2,)
    context: torch.Tensor  # text context (2, 77, D)
    z: torch.Tensor        # unscaled latent to decode (1, 4, h, w)
    ids: torch.Tensor      # token ids of two prompts (2, 77)
    noise: torch.Tensor    # initial noise of end-to-end generation, as minisd draws it for SEED (1, 4, h, w)
    size: int

    @classmethod
    def make(cls, config: ModelConfig, size: int) -> "Inputs":
        g = torch.Generator().manual_seed(1234)
        h = size // 8
        ids = torch.randint(1, config.text.vocab_size - 2, (2, 77), generator=g)
        ids[:, 0], ids[:, -1] = config.text.vocab_size - 2, config.text.vocab_size - 1  # BOS ... EOS
        return cls(x=torch.randn(2, 4, h, h, generator=g), t=torch.full((2,), 500.0),
                   context=torch.randn(2, 77, config.unet.context_dim, generator=g),
                   z=torch.randn(1, 4, h, h, generator=g), ids=ids,
                   noise=torch.randn((1, 4, h, h), generator=torch.Generator().manual_seed(SEED)), size=size)


# ---- the sides -------------------------------------------------------------------------------------------
# Each side turns (measurement, inputs) into a call without arguments that returns the output tensor; its
# inputs are cast beforehand so that only the model's own work is timed.

Call = Callable[[], torch.Tensor]


class MinisdSide:
    name = "minisd"

    def __init__(self, sd):
        self.sd = sd
        self.dtype = sd.dtype
        self.label = str(sd.dtype).removeprefix("torch.")

    @classmethod
    def load(cls, path: Path, variant: str, compile: bool = False) -> "MinisdSide":
        import minisd
        sd = minisd.load(path, dtype=variant_dtype(variant))
        side = cls(sd)
        if variant == "best" and compile:
            if hasattr(sd, "compile"):
                sd.compile()
                side.label += " + compile()"
            else:
                log("minisd has no StableDiffusion.compile(): --compile ignored")
        return side

    def call(self, measurement: str, inputs: Inputs, steps: int) -> Call:
        sd, dtype = self.sd, self.dtype
        if measurement == "unet":
            x, t, context = inputs.x.to(dtype), inputs.t, inputs.context.to(dtype)
            return lambda: sd.unet(x, t, context)
        if measurement == "vae":
            z = inputs.z.to(dtype)
            return lambda: sd.vae.decode(z)
        if measurement == "text":
            return lambda: sd.text_encoder(inputs.ids)
        if measurement == "e2e":
            return self._generate(inputs, steps)
        raise ValueError(measurement)

    def _generate(self, inputs: Inputs, steps: int, **options) -> Call:
        """The whole txt2img to PIL images; returns the final latent, caught from the sampler's callback (Euler's
        last step goes to σ = 0, where the new x is the step's denoised prediction)."""
        final: dict[str, torch.Tensor] = {}
        options = {"sampler": "Euler", "schedule": "Simple", "cfg_scale": GUIDANCE, **options}

        def run() -> torch.Tensor:
            self.sd.txt2img(PROMPT, width=inputs.size, height=inputs.size, steps=steps, seed=SEED,
                            callback=lambda info: final.update(latent=info["denoised"]), **options)
            return final["latent"]
        return run

    def workflow(self, name: str, inputs: Inputs, steps: int, s: "Settings", taesd: Path | None) -> Call | None:
        """Issue 13's workflows: standard; CFG on the first steps only; DeepCache; the fast preset (LCM, 4
        steps, CFG 1, the tiny decoder)."""
        if name == "standard":
            return self._generate(inputs, steps)
        if name == "cfg":
            return self._generate(inputs, steps, cfg_interval=(0.0, cfg_cutoff_end(steps, s.cfg_cutoff)))
        if name == "cache":
            return self._generate(inputs, steps, cache_interval=s.cache_interval)
        if name == "fast":
            from minisd.params import GENERATION_PRESETS
            if taesd is not None and getattr(self.sd, "taesd", None) is None:
                self.sd.load_taesd(taesd)
            preset = dict(GENERATION_PRESETS["fast"])
            preset.pop("steps")
            return self._generate(inputs, min(steps, FAST_STEPS), **preset)
        raise ValueError(name)


class DiffusersSide:
    name = "diffusers"

    def __init__(self, pipe, label: str):
        self.pipe, self.label = pipe, label
        self.dtype = pipe.unet.dtype

    @classmethod
    def load(cls, path: Path, folder: Path, variant: str) -> "DiffusersSide":
        """`StableDiffusionPipeline.from_single_file`, offline from the local config folder; "best" is bf16 with the
        UNet and VAE in channels-last memory format."""
        import diffusers
        dtype = variant_dtype(variant) or torch.bfloat16
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, safety_checker=None,
            requires_safety_checker=False)
        pipe.scheduler = euler_scheduler()
        pipe.set_progress_bar_config(disable=True)
        label = str(dtype).removeprefix("torch.")
        if variant == "best":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            label += " + channels_last"
        return cls(pipe, label)

    def call(self, measurement: str, inputs: Inputs, steps: int) -> Call:
        pipe, dtype = self.pipe, self.dtype
        if measurement == "unet":
            x, t, context = inputs.x.to(dtype), inputs.t, inputs.context.to(dtype)
            return lambda: pipe.unet(x, t, encoder_hidden_states=context).sample
        if measurement == "vae":
            z = inputs.z.to(dtype)
            return lambda: pipe.vae.decode(z).sample
        if measurement == "text":
            return lambda: pipe.text_encoder(inputs.ids).last_hidden_state
        if measurement == "e2e":
            return self._generate(inputs, steps)
        raise ValueError(measurement)

    def _generate(self, inputs: Inputs, steps: int, guidance: float = GUIDANCE, cutoff=None) -> Call:
        """The pipeline to PIL images from minisd's initial noise (EulerDiscreteScheduler scales it by σ_max
        itself); returns the final latent, caught from the step-end callback (after `cutoff`, a
        SDCFGCutoffCallback, when given)."""
        final: dict[str, torch.Tensor] = {}

        def catch(pipe, i, t, tensors):
            if cutoff is not None:
                tensors = cutoff(pipe, i, t, tensors)
            final["latent"] = tensors["latents"]
            return tensors

        latents = inputs.noise.to(self.dtype)
        names = ["latents"] + (["prompt_embeds"] if cutoff is not None else [])

        def run() -> torch.Tensor:
            self.pipe(PROMPT, height=inputs.size, width=inputs.size, num_inference_steps=steps,
                      guidance_scale=guidance, latents=latents, callback_on_step_end=catch,
                      callback_on_step_end_tensor_inputs=names)
            return final["latent"]
        return run

    def workflow(self, name: str, inputs: Inputs, steps: int, s: "Settings", taesd: Path | None) -> Call | None:
        """diffusers' own features for the same workflows: SDCFGCutoffCallback; no DeepCache (not part of
        diffusers); LCMScheduler, guidance 1 and AutoencoderTiny for the fast preset."""
        if name == "standard":
            return self._generate(inputs, steps)
        if name == "cfg":
            from diffusers.callbacks import SDCFGCutoffCallback
            return self._generate(inputs, steps, cutoff=SDCFGCutoffCallback(cutoff_step_ratio=s.cfg_cutoff))
        if name == "cache":
            return None
        if name == "fast":
            from diffusers import AutoencoderTiny, LCMScheduler
            from minisd.testing import SD_SCHEDULER
            if not isinstance(self.pipe.scheduler, LCMScheduler):
                self.pipe.scheduler = LCMScheduler(**SD_SCHEDULER)
                if taesd is not None:
                    tiny = AutoencoderTiny.from_pretrained(str(taesd), torch_dtype=self.dtype)
                    if "channels_last" in self.label:
                        tiny.to(memory_format=torch.channels_last)
                    self.pipe.vae = tiny
            return self._generate(inputs, min(steps, FAST_STEPS), guidance=1.0)
        raise ValueError(name)


class OpenVINOSide:
    """diffusers' UNet and VAE decoder converted with `openvino.convert_model` (static shapes) and compiled for the
    CPU with OpenVINO's default precision (bf16 where the CPU has it); the text encoder is not converted."""
    name = "openvino"

    def __init__(self, unet, decoder, label: str, prepare_seconds: float):
        self.unet, self.decoder, self.label, self.prepare_seconds = unet, decoder, label, prepare_seconds

    @classmethod
    def prepare(cls, path: Path, folder: Path, inputs: Inputs) -> "OpenVINOSide":
        import openvino as ov

        class UNetCall(torch.nn.Module):
            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def forward(self, x, t, context):
                return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

        class Decoder(torch.nn.Module):
            def __init__(self, vae):
                super().__init__()
                self.vae = vae

            def forward(self, z):
                return self.vae.decode(z, return_dict=False)[0]

        start = time.perf_counter()
        source = DiffusersSide.load(path, folder, "fp32").pipe
        core = ov.Core()
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})  # as many as torch uses
        compiled = []
        for module, example in ((UNetCall(source.unet), (inputs.x, inputs.t, inputs.context)),
                                (Decoder(source.vae), (inputs.z,))):
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about data-dependent branches
                model = ov.convert_model(module, example_input=example, input=[e.shape for e in example])
            compiled.append(core.compile_model(model, "CPU"))
            del model
        del source  # the compiled models keep what they need of it
        free_memory()
        precision = compiled[0].get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: bf16 or f32
        precision = precision.get_type_name() if hasattr(precision, "get_type_name") else str(precision)
        threads = compiled[0].get_property("INFERENCE_NUM_THREADS")
        label = f"OpenVINO {ov.__version__.split('-')[0]}, {precision}, threads: {threads}"
        return cls(*compiled, label=label, prepare_seconds=time.perf_counter() - start)

    def call(self, measurement: str, inputs: Inputs, steps: int) -> Call | None:
        if measurement == "unet":
            feed = [inputs.x.numpy(), inputs.t.numpy(), inputs.context.numpy()]
            return lambda: torch.from_numpy(self.unet(feed)[0])
        if measurement == "vae":
            feed = [inputs.z.numpy()]
            return lambda: torch.from_numpy(self.decoder(feed)[0])
        return None  # text and e2e: not converted (e2e is estimated from the parts)


# ---- measuring -------------------------------------------------------------------------------------------

def alternate(calls: dict[str, Call], reps: int, warmups: dict[str, Call] | None = None
              ) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """One warm-up call per side, then `reps` rounds in which the sides take turns; seconds per side and each
    side's last output (reps = 0: a single untimed call, for its output only)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        if reps == 0:
            return times, {name: call().float().clone() for name, call in calls.items()}
        for name, call in (warmups or calls).items():
            call()
        for _ in range(reps):
            for name, call in calls.items():
                start = time.perf_counter()
                out = call()
                times[name].append(time.perf_counter() - start)
                outputs[name] = out
    return times, {name: out.float().clone() for name, out in outputs.items()}


def matmul_peak(dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """The machine's matmul throughput in GFLOP/s: an n×n×n torch.mm in `dtype`, best of a few."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    out = torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


@contextlib.contextmanager
def counting_attention(counter) -> Iterator[dict[str, int]]:
    """Count every F.scaled_dot_product_attention call as QKᵀ plus AV, 2·B·heads·Lq·Lk·(d + d_v) FLOPs, in place
    of whatever `counter` (a FlopCounterMode) saw inside it: 0 for torch's fused CPU kernel, the bmm's where the
    call decomposes (e.g. on the meta device)."""
    original = F.scaled_dot_product_attention
    tally = {"attention": 0, "correction": 0}

    def counted(q, k, v, *args, **kwargs):
        before = counter.get_total_flops()
        out = original(q, k, v, *args, **kwargs)
        flops = 2 * math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        tally["attention"] += flops
        tally["correction"] += flops - (counter.get_total_flops() - before)
        return out

    F.scaled_dot_product_attention = counted
    try:
        yield tally
    finally:
        F.scaled_dot_product_attention = original


def unet_flops(unet: torch.nn.Module, inputs: Inputs) -> dict[str, int]:
    """FLOPs of one guided UNet step (minisd's UNet, the same architecture as diffusers'): torch's FlopCounterMode,
    with the attention counted by hand."""
    from torch.utils.flop_counter import FlopCounterMode
    unet = getattr(unet, "_orig_mod", unet)  # the eager module under a torch.compile wrapper
    dtype = next(unet.parameters()).dtype
    x, context = inputs.x.to(dtype), inputs.context.to(dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter, counting_attention(counter) as tally:
        unet(x, inputs.t, context)
    counted = counter.get_total_flops()
    return {"total": counted + tally["correction"], "counted_by_torch": counted, "attention": tally["attention"],
            "attention_added": tally["correction"]}


# ---- results ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a measurement in one variant, the samples of each side."""
    measurement: str
    variant: str
    kind: str                                    # "time" (s), "memory" (GiB) or "error" (relative)
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # a side's cell footnote, e.g. "estimate"

    def median(self, side: str) -> float | None:
        values = self.samples.get(side)
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        summary = {side: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
                   for side, v in self.samples.items() if v}
        return {"measurement": self.measurement, "variant": self.variant, "kind": self.kind, "sides": summary,
                "notes": self.notes}


def number(value: float, kind: str) -> str:
    if kind == "error":
        return f"{value:.1e}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"


def cell(row: Row, side: str) -> str:
    values = row.samples.get(side)
    if not values:
        return ""
    text = number(statistics.median(values), row.kind)
    if len(values) > 1:
        text += f" [{number(min(values), row.kind)}–{number(max(values), row.kind)}]"
    return text + (f" ({row.notes[side]})" if side in row.notes else "")


def results_table(rows: list[Row], with_openvino: bool, kind: str = "") -> str:
    """The rows as markdown; every row names the CPU kind it ran on (`cpu_kind`)."""
    header = ["Measurement", "Variant", "CPU", "minisd", "diffusers", "diffusers / minisd"] + \
        (["OpenVINO"] * with_openvino)
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for row in rows:
        ratio = ""
        a, b = row.median("minisd"), row.median("diffusers")
        if row.kind != "error" and a and b:
            ratio = f"{b / a:.2f}×"
        cells = [row.measurement, row.variant, kind, cell(row, "minisd"), cell(row, "diffusers"), ratio]
        lines.append("| " + " | ".join(cells + [cell(row, "openvino")] * with_openvino) + " |")
    return "\n".join(lines)


def throughput_table(rows: list[Row], flops: dict[str, int], peaks: dict[str, float]) -> tuple[str, list[dict]]:
    """Achieved GFLOP/s of the UNet step per side and variant, against the measured matmul peaks."""
    lines = ["| UNet step | Variant | seconds | GFLOP/s | % of bf16 peak | % of fp32 peak |",
             "|---|---|---:|---:|---:|---:|"]
    entries = []
    for row in rows:
        if row.measurement != UNET_LABEL:
            continue
        for side in SIDES:
            seconds = row.median(side)
            if seconds is None:
                continue
            rate = flops["total"] / seconds / 1e9
            entry = {"side": side, "variant": row.variant, "seconds": seconds, "gflops": rate,
                     "pct_bf16_peak": 100 * rate / peaks["bf16"], "pct_fp32_peak": 100 * rate / peaks["fp32"]}
            entries.append(entry)
            lines.append(f"| {side} | {row.variant} | {number(seconds, 'time')} | {rate:.0f} | "
                         f"{entry['pct_bf16_peak']:.0f}% | {entry['pct_fp32_peak']:.0f}% |")
    return "\n".join(lines), entries


# ---- machine ---------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    memory = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemTotal")), 0)

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    revision = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True).stdout.strip()
    return {"cpu": model, "cpu_kind": cpu_kind(), "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "memory_gib": round(memory / GIB, 1),
            "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": version("diffusers"), "transformers": version("transformers"),
            "openvino": version("openvino"), "minisd": f"{version('minisd')} ({revision or 'no git'})"}


def machine_lines(info: dict[str, Any]) -> str:
    return "\n".join([
        f"- CPU: {info['cpu']} ({info['cores']} logical cores; {', '.join(info['isa']) or 'no AVX-512/AMX'}), "
        f"{info['memory_gib']} GiB",
        f"- threads: torch {info['torch_threads']} (OMP_NUM_THREADS={info['OMP_NUM_THREADS']}); load average at start "
        + ", ".join(f"{x:.2f}" for x in info["load_average"]),
        f"- torch {info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}, "
        f"openvino {info['openvino'] or 'not installed'}, minisd {info['minisd']}, Python {info['python']}"])


# ---- the load section: one load per fresh process ---------------------------------------------------------

def load_child(side: str, variant: str, checkpoint: Path, folder: Path, compile: bool) -> None:
    """Runs in a fresh process: import, then time one load and print its seconds and peak RSS as JSON."""
    torch.set_flush_denormal(True)
    if side == "diffusers":
        quiet_libraries()
    else:
        import minisd  # noqa: F401  (imported before the clock starts, as diffusers is)
    before = proc_status_kib("VmRSS")
    start = time.perf_counter()
    loaded = (MinisdSide.load(checkpoint, variant, compile) if side == "minisd"
              else DiffusersSide.load(checkpoint, folder, variant))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_gib": proc_status_kib("VmHWM") / 2**20,
                      "rss_before_gib": before / 2**20, "label": loaded.label}))


def bench_load(s: Settings, folder: Path) -> list[Row]:
    """Each load in a fresh subprocess so that its peak RSS is its own; sides alternate, `reps` rounds."""
    rows = []
    warm_page_cache(s.checkpoint)
    for variant in s.variants:
        seconds, peak = Row(LOAD_TIME_LABEL, variant, "time"), Row(LOAD_RSS_LABEL, variant, "memory")
        for _ in range(max(s.reps, 1)):
            for side in ("minisd", "diffusers"):
                command = [sys.executable, str(Path(__file__).resolve()), "--load-child", side, variant,
                           "--checkpoint", str(s.checkpoint), "--diffusers-config", str(folder)]
                command += ["--compile"] * s.compile
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"load of {side} {variant} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                seconds.samples.setdefault(side, []).append(result["seconds"])
                peak.samples.setdefault(side, []).append(result["peak_gib"])
                log(f"load {variant} {side}: {result['seconds']:.1f} s, peak RSS {result['peak_gib']:.2f} GiB")
        rows += [seconds, peak]
    return rows


# ---- the in-process sections -----------------------------------------------------------------------------

@dataclass
class Run:
    """What the in-process phases accumulate."""
    rows: list[Row] = field(default_factory=list)
    outputs: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)  # (variant, side, measurement)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)                 # variant -> side -> config
    flops: dict[str, int] | None = None
    openvino_prepare_seconds: float | None = None
    notes: list[str] = field(default_factory=list)                                    # lines under the table


def load_sides(s: Settings, variant: str, folder: Path, inputs: Inputs, run: Run) -> dict[str, Any]:
    sides: dict[str, Any] = {}
    if variant == "best" and s.openvino and {"unet", "vae"} & set(s.sections):
        log("openvino: converting and compiling diffusers' UNet and VAE decoder")
        try:
            sides["openvino"] = OpenVINOSide.prepare(s.checkpoint, folder, inputs)
        except Exception as e:  # an optional column must not sink a long run
            log(f"openvino: left out, its preparation failed: {type(e).__name__}: {e}")
            free_memory()
        else:
            run.openvino_prepare_seconds = sides["openvino"].prepare_seconds
            log(f"openvino: ready in {run.openvino_prepare_seconds:.0f} s ({sides['openvino'].label})")
    log(f"{variant}: loading minisd and diffusers")
    sides = {"minisd": MinisdSide.load(s.checkpoint, variant, s.compile),
             "diffusers": DiffusersSide.load(s.checkpoint, folder, variant), **sides}
    run.labels[variant] = {name: side.label for name, side in sides.items()}
    return sides


def measure(s: Settings, variant: str, measurement: str, sides: dict[str, Any], inputs: Inputs, run: Run) -> None:
    """Time one measurement with the sides alternating and keep each side's output for the quality rows."""
    timed = measurement in s.sections
    steps = s.steps if measurement == "e2e" else 0
    reps = (s.e2e_reps if measurement == "e2e" else s.reps) if timed else 0
    calls = {name: call for name, side in sides.items() if (call := side.call(measurement, inputs, steps))}
    # End to end, a one-step generation warms up every shape; the other sections have already run.
    warmups = {name: side.call(measurement, inputs, 1) for name, side in sides.items() if name in calls} \
        if measurement == "e2e" else None
    log(f"{variant}: {measurement}" + ("" if timed else " (once, for the quality rows)"))
    times, outputs = alternate(calls, reps, warmups)
    for name, out in outputs.items():
        run.outputs[(variant, name, measurement)] = out
    if not timed:
        return
    row = Row(LABELS[measurement], variant, "time", {name: t for name, t in times.items() if t})
    if measurement == "e2e" and "openvino" in sides:
        estimate = openvino_e2e_estimate(run.rows, variant, s.steps)
        if estimate is not None:
            row.samples["openvino"], row.notes["openvino"] = [estimate], "estimate"
    run.rows.append(row)
    log(f"{variant}: {measurement}: "
        + ", ".join(f"{n} {number(statistics.median(t), 'time')} s" for n, t in row.samples.items()))


def openvino_e2e_estimate(rows: list[Row], variant: str, steps: int) -> float | None:
    """steps × OpenVINO UNet step + OpenVINO VAE decode + diffusers' text encoding (OpenVINO's is not converted)."""
    def median(label: str, side: str) -> float | None:
        return next((r.median(side) for r in rows if r.measurement == label and r.variant == variant), None)
    parts = (median(LABELS["unet"], "openvino"), median(LABELS["vae"], "openvino"), median(LABELS["text"], "diffusers"))
    return None if None in parts else steps * parts[0] + parts[1] + parts[2]


def bench_in_process(s: Settings, folder: Path) -> Run:
    """The phases fp32, bf16, best: load both sides (one of each at a time), run every measurement, free. The
    workflow rows run in the best phase (which is added for them when --variants leaves it out)."""
    run = Run()
    inputs = Inputs.make(s.config, s.size)
    wanted = [m for m in TIMED if m in s.sections or "quality" in s.sections]
    variants = s.variants + (("best",) if "workflow" in s.sections and "best" not in s.variants else ())
    for variant in variants:
        sides = load_sides(s, variant, folder, inputs, run)
        if run.flops is None and "unet" in s.sections:
            run.flops = unet_flops(sides["minisd"].sd.unet, inputs)
            log(f"UNet step: {run.flops['total'] / 1e9:.1f} GFLOP")
        for measurement in wanted if variant in s.variants else ():
            measure(s, variant, measurement, sides, inputs, run)
        if variant == "best" and "workflow" in s.sections:
            bench_workflow(s, sides, inputs, run, write_taesd_folder(folder.parent / "taesd"))
        del sides
        free_memory()
    return run


def workflow_label(name: str, s: Settings) -> str:
    guided = int(s.steps * s.cfg_cutoff) + 1
    return {"standard": f"txt2img: {s.steps} Euler steps, CFG {GUIDANCE} (s)",
            "cfg": f"txt2img: CFG on the first {min(guided, s.steps)} of {s.steps} steps (s)",
            "cache": f"txt2img: DeepCache, deep UNet part on 1 call in {s.cache_interval} (s)",
            "fast": f"txt2img fast: LCM {FAST_STEPS} steps, CFG 1, tiny decoder (s)"}[name]


def bench_workflow(s: Settings, sides: dict[str, Any], inputs: Inputs, run: Run, taesd: Path) -> None:
    """Whole images for each workflow in each side's best configuration, sides alternating; a 1-step run of the
    same workflow warms up. A side without the feature (diffusers: DeepCache) leaves its cell empty."""
    for name in WORKFLOWS:
        calls, warmups = {}, {}
        for side_name, side in sides.items():
            if hasattr(side, "workflow") and (call := side.workflow(name, inputs, s.steps, s, taesd)):
                calls[side_name], warmups[side_name] = call, side.workflow(name, inputs, 1, s, taesd)
        log(f"workflow {name}: " + ", ".join(calls))
        times, _ = alternate(calls, s.e2e_reps, warmups)
        row = Row(workflow_label(name, s), "best", "time", {n: t for n, t in times.items() if t})
        run.rows.append(row)
        log(f"workflow {name}: " + ", ".join(f"{n} {number(statistics.median(t), 'time')} s"
                                             for n, t in row.samples.items()))


# ---- the compile section: each compilation in a fresh process -------------------------------------------------

COMPILE_LABELS = {"cold": "compile + first UNet step, empty cache (s)",
                  "warm": "compile + first UNet step, warm cache (s)", "step": "UNet step, compiled (s)"}


def compile_child(side: str, s: Settings, folder: Path) -> None:
    """Runs in a fresh process whose TORCHINDUCTOR_CACHE_DIR the parent chose: load the best configuration,
    compile the UNet as minisd does (static shapes, frozen weights, FX graph cache: `minisd.compiled`; diffusers'
    UNet gets the same inductor settings), time the first call (compilation included), then two more."""
    from minisd.compiled import compile_module
    torch.set_flush_denormal(True)
    inputs = Inputs.make(s.config, s.size)
    if side == "minisd":
        loaded = MinisdSide.load(s.checkpoint, "best")
        compile_module(loaded.sd.unet)
    else:
        quiet_libraries()
        loaded = DiffusersSide.load(s.checkpoint, folder, "best")
        compile_module(loaded.pipe.unet)
    call = loaded.call("unet", inputs, 0)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    from torch._dynamo.utils import counters
    print(json.dumps({"first": times[0], "steps": times[1:], "label": loaded.label,
                      "fx_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
                      "fx_cache_misses": counters["inductor"]["fxgraph_cache_miss"]}))


def bench_compile(s: Settings, folder: Path, notes: list[str]) -> list[Row]:
    """Per side: a process with an empty inductor cache (cold), then one with the cache it left (warm)."""
    rows = {key: Row(label, "best", "time") for key, label in COMPILE_LABELS.items()}
    with tempfile.TemporaryDirectory(prefix="minisd-bench-inductor-") as caches:
        for state in ("cold", "warm"):
            for side in ("minisd", "diffusers"):
                command = [sys.executable, str(Path(__file__).resolve()), "--compile-child", side,
                           "--checkpoint", str(s.checkpoint), "--diffusers-config", str(folder),
                           "--config", s.config_name, "--size", str(s.size)]
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(caches) / side)}
                log(f"compile {side}, {state} cache")
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise RuntimeError(f"compile of {side} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows[state].samples.setdefault(side, []).append(result["first"])
                rows["step"].samples.setdefault(side, []).extend(result["steps"])
                notes.append(f"compile, {side}, {state} cache: {result['label']}; FX graph cache "
                             f"{result['fx_cache_hits']} hits, {result['fx_cache_misses']} misses")
                log(f"compile {side} {state}: first call {result['first']:.1f} s, then "
                    + ", ".join(f"{t:.2f}" for t in result["steps"]) + " s")
    return list(rows.values())


def quality_rows(run: Run, variants: tuple[str, ...]) -> list[Row]:
    """bf16 and best outputs against the fp32 output of the same side on the same weights and inputs (OpenVINO
    against diffusers' fp32)."""
    rows = []
    for variant in (v for v in variants if v != "fp32"):
        for measurement, label in QUALITY_LABELS.items():
            row = Row(label, variant, "error")
            for side in SIDES:
                reference = run.outputs.get(("fp32", "diffusers" if side == "openvino" else side, measurement))
                output = run.outputs.get((variant, side, measurement))
                if reference is not None and output is not None:
                    row.samples[side] = [relative_error(output, reference)]
            if row.samples:
                rows.append(row)
    return rows


def parity(run: Run) -> dict[str, float]:
    """minisd against diffusers in fp32: near 0 shows that both ran the same model on the same inputs."""
    return {m: relative_error(run.outputs[("fp32", "minisd", m)], run.outputs[("fp32", "diffusers", m)])
            for m in TIMED if ("fp32", "minisd", m) in run.outputs and ("fp32", "diffusers", m) in run.outputs}


# ---- main ------------------------------------------------------------------------------------------------

def report(s: Settings, info: dict, rows: list[Row], run: Run, peaks: dict[str, float] | None) -> tuple[str, dict]:
    """The markdown report and its JSON twin."""
    with_openvino = any("openvino" in r.samples for r in rows)
    size, latent = f"{s.size}×{s.size}", f"{s.latent}×{s.latent}"
    parts = [f"## minisd vs diffusers: {s.config_name}, {size} ({latent} latent), {s.steps} Euler steps, "
             f"guidance {GUIDANCE}", "", machine_lines(info), "", results_table(rows, with_openvino, info["cpu_kind"]),
             ""]
    definitions = {"load": "load = minisd.load / StableDiffusionPipeline.from_single_file in a fresh process",
                   "unet": f"UNet step = one guided step (batch 2, {latent} latent, context 2×77)",
                   "vae": f"VAE decode = (1, 4, {latent}) to {size}", "text": "text encoder = 2 prompts × 77 tokens",
                   "e2e": f"txt2img = {size}, {s.steps} Euler steps, guidance {GUIDANCE}, to PIL images"}
    defined = "; ".join(text for section, text in definitions.items() if section in s.sections)
    notes = ([defined + "."] if defined else []) + [
             f"Times: median [min–max] of {s.reps} run(s) per side ({s.e2e_reps} end to end), sides alternating, "
             "after a warm-up; diffusers / minisd > 1 means minisd is faster (or smaller)."]
    for variant, labels in run.labels.items():
        notes.append(f"{variant}: " + "; ".join(f"{side} {label}" for side, label in labels.items()))
    if "workflow" in s.sections:
        notes.append(f"workflow rows: whole {size} images in each side's best configuration. CFG interval: minisd "
                     f"--cfg-interval 0,{cfg_cutoff_end(s.steps, s.cfg_cutoff):g} = diffusers' SDCFGCutoffCallback"
                     f"(cutoff_step_ratio={s.cfg_cutoff}), one UNet pass after the cut-off. DeepCache: minisd "
                     f"--cache-interval {s.cache_interval}; diffusers has none. Fast: minisd --preset fast (LCM, "
                     f"{FAST_STEPS} steps, CFG 1) + TAESD vs diffusers LCMScheduler, guidance 1, AutoencoderTiny "
                     "(the same random tiny decoder). Random weights: times only, not images.")
    notes += run.notes
    if run.openvino_prepare_seconds is not None:
        notes.append(f"OpenVINO convert + compile: {run.openvino_prepare_seconds:.0f} s (not in any row); its "
                     "txt2img is an estimate: steps × UNet step + VAE decode + diffusers' text encoder.")
    checks = parity(run)
    if checks:
        notes.append("Parity, minisd vs diffusers in fp32 (max|a−b| / max|b|): "
                     + ", ".join(f"{m} {v:.1e}" for m, v in checks.items()))
    parts += ["- " + n for n in notes]
    throughput = []
    if run.flops and peaks:
        table, throughput = throughput_table(rows, run.flops, peaks)
        flops = {k: number(v / 1e9, "time") for k, v in run.flops.items()}
        parts += ["", f"UNet step: {flops['total']} GFLOP ({flops['attention']} "
                      "of them attention, counted by hand); matmul peaks "
                      f"({s.matmul_size}³ torch.mm, best of 3): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 "
                      f"{peaks['bf16']:.0f} GFLOP/s", "", table]
    data = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(s).items()},
            "machine": info, "rows": [r.to_json() for r in rows], "labels": run.labels, "parity": checks,
            "unet_flops": run.flops, "matmul_peaks_gflops": peaks, "throughput": throughput,
            "openvino_prepare_seconds": run.openvino_prepare_seconds,
            "benchmark_process_peak_rss_gib": proc_status_kib("VmHWM") / 2**20}
    return "\n".join(parts), data


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    if args.load_child:
        load_child(*args.load_child, args.checkpoint, args.diffusers_config, args.compile)
        return
    s = settings_from(args)
    if args.compile_child:
        compile_child(args.compile_child, s, args.diffusers_config)
        return
    info = machine_info()
    if info["load_average"][0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {info['load_average'][0]:.1f} — other work is running; numbers are unreliable")
    quiet_libraries()
    ensure_checkpoint(s.checkpoint, s.config_name)
    rows: list[Row] = []
    run = Run()
    peaks = None
    compile_rows: list[Row] = []
    compile_notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="minisd-bench-") as tmp:
        folder = write_pipeline_folder(Path(tmp) / "pipeline", s.config)
        if "load" in s.sections:
            rows += bench_load(s, folder)
        if "unet" in s.sections:
            log("matmul peaks")
            peaks = {name: matmul_peak(dtype, s.matmul_size)
                     for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        if set(TIMED + ("quality", "workflow")) & set(s.sections):
            run = bench_in_process(s, folder)
        if "compile" in s.sections:
            compile_rows = bench_compile(s, folder, compile_notes)
    rows += run.rows + compile_rows
    run.notes += compile_notes
    if "quality" in s.sections:
        rows += quality_rows(run, s.variants)
    text, data = report(s, info, rows, run, peaks)
    print(text)
    output = args.output or RESULTS / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({**data, "markdown": text}, indent=1))
    log(f"wrote {output}")


if __name__ == "__main__":
    main()
