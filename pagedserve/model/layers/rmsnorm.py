"""RMSNorm as in Llama (normalise in float32, scale in the model dtype), optionally fused with the
residual add that precedes it (vLLM's layout: each layer hands on (hidden, residual))."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    fused: ModuleType | None = None  # the CPU kernels, set by the model when they apply

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual). May reuse x's storage."""
        if residual is None:
            return self.fused.rms_norm(x, self.weight, self.eps) if self.fused is not None else self._norm(x)
        if self.fused is not None:
            self.fused.fused_add_rms_norm(x, residual, self.weight, self.eps)  # both updated in place
            return x, residual
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one call; bit-identical to the formula below on CPU
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
