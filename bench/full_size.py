"""Full-size SD 2.x / SDXL from a key manifest: write a random-weight fp16 file with every key and shape of the
real checkpoint (streamed, one tensor at a time), then, each in a fresh process: minisd's load (time, peak RSS,
no surprise keys), diffusers' `from_single_file` of the UNet and VAE on the same file (time, peak RSS), and in each
one UNet step (cond only, batch 1, best of --repeats) at the model's native size in the chosen precisions.
Prints a markdown table.

    python bench/full_size.py --manifest /work/shared/manifests/sdxl-base.json --dtypes bf16
    python bench/full_size.py --manifest tests/data/sd2.json.gz --prediction v --dtypes bf16,fp32

The file needs 2 bytes per parameter on disk (SDXL base: 6.9 GB); a step at 1024² in fp32 needs about 14 GiB.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minisd.testing import write_manifest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}


def read_manifest(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


LOAD_MINISD = """
import time, torch, minisd
t0 = time.perf_counter()
sd = minisd.load({path!r}, device="cpu", dtype={dtype}, prediction={prediction!r})
seconds = time.perf_counter() - t0
n = {{name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", sd.unet), ("vae", sd.vae),
     ("text", sd.text_encoder))}}
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
result = dict(seconds=seconds, peak=hwm, params=n, variant=sd.config.variant, size=sd.config.image_size)
if {step}:
    torch.set_flush_denormal(True)
    c = sd.config
    latent = c.image_size // 8
    x = torch.randn(1, 4, latent, latent, dtype=sd.dtype)
    ctx = torch.randn(1, 77, c.unet.context_dim, dtype=sd.dtype)
    y = torch.randn(1, c.unet.adm_in_channels, dtype=sd.dtype) if c.unet.adm_in_channels else None
    times = []
    with torch.inference_mode():
        for _ in range({repeats}):
            t0 = time.perf_counter()
            sd.unet(x, torch.tensor([500.0]), ctx, y=y) if y is not None else sd.unet(x, torch.tensor([500.0]), ctx)
            times.append(time.perf_counter() - t0)
    result["step"] = min(times)
    result["step_peak"] = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print("RESULT", result)
"""

LOAD_DIFFUSERS = """
import json, time, torch, diffusers
from pathlib import Path
from minisd.config import infer_config
from minisd.testing import diffusers_config_folder
from safetensors import safe_open
with safe_open({path!r}, "pt") as f:
    shapes = {{k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}}
folder = diffusers_config_folder(Path({tmp!r}) / "configs", infer_config(shapes))
t0 = time.perf_counter()
unet = diffusers.UNet2DConditionModel.from_single_file({path!r}, config=str(folder), subfolder="unet",
                                                      torch_dtype={dtype})
vae = diffusers.AutoencoderKL.from_single_file({path!r}, config=str(folder), subfolder="vae", torch_dtype={dtype})
seconds = time.perf_counter() - t0
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
result = dict(seconds=seconds, peak=hwm, params=dict(unet=sum(p.numel() for p in unet.parameters()),
                                                     vae=sum(p.numel() for p in vae.parameters())))
if {step}:  # the same inputs as minisd's step, and the memory format minisd picks for this precision
    from minisd.config import SIZE_EMBEDDING_DIM
    from minisd.precision import memory_format
    torch.set_flush_denormal(True)
    unet.to(memory_format=memory_format(torch.device("cpu"), {dtype}))
    c = infer_config(shapes)
    latent = {size} // 8  # minisd's native size for the file (the keys alone do not show a 768-v model)
    x = torch.randn(1, 4, latent, latent, dtype={dtype})
    ctx = torch.randn(1, 77, c.unet.context_dim, dtype={dtype})
    extra = {{}}
    if c.unet.adm_in_channels:
        numbers = 6 if c.variant == "sdxl" else 5
        extra["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(1, c.unet.adm_in_channels - numbers * SIZE_EMBEDDING_DIM, dtype={dtype}),
            # original size, crop top-left, then the target size (base) or the aesthetic score (refiner)
            time_ids=torch.tensor([[{size}, {size}, 0, 0] + ([{size}] * 2 if numbers == 6 else [6])],
                                  dtype=torch.float32))
    times = []
    with torch.inference_mode():
        for _ in range({repeats}):
            t0 = time.perf_counter()
            unet(x, torch.tensor([500.0]), encoder_hidden_states=ctx, **extra)
            times.append(time.perf_counter() - t0)
    result["step"] = min(times)
    result["step_peak"] = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print("RESULT", result)
"""


def run(script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"failed:\n{out.stderr[-3000:]}")
    return eval(lines[-1][len("RESULT "):])  # our own subprocess's dict literal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--prediction", choices=["eps", "v"], default="eps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--no-step", action="store_true", help="loads only (minisd, diffusers, minisd again)")
    parser.add_argument("--keep", type=Path, help="write the file here (and keep it) instead of a temporary folder")
    args = parser.parse_args()
    manifest = read_manifest(args.manifest)
    with tempfile.TemporaryDirectory(dir=args.keep.parent if args.keep else None) as tmp:
        path = args.keep or Path(tmp) / "full.safetensors"
        if not path.exists():
            t0 = time.perf_counter()
            size = write_manifest_checkpoint(manifest["keys"], path, set(manifest.get("int_keys", [])))
            print(f"wrote {path} ({size / 1e9:.2f} GB of tensors) in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for name in args.dtypes.split(","):
            r = run(LOAD_MINISD.format(path=str(path), dtype=DTYPES[name], prediction=args.prediction,
                                       step=not args.no_step, repeats=args.repeats))
            rows.append((f"minisd load ({name}, all components)", r["seconds"], r["peak"], r.get("step"),
                         r.get("step_peak")))
            print(rows[-1], r["params"], r["variant"], r["size"], flush=True)
            if not args.no_diffusers:
                d = run(LOAD_DIFFUSERS.format(path=str(path), dtype=DTYPES[name], tmp=tmp, step=not args.no_step,
                                              repeats=args.repeats, size=r["size"]))
                rows.append((f"diffusers from_single_file ({name}, UNet + VAE)", d["seconds"], d["peak"], d.get("step"),
                             d.get("step_peak")))
                print(rows[-1], d["params"], flush=True)
                if args.no_step:  # alternate: the page cache and the machine's load then favour neither side
                    r = run(LOAD_MINISD.format(path=str(path), dtype=DTYPES[name], prediction=args.prediction,
                                               step=False, repeats=1))
                    rows.append((f"minisd load ({name}, all components), again", r["seconds"], r["peak"], None, None))
                    print(rows[-1], flush=True)
        print(f"\n{manifest['source']}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
        print("| what | load s | peak RSS GiB | UNet step s (1×, native size) | peak RSS with step GiB |")
        print("|---|---|---|---|---|")
        for what, seconds, peak, step, step_peak in rows:
            print(f"| {what} | {seconds:.1f} | {peak / 2**30:.2f} | {'' if step is None else f'{step:.1f}'} | "
                  f"{'' if step_peak is None else f'{step_peak / 2**30:.2f}'} |")


if __name__ == "__main__":
    main()
