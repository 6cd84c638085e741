"""Plain weights: F.linear, with small batches padded so that a row's result never depends on how
many rows the step carries.

MKL's sgemm computes each row with the same sums for M = 4, 8 and every M >= 12; other small M take
kernels that add in another order, which would make a token's logits depend on the batch (and a
prefix-cache hit, which changes the rows of a prefill, change them). Padding those M to the next
multiple of 4 costs at most three zero rows. tests/kernels/test_row_invariance.py checks the rule on
this machine's MKL. The fused kernels' FusedLinear applies the same rule in C++ (decoder_stack.cpp).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INVARIANT_MIN_ROWS = 12


def row_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0] if x.dim() == 2 else 0
    if rows == 0 or rows >= INVARIANT_MIN_ROWS or rows % 4 == 0 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    padded = x.new_zeros((rows + 3) // 4 * 4, x.shape[1])
    padded[:rows] = x
    return F.linear(padded, weight, bias)[:rows]


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the given tensors (None and empty ones count nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class UnquantizedLinearMethod:
    quant = None  # no quantized blocks

    def __init__(self, fused: Any = None, panels: torch.Tensor | None = None) -> None:
        self.fused = fused
        self.panels = panels  # the float32 weights in the kernel's panels, when it reads them
        self.keeps_float_weight = panels is None  # panels hold the same values in the kernel's order

    @property
    def nbytes(self) -> int:
        """Weight bytes this method holds beyond the layer's own parameters."""
        return tensor_bytes(self.panels)

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return row_invariant_linear(x, layer.weight, layer.bias)
