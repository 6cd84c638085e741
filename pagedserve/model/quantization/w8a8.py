"""quantization="w8a8": int8 weights (one symmetric scale per output feature, as "int8") times int8
activations (one symmetric scale per row, computed on the fly), in integer arithmetic.

This is how llama.cpp gets its CPU speed: a VNNI instruction multiplies and adds 64 byte pairs where
a float32 FMA does 16. The integer sums are exact, so the kernel and `w8a8_reference` (the PyTorch
path, and the tests' oracle) give the same bits. Greedy output is close to float32's, not equal to
it: quantizing the activations rounds them, so it is opt-in.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from pagedserve.model.quantization.int8 import quantize_per_channel


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, K] -> (int8 codes [M, K], float32 scales [M]) with the kernel's float operations:
    codes = round-to-nearest-even(x * (127 / max|x|)), scale = max|x| / 127."""
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    return torch.round(x * inv.unsqueeze(1)).to(torch.int8), amax / 127.0


def w8a8_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The W8A8 product in PyTorch: exact integer sums (float64 holds them exactly), then
    float32(sum) * row scale * feature scale, in that order."""
    xq, sx = quantize_rows(x.float())
    sums = (xq.double() @ codes.double().t()).float()
    return sums * sx.unsqueeze(1) * scale.unsqueeze(0)


class W8A8LinearMethod:
    keeps_float_weight = False

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, fused: Any, quant: tuple | None) -> None:
        self.codes = None if fused is not None else codes  # the kernel holds its own packed copy
        self.scale = scale
        self.fused = fused
        self.quant = quant

    @classmethod
    def create(cls, weight: torch.Tensor, bias: torch.Tensor | None, ops: ModuleType | None) -> W8A8LinearMethod:
        codes, scale = quantize_per_channel(weight)
        n, k = codes.shape
        if ops is None or n % 32 or k % 4:
            return cls(codes, scale, None, None)
        packed, scales, offsets = ops.w8a8_pack(codes, scale)
        quant = (packed, scales, offsets, "W8A8")
        fused = ops.FusedLinear(torch.empty(0), None if bias is None else bias.detach(), quant)
        return cls(codes, scale, fused, quant)

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        out = w8a8_reference(x, self.codes, self.scale).to(x.dtype)
        return out if layer.bias is None else out + layer.bias
