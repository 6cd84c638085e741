"""Plain weights: F.linear, or for small CPU batches MKL's packed GEMM (the one PyTorch's inductor
uses for frozen CPU graphs), faster than F.linear from a few rows up to ~128 when packed for 64-row
batches, at the cost of a second copy of the weight (docs/machine.md has the measurements)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ROWS = range(4, 129)
PACK_FOR_ROWS = 64  # MKL's packing is tuned for one batch size; 64 serves 16–128 rows well


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class UnquantizedLinearMethod:
    quant = None  # no quantized blocks

    def __init__(self, packed: torch.Tensor | None = None, fused: Any = None) -> None:
        self.packed = packed
        self.fused = fused

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        if self.packed is not None and x.dim() == 2 and x.shape[0] in PACKED_ROWS:  # without the kernels
            return torch.ops.mkl._mkl_linear(x, self.packed, layer.weight, layer.bias, x.shape[0])
        return F.linear(x, layer.weight, layer.bias)
