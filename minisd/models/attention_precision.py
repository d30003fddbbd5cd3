"""Attention in float32 where float16 attention could overflow: q·kᵀ of SD 2.1 (and of some fine-tunes) exceeds
float16's largest value, 65504, and inf − inf in the softmax turns the whole image into NaN (diffusers'
`upcast_attention`, A1111's "upcast cross attention layer to float32")."""
from __future__ import annotations

import torch

# Devices whose `F.scaled_dot_product_attention` forms q·kᵀ and the softmax in float32 for float16 inputs:
# torch's CPU kernels (flash and the math fallback) accumulate in float32 (tests/test_half_precision.py checks
# it on the installed torch), so an upcast there would only add two copies. CUDA's flash / memory-efficient /
# cuDNN kernels accumulate in float32 too, and its math fallback upcasts unless the user allowed reduced
# precision (`torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)`). Other devices (MPS, XPU, ...) get
# the explicit upcast.
SCORES_IN_FLOAT32 = {"cpu", "cuda"}


def float32_scores_guaranteed(device: torch.device) -> bool:
    """Whether float16 attention on `device` is already computed with float32 scores and softmax."""
    if device.type == "cuda" and torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed():
        return False
    return device.type in SCORES_IN_FLOAT32


def upcast_if_float16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for `F.scaled_dot_product_attention`: in float32 when they are float16 and the device's kernel
    might form the scores in float16 (exact: every float16 is a float32; the caller casts the output back).
    For every model, not only SD 2.x: the overflow comes from the weights (fine-tunes of any family can have it),
    and where the upcast is needed it costs only the attention's share of the step. bfloat16 has float32's
    exponent range (its scores cannot overflow) and float32 needs nothing: both pass through unchanged."""
    if q.dtype == torch.float16 and not float32_scores_guaranteed(q.device):
        return q.float(), k.float(), v.float()
    return q, k, v
