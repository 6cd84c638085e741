"""The checkpoint's GGUF Q4_1 / Q8_0 blocks, read directly by the fused CPU kernel.

Decode steps multiply a handful of rows by every weight matrix, which leaves a float32 GEMM far
below memory bandwidth. When the checkpoint stored the matrix as Q4_1 or Q8_0 (the default SmolLM2
GGUF: Q4_1 layers, a Q8_0 embedding that is also the output projection), the kernel expands the
blocks in registers as it multiplies (pagedserve/kernels/quant_linear.cpp), to the same float32
values gguf's dequantization gives, reading a sixth (a quarter) of the bytes. It beats MKL up to a
few hundred rows (the cut-off is QUANT_MAX_ROWS; docs/machine.md has the measurements); larger
prefill chunks take F.linear on the float32 copy. Such a layer keeps no packed copy.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn


class GGUFBlockLinearMethod:
    def __init__(self, quant: tuple[torch.Tensor, torch.Tensor, torch.Tensor, str], fused: Any) -> None:
        self.quant = quant  # (codes, scales, minimums, format) in the kernel's packed layout
        self.fused = fused
        self.packed = None

    @classmethod
    def create(cls, weight: torch.Tensor, bias: torch.Tensor | None, raw: tuple[str, torch.Tensor],
               ops: ModuleType, max_rows: int) -> GGUFBlockLinearMethod:
        fmt, rows = raw
        codes, scale, minimum = ops.quant_pack(rows, weight.shape[1], fmt)
        quant = (codes, scale, minimum, fmt)
        fused = ops.FusedLinear(weight.detach(), None if bias is None else bias.detach(), quant, max_rows,
                                None, 0, -1)
        return cls(quant, fused)

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)
