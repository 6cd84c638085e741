"""How a linear layer multiplies: one method object per layer.

    UnquantizedLinearMethod  float weights (float32 panels in the fused kernel, or F.linear)
    GGUFBlockLinearMethod    the checkpoint's GGUF blocks, expanded in registers (gguf_blocks.py)
    Int8LinearMethod         quantization="int8": int8 weights, float32 activations (int8.py)
    W8A8LinearMethod         quantization="w8a8": int8 weights x int8 activations (w8a8.py)

Every method has `apply(layer, x)`, `fused` (the compiled kernels' FusedLinear when they are built:
the C++ decoder stack calls it directly), `quant` (its packed tensors, or None) and
`keeps_float_weight` (whether the layer's float32 weight is still read) and `nbytes` (the weight
bytes it holds beyond the layer's parameters).
"""

from __future__ import annotations

from types import ModuleType

import torch

from pagedserve.config import QUANTIZATION_METHODS
from pagedserve.model.quantization.gguf_blocks import FAST_TYPES, BlockCodes, GGUFBlockLinearMethod
from pagedserve.model.quantization.int8 import Int8LinearMethod
from pagedserve.model.quantization.unquantized import (
    UnquantizedLinearMethod,
    row_invariant_linear,
    tensor_bytes,
)
from pagedserve.model.quantization.w8a8 import W8A8LinearMethod

LinearMethod = UnquantizedLinearMethod | GGUFBlockLinearMethod | Int8LinearMethod | W8A8LinearMethod


def create_linear_method(weight: torch.Tensor, bias: torch.Tensor | None, blocks: BlockCodes | None,
                         ops: ModuleType | None, use_quantized_matmul: bool,
                         quantization: str | None = None) -> LinearMethod:
    """The method for a float32 CPU layer: int8 or w8a8 when asked for; else the kernel on the
    checkpoint's GGUF blocks when it stored them and the kernel is enabled; else plain float32."""
    out_features, in_features = weight.shape  # not the layer's in_features: a tied head borrows its weight
    plain_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
    if quantization == "int8":
        return Int8LinearMethod.create(weight, bias, ops)
    if quantization == "w8a8":
        return W8A8LinearMethod.create(weight, bias, ops)
    if plain_cpu and blocks is not None and ops is not None and use_quantized_matmul and out_features % 32 == 0:
        return GGUFBlockLinearMethod.create(bias, blocks, ops)
    fused = packed = None
    if plain_cpu and ops is not None:
        if ops.simd_level() != "generic" and out_features % 32 == 0:  # one summation order at every M
            packed = (ops.f32_pack(weight.detach()), torch.empty(0), torch.empty(0), "F32")
        fused = ops.FusedLinear(weight.detach() if packed is None else torch.empty(0),
                                None if bias is None else bias.detach(), packed)
    return UnquantizedLinearMethod(fused, None if packed is None else packed[0])


__all__ = ["FAST_TYPES", "QUANTIZATION_METHODS", "BlockCodes", "GGUFBlockLinearMethod", "Int8LinearMethod",
           "LinearMethod", "UnquantizedLinearMethod", "W8A8LinearMethod", "create_linear_method",
           "row_invariant_linear", "tensor_bytes"]
