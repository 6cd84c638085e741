"""Linear layer with fast paths for small CPU batches: GGUF Q4_1/Q8_0 weights read directly, or
MKL's packed GEMM.

Decode steps multiply a handful of rows by every weight matrix, which leaves a plain sgemm far below
memory bandwidth. Two remedies, both float32 arithmetic on the same weight values:

- When the checkpoint stored the matrix as Q4_1 or Q8_0 (the default SmolLM2 GGUF: Q4_1 layers, a
  Q8_0 embedding that is also the output projection), the fused CPU kernel expands the blocks in
  registers as it multiplies (pagedserve/kernels/quant_linear.cpp), reading a sixth (a quarter) of
  the bytes. Over SmolLM2's layer matrices against MKL's packed GEMM: 1 row 6.5 vs 19 ms, 16 rows 16
  vs 30 ms, 48 rows 35 vs 42 ms, 128 rows 81 vs 86 ms; against F.linear at 192 rows 148 vs 162 ms, 256
  rows 194 vs 200, 384 rows 279 vs 268 (so it stops at 256). Such a layer keeps no packed copy.
- Otherwise MKL's packed GEMM (the one PyTorch's inductor uses for frozen CPU graphs), faster than
  F.linear from 4 up to ~128 rows when packed for 64-row batches (16 rows 36 vs 51 ms, 64 rows 62 vs
  90 ms, 128 rows 112 vs 129 ms), at the cost of a second copy of the weight.

Larger prefill chunks take F.linear.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ROWS = range(4, 129)
PACK_FOR_ROWS = 64  # MKL's packing is tuned for one batch size; 64 serves 16–128 rows well
QUANT_MAX_ROWS = 256  # measured no slower than MKL (packed up to 128 rows, F.linear above) up to here


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def quantized_matmul_enabled() -> bool:
    """PAGEDSERVE_QUANT_MATMUL=0 keeps the float32 GEMMs even for quantized checkpoints (A/B runs)."""
    return os.environ.get("PAGEDSERVE_QUANT_MATMUL", "1") != "0"


class Linear(nn.Linear):
    packed: torch.Tensor | None = None
    # The checkpoint's raw rows (format, uint8 [out_features, in_features / 32 * block bytes]) when it
    # stored this matrix quantized; kept until prepare_cpu_paths decides whether the kernel uses them.
    quant_raw: tuple[str, torch.Tensor] | None = None
    quant: tuple[torch.Tensor, torch.Tensor, torch.Tensor, str] | None = None
    fused_linear: Any = None  # the compiled kernels' FusedLinear over the same weights, when they are built

    def prepare_cpu_paths(self, ops: ModuleType | None) -> None:
        """Set up the fast path that applies to float32 weights on CPU: the quantized kernel when the
        weights came quantized and the compiled kernels have it, else MKL's packed copy (costs the
        weight's size again in memory)."""
        raw, self.quant_raw = self.quant_raw, None
        if self.weight.device.type != "cpu" or self.weight.dtype != torch.float32:
            return
        out_features, in_features = self.weight.shape  # not self.in_features: a tied head borrows its weight
        if (raw is not None and ops is not None and quantized_matmul_enabled()
                and ops.quant_linear_simd() and out_features % 32 == 0 and in_features % 32 == 0):
            codes, scale, minimum = ops.quant_pack(raw[1], in_features, raw[0])
            self.quant = (codes, scale, minimum, raw[0])
        elif mkl_packing_available():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), PACK_FOR_ROWS)
        if ops is not None:  # the same choice of path, made in C++ (decoder_stack.cpp), fewer µs per call
            self.fused_linear = ops.FusedLinear(
                self.weight.detach(), None if self.bias is None else self.bias.detach(), self.quant,
                QUANT_MAX_ROWS, self.packed, PACKED_ROWS.start, PACKED_ROWS.stop - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_linear is not None:
            return self.fused_linear(x)
        if self.packed is not None and x.dim() == 2 and x.shape[0] in PACKED_ROWS:  # without the kernels
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, x.shape[0])
        return F.linear(x, self.weight, self.bias)
