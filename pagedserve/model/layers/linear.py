"""Linear layer with an optional MKL packed-weight path for small CPU batches.

Decode steps multiply a handful of rows by every weight matrix, which leaves a plain sgemm far below
memory bandwidth. MKL's packed GEMM (the same one PyTorch's inductor uses for frozen CPU graphs)
was measured ~25% faster for 4–24 rows on this machine and slower for large batches, so it is used
only in that range; everything else takes F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ROWS = range(4, 25)


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class Linear(nn.Linear):
    packed: torch.Tensor | None = None

    def pack_for_cpu(self) -> None:
        """Keep an MKL-packed copy of the fp32 weight (costs the weight's size again in memory)."""
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32 and mkl_packing_available():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2 and x.shape[0] in PACKED_ROWS:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, x.shape[0])
        return F.linear(x, self.weight, self.bias)
