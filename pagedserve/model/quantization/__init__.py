"""How a linear layer multiplies: one method object per layer (plain float weights, or the
checkpoint's GGUF blocks read by the fused kernel; int8 plugs in here as another method).

Every method has `apply(layer, x)`, and `fused`: the compiled kernels' FusedLinear over the same
weights when they are built (the C++ decoder stack calls it directly).
"""

from __future__ import annotations

from types import ModuleType

import torch

from pagedserve.model.quantization.gguf_blocks import GGUFBlockLinearMethod
from pagedserve.model.quantization.unquantized import UnquantizedLinearMethod, row_invariant_linear

LinearMethod = UnquantizedLinearMethod | GGUFBlockLinearMethod


def create_linear_method(weight: torch.Tensor, bias: torch.Tensor | None, raw: tuple[str, torch.Tensor] | None,
                         ops: ModuleType | None, use_quantized_matmul: bool) -> LinearMethod:
    """The method for float32 CPU weights: the block kernel when the checkpoint stored the matrix as
    blocks the kernel reads and it is enabled, else plain float32 (row-invariant F.linear)."""
    out_features, in_features = weight.shape  # not the layer's in_features: a tied head borrows its weight
    plain_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
    if (plain_cpu and raw is not None and ops is not None and use_quantized_matmul
            and ops.quant_linear_simd() and out_features % 32 == 0 and in_features % 32 == 0):
        return GGUFBlockLinearMethod.create(weight, bias, raw, ops)
    fused = None
    if plain_cpu and ops is not None:
        packed = None
        if ops.quant_linear_simd() and out_features % 32 == 0:  # one summation order at every M
            packed = (ops.f32_pack(weight.detach()), torch.empty(0), torch.empty(0), "F32")
        fused = ops.FusedLinear(weight.detach(), None if bias is None else bias.detach(), packed)
    return UnquantizedLinearMethod(fused)


__all__ = ["LinearMethod", "UnquantizedLinearMethod", "GGUFBlockLinearMethod", "create_linear_method",
           "row_invariant_linear"]
