"""Fuzz target: .safetensors files (header JSON, offsets, dtypes, shapes, the `minisd_config` metadata) through
the reader and the whole loader. Invariant: a model or a CheckpointError, within the time and memory bounds.
Run: `python fuzz/fuzz_safetensors.py [libFuzzer flags] fuzz/corpus/safetensors`."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fuzz import harness, mutators  # noqa: E402

import torch  # noqa: E402  (imported before instrumentation: only minisd is instrumented)

with harness.instrumented(__name__ == "__main__"):
    from minisd.checkpoint import CONFIG_METADATA_KEY, load_components
    from minisd.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
    from minisd.errors import CheckpointError
    from minisd.safetensors_file import SafetensorsFile

# The smallest model of SD 1.x's structure (one level, four channels): its file is ~50 KB, so that a mutated
# copy loads in milliseconds.
MICRO = ModelConfig(
    unet=UNetConfig(model_channels=4, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,), num_heads=1,
                    context_dim=4, norm_groups=2),
    vae=VAEConfig(channels=4, channel_mult=(1,), num_res_blocks=1, norm_groups=2, latent_channels=2),
    text=CLIPTextConfig(vocab_size=8, max_position_embeddings=4, hidden_size=4, intermediate_size=4,
                        num_hidden_layers=1, num_attention_heads=1))


def check(data: bytes) -> None:
    with harness.input_file(data, ".safetensors") as path:
        try:
            file = SafetensorsFile(path)
        except CheckpointError:
            pass
        else:
            for tensor in file.tensors().values():  # every byte range the header accepted is readable
                tensor.reshape(-1).view(torch.uint8).sum()
        load_components(path, device="cpu", dtype=torch.float32)


def seeds() -> dict[str, bytes]:
    import json
    import struct
    import tempfile

    from safetensors.torch import save

    from minisd.testing import write_checkpoint

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in (("micro-with-config", {}), ("micro-inferred", {"record_config": False})):
            path = Path(tmp) / f"{name}.safetensors"
            write_checkpoint(path, MICRO, dtype=torch.float16, **options)
            out[name] = path.read_bytes()
    out["all-dtypes"] = save({"f64": torch.ones(2, dtype=torch.float64), "bf16": torch.ones(3, dtype=torch.bfloat16),
                              "i8": torch.arange(4, dtype=torch.int8), "bool": torch.tensor([True, False]),
                              "f8": torch.zeros(2, dtype=torch.float8_e4m3fn), "empty": torch.zeros(0, 3),
                              "scalar": torch.tensor(1.5)}, metadata={"format": "pt"})
    out["not-sd"] = save({"fc.weight": torch.ones(3, 3)})

    def raw(header: dict, body: bytes = b"") -> bytes:
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + body

    out["empty-header"] = raw({})
    # The escapes of issue 19's mutation run: a model config that is not JSON, or whose sections are not objects.
    out["config-not-json"] = raw({"__metadata__": {CONFIG_METADATA_KEY: "{not json"}})
    out["config-section-int"] = raw({"__metadata__": {CONFIG_METADATA_KEY: json.dumps({"unet": 3})}})
    out["one-tb-tensor"] = raw({"w": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}})
    # Found by hand while writing the checks (each escaped as TypeError, RuntimeError or RecursionError before):
    out["float-shape"] = raw({"w": {"dtype": "F32", "shape": [2.0, 1.0], "data_offsets": [0, 8]}}, b"\0" * 8)
    out["negative-shape"] = raw({"w": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, b"\0" * 8)
    out["metadata-string"] = raw({"__metadata__": CONFIG_METADATA_KEY})
    out["overlap"] = raw({f"w{i}": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]} for i in range(3)},
                         b"\0" * 8)
    deep = b"[" * 100_000
    out["deep-header"] = struct.pack("<Q", len(deep)) + deep
    return out


TARGET = harness.Target(
    name="safetensors", check=check, allowed=(CheckpointError,), seeds=seeds,
    modules=("minisd/safetensors_file.py", "minisd/checkpoint.py", "minisd/config_limits.py"),
    mutate=lambda data, max_size, seed: mutators.mutate_safetensors(data, max_size, seed, harness.byte_mutate),
    dictionary=[b'"dtype"', b'"shape"', b'"data_offsets"', b'"__metadata__"', b'"minisd_config"', b'"F16"',
                b'"BF16"', b'"F8_E5M2"', b'"BOOL"', b'"U8"', b'"I64"', b'"F64"', b'model.diffusion_model.',
                b'first_stage_model.', b'cond_stage_model.transformer.', b'"unet"', b'"vae"', b'"text"'])

if __name__ == "__main__":
    harness.main(TARGET)
