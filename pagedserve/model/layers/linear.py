"""Linear layer whose multiply is one method object (pagedserve/model/quantization): plain float
weights, or the checkpoint's GGUF blocks read by the fused CPU kernel. The layer itself only holds
the weights and, until the model is prepared, the checkpoint's raw quantized rows."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pagedserve.model.quantization import LinearMethod, UnquantizedLinearMethod, create_linear_method

__all__ = ["Linear", "quantized_matmul_enabled"]


def quantized_matmul_enabled() -> bool:
    """The default of EngineConfig.quantized_matmul: PAGEDSERVE_QUANT_MATMUL=0 keeps the float32 GEMMs."""
    return os.environ.get("PAGEDSERVE_QUANT_MATMUL", "1") != "0"


class Linear(nn.Linear):
    # The checkpoint's raw rows (format, uint8 [out_features, in_features / 32 * block bytes]) when it
    # stored this matrix quantized; kept until prepare_cpu_paths decides whether the kernel uses them.
    quant_raw: tuple[str, torch.Tensor] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quant_method: LinearMethod = UnquantizedLinearMethod()

    def prepare_cpu_paths(self, ops: ModuleType | None, use_quantized_matmul: bool | None = None) -> None:
        """Choose the method once the weights are final (loaded, cast, moved)."""
        raw, self.quant_raw = self.quant_raw, None
        if use_quantized_matmul is None:
            use_quantized_matmul = quantized_matmul_enabled()
        self.quant_method = create_linear_method(self.weight, self.bias, raw, ops, use_quantized_matmul)

    # What the method holds, for tests and tools that inspect a layer.
    @property
    def quant(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str] | None:
        return self.quant_method.quant

    @property
    def fused_linear(self) -> Any:
        return self.quant_method.fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)
