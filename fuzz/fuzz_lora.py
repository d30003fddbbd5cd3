"""Fuzz target: LoRA files (.safetensors; kohya, diffusers and PEFT key layouts; LoCon, LoHa, LoKr factors)
through the reader, the matcher and the delta arithmetic against a tiny model. Invariant: a matched LoRA or a LoraError/CheckpointError,
within the time and memory bounds: a delta may not be computed before its size is known to fit the layer."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fuzz import harness, mutators  # noqa: E402

import torch  # noqa: E402

with harness.instrumented(__name__ == "__main__"):
    from minisd.errors import MinisdError
    from minisd.lora import lora_components, match_lora, read_lora_file
    from minisd.models.clip import CLIPTextModel
    from minisd.models.unet import UNetModel

from fuzz.fuzz_safetensors import MICRO  # noqa: E402


@functools.cache
def components():
    torch.manual_seed(0)
    return lora_components(UNetModel(MICRO.unet), CLIPTextModel(MICRO.text))


def check(data: bytes) -> None:
    with harness.input_file(data, ".safetensors") as path:
        state = read_lora_file(path)
    lora = match_lora(state, components(), path=path)  # every layer's delta shape checked against its layer
    for target, layer, _ in lora.layers:  # then computed, as merging does: bounded by the layer's size
        layer.delta().reshape(target.shape())


def seeds() -> dict[str, bytes]:
    from safetensors.torch import save

    unet = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float16)

    return {
        "kohya": save({f"{unet}.lora_up.weight": r(4, 2), f"{unet}.lora_down.weight": r(2, 4),
                       f"{unet}.alpha": torch.tensor(1.0), f"{te}.lora_up.weight": r(4, 1),
                       f"{te}.lora_down.weight": r(1, 4)}),
        "conv-locon": save({"lora_unet_input_blocks_0_0.lora_up.weight": r(4, 1, 1, 1),
                            "lora_unet_input_blocks_0_0.lora_down.weight": r(1, 4, 3, 3)}),
        "loha": save({f"{unet}.hada_w1_a": r(4, 2), f"{unet}.hada_w1_b": r(2, 4), f"{unet}.hada_w2_a": r(4, 2),
                      f"{unet}.hada_w2_b": r(2, 4)}),
        "lokr": save({f"{unet}.lokr_w1": r(2, 2), f"{unet}.lokr_w2": r(2, 2)}),
        "diffusers": save({"unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_A.weight": r(2, 4),
                           "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_B.weight": r(4, 2)}),
    }


TARGET = harness.Target(
    name="lora", check=check, allowed=(MinisdError,), seeds=seeds, modules=("minisd/lora.py",),
    mutate=lambda data, max_size, seed: mutators.mutate_safetensors(data, max_size, seed, harness.byte_mutate),
    dictionary=[b'"lora_up.weight"', b'"lora_down.weight"', b'"alpha"', b'"hada_w1_a"', b'"lokr_w1"', b'lora_unet_',
                b'lora_te_', b'"shape"', b'"F16"'])

if __name__ == "__main__":
    harness.main(TARGET)
