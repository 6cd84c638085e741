"""The checkpoint's GGUF Q4_1 / Q8_0 blocks, read directly by the fused CPU kernel.

Decode steps multiply a handful of rows by every weight matrix, which leaves a float32 GEMM far
below memory bandwidth. When the checkpoint stored the matrix as Q4_1 or Q8_0 (the default SmolLM2
GGUF: Q4_1 layers, a Q8_0 embedding that is also the output projection), the kernel expands the
blocks in registers as it multiplies (pagedserve/kernels/quant_linear.cpp), to the same float32
values gguf's dequantization gives, reading a sixth (a quarter) of the bytes. It serves every row
count, prefill chunks included: on these CPUs it is no slower than MKL's sgemm at any M, and each
row's sums run in one order whatever M is, so a row's output never depends on the batch (docs/machine.md).
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

    @classmethod
    def create(cls, weight: torch.Tensor, bias: torch.Tensor | None, raw: tuple[str, torch.Tensor],
               ops: ModuleType) -> GGUFBlockLinearMethod:
        fmt, rows = raw
        codes, scale, minimum = ops.quant_pack(rows, weight.shape[1], fmt)
        quant = (codes, scale, minimum, fmt)
        fused = ops.FusedLinear(weight.detach(), None if bias is None else bias.detach(), quant)
        return cls(quant, fused)

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)
