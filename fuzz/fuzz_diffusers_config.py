"""Fuzz target: the config files of a diffusers folder (unet/, vae/, text_encoder/ config.json, the scheduler's,
model_index.json) through the folder loader, with the weights of a tiny model beside them.
Input: the five JSON documents joined by b"\\n---\\n". Invariant: a model or a CheckpointError, within bounds."""
from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fuzz import harness, mutators  # noqa: E402

import torch  # noqa: E402

with harness.instrumented(__name__ == "__main__"):
    from minisd.checkpoint import load_components
    from minisd.diffusers_format import WEIGHT_FILES
    from minisd.errors import CheckpointError

from fuzz.fuzz_safetensors import MICRO  # noqa: E402

SEPARATOR = b"\n---\n"
FILES = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
         "model_index.json"]


@functools.cache
def micro_folder() -> Path:
    """A diffusers folder of the MICRO model written by minisd itself; its weights are reused by every input."""
    from minisd.checkpoint import save_checkpoint
    from minisd.testing import random_state_dict

    root = tempfile.mkdtemp(prefix="minisd-fuzz-diffusers-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = Path(root) / "micro"
    save_checkpoint(folder, random_state_dict(MICRO, seed=5, dtype=torch.float16), MICRO)
    return folder


def check(data: bytes) -> None:
    source = micro_folder()
    parts = data.split(SEPARATOR)
    with tempfile.TemporaryDirectory(dir=harness.SCRATCH) as tmp:
        folder = Path(tmp)
        for name, stem in WEIGHT_FILES.items():
            (folder / name).mkdir()
            weights = source / name / f"{stem}.safetensors"
            (folder / name / weights.name).symlink_to(weights)
        (folder / "scheduler").mkdir()
        for name, content in zip(FILES, parts):
            (folder / name).write_bytes(content)
        if len(parts) < len(FILES):
            (folder / "model_index.json").write_bytes(b"{}")
        load_components(folder, device="cpu", dtype=torch.float32)


def seeds() -> dict[str, bytes]:
    folder = micro_folder()
    real = [(folder / name).read_bytes() for name in FILES]
    sd15_unet = json.loads(real[0]) | {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
                                       "cross_attention_dim": 768, "norm_num_groups": 32}
    return {
        "micro": SEPARATOR.join(real),
        "sd15-unet-config": SEPARATOR.join([json.dumps(sd15_unet).encode(), *real[1:]]),
        "not-json": SEPARATOR.join([b"{not json", *real[1:]]),
        "list-config": SEPARATOR.join([b"[]", *real[1:]]),
        "zero-width": SEPARATOR.join([json.dumps(json.loads(real[0]) | {"block_out_channels": [0, 4]}).encode(),
                                      *real[1:]]),
        "utf16": SEPARATOR.join([real[0].decode().encode("utf-16"), *real[1:]]),
    }


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    parts = data.split(SEPARATOR)
    index = rng.randrange(len(parts))
    try:
        parts[index] = mutators.dumps(mutators.mutate_json_value(json.loads(parts[index]), rng), rng)
    except (ValueError, RecursionError):
        parts[index] = harness.byte_mutate(parts[index], max(64, 2 * len(parts[index])))
    out = SEPARATOR.join(parts)
    return out if len(out) <= max_size and rng.random() < 0.8 else harness.byte_mutate(data, max_size)


TARGET = harness.Target(
    name="diffusers_config", check=check, allowed=(CheckpointError,), seeds=seeds,
    modules=("minisd/diffusers_format.py", "minisd/config_limits.py"), mutate=mutate,
    dictionary=[b'"block_out_channels"', b'"layers_per_block"', b'"down_block_types"', b'"CrossAttnDownBlock2D"',
                b'"attention_head_dim"', b'"num_attention_heads"', b'"transformer_layers_per_block"',
                b'"norm_num_groups"', b'"cross_attention_dim"', b'"hidden_act"', b'"prediction_type"', SEPARATOR])

if __name__ == "__main__":
    harness.main(TARGET)
