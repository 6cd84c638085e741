"""quantization="int8" (W8A16): weights quantized at load to int8, one symmetric scale per output
feature; activations and accumulation stay float32.

The kernel (quant_linear.cpp, layout I8_ROW) expands the int8 codes in registers and multiplies the
finished sums by the feature's scale, reading a quarter of float32's bytes. Without the kernel the
layer keeps the dequantized weights (codes * scale) on the float path, so the model is the same
int8 model either way.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from pagedserve.model.quantization.unquantized import tensor_bytes


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 codes [N, K], float32 scales [N]): scale = max|w| / 127 per row,
    codes = round-to-nearest-even(w / scale); an all-zero row gets scale 0."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = amax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return codes, scale


class PerChannelInt8Method:
    """What int8 and w8a8 share: weights quantized per output feature at load, packed for the kernel
    when it is built and the shape fits (`in_multiple`), else kept as codes for the PyTorch path."""

    keeps_float_weight = False
    in_multiple = 32  # in_features the kernel's layout needs a multiple of

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, fused: Any, quant: tuple | None) -> None:
        self.codes = None if fused is not None else codes  # the kernel holds its own packed copy
        self.scale = scale
        self.fused = fused
        self.quant = quant

    @classmethod
    def pack(cls, ops: ModuleType, codes: torch.Tensor, scale: torch.Tensor) -> tuple:
        """The kernel's (codes, scales, minimums, layout) for FusedLinear."""
        raise NotImplementedError

    @classmethod
    def create(cls, weight: torch.Tensor, bias: torch.Tensor | None, ops: ModuleType | None) -> PerChannelInt8Method:
        codes, scale = quantize_per_channel(weight)
        n, k = codes.shape
        if ops is None or n % 32 or k % cls.in_multiple:
            return cls(codes, scale, None, None)
        quant = cls.pack(ops, codes, scale)
        fused = ops.FusedLinear(torch.empty(0), None if bias is None else bias.detach(), quant)
        return cls(codes, scale, fused, quant)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.codes, self.scale, *(self.quant or ())[:3])


class Int8LinearMethod(PerChannelInt8Method):
    @classmethod
    def pack(cls, ops: ModuleType, codes: torch.Tensor, scale: torch.Tensor) -> tuple:
        packed, scales, _ = ops.pack_panels(codes, scale, torch.empty(0), "I8_ROW")
        return (packed, scales, torch.empty(0), "I8_ROW")

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * self.scale.unsqueeze(1)

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return torch.nn.functional.linear(x, self.dequantized().to(x.dtype), layer.bias)
