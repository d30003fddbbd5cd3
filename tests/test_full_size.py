"""Full-size SDXL base and SD 2.1 768-v: an fp16 file with every key and shape of the released checkpoint (from
tests/data manifests) loads strictly into the networks built on `meta` (no missing or surprise key), in about the
weights' own memory, and runs one UNet step. Each load runs in a fresh process so that its peak RSS is its own."""
from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys

import pytest

from minisd.checkpoint import IGNORED_KEYS
from minisd.testing import write_manifest_checkpoint

from conftest import DATA

LOAD_AND_STEP = """
import json, sys, torch, minisd
from minisd.checkpoint import original_state_dict
sd = minisd.load(sys.argv[1], dtype=torch.bfloat16, device="cpu")
loaded = sum(p.numel() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())
peak = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
c = sd.config
x = torch.randn(1, 4, 16, 16, dtype=sd.dtype)  # a 128x128 image: the step's cost stays small, every layer runs
context = torch.randn(1, 77, c.unet.context_dim, dtype=sd.dtype)
extra = {"y": torch.randn(1, c.unet.adm_in_channels, dtype=sd.dtype)} if c.unet.adm_in_channels else {}
with torch.inference_mode():
    out = sd.unet(x, torch.tensor([500.0]), context, **extra)
keys = sorted(original_state_dict(sd.unet, sd.vae, sd.text_encoder))
print(json.dumps(dict(variant=c.variant, size=c.image_size, prediction=c.schedule.prediction_type, loaded=loaded,
                      peak=peak, shape=list(out.shape), finite=bool(torch.isfinite(out).all()), keys=keys)))
"""


@pytest.mark.parametrize("name, variant, size, prediction", [
    ("sdxl-base", "sdxl", 1024, "epsilon"),
    ("sd2", "sd2", 768, "v_prediction"),
])
def test_full_size_file_loads_in_its_own_memory_and_steps(tmp_path, name, variant, size, prediction):
    with gzip.open(DATA / f"{name}.json.gz", "rt") as f:
        manifest = json.load(f)
    keys = manifest["keys"]
    path = tmp_path / f"{name}.safetensors"
    write_manifest_checkpoint(keys, path, set(manifest.get("int_keys", [])))
    if prediction == "v_prediction":  # as A1111 reads the 768-v release: its v2-inference-v.yaml beside it
        path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    run = subprocess.run([sys.executable, "-c", LOAD_AND_STEP, str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.splitlines()[-1])
    # CLIP-L's position ids are recomputed, sgm's sigma table too; every other key is a loaded weight
    ignored = IGNORED_KEYS | {k for k in keys if k.endswith("embeddings.position_ids")}
    assert result["keys"] == sorted(k for k in keys if k not in ignored)
    weights = sum(math.prod(keys[k]) for k in keys if k not in ignored)
    assert result["loaded"] == weights
    assert (result["variant"], result["size"], result["prediction"]) == (variant, size, prediction)
    assert result["finite"] and result["shape"] == [1, 4, 16, 16]
    # bf16 weights are 2 bytes each; the file's fp16 pages are released as each tensor is cast, and the rest of the
    # process (torch, Python) is well under a GiB: a second copy of the weights would exceed this.
    print(f"{name}: {weights / 1e9:.2f} B weights, peak RSS {result['peak'] / 2**30:.2f} GiB")
    assert result["peak"] < 2 * weights * 1.1 + 2**30

