"""Linear layer whose multiply is one method object (pagedserve/model/quantization): plain float
weights, the checkpoint's GGUF blocks, int8, or int8 x int8. The layer holds the weights and, until
the model is prepared, the checkpoint's quantized blocks."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pagedserve.model.quantization import (
    BlockCodes,
    LinearMethod,
    UnquantizedLinearMethod,
    create_linear_method,
)

__all__ = ["Linear", "quantized_matmul_enabled"]


def quantized_matmul_enabled() -> bool:
    """The default of EngineConfig.quantized_matmul: PAGEDSERVE_QUANT_MATMUL=0 keeps the float32 GEMMs."""
    return os.environ.get("PAGEDSERVE_QUANT_MATMUL", "1") != "0"


class Linear(nn.Linear):
    # The checkpoint's blocks when it stored this matrix in a GGUF type the kernel reads; kept until
    # prepare_cpu_paths decides whether the kernel uses them.
    quant_blocks: BlockCodes | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quant_method: LinearMethod = UnquantizedLinearMethod()

    def prepare_cpu_paths(self, ops: ModuleType | None, use_quantized_matmul: bool | None = None,
                          quantization: str | None = None, owns_weight: bool = True) -> None:
        """Choose the method once the weights are final (loaded, cast, moved). When the method no
        longer reads the float weight and no other module shares it, its memory is released."""
        blocks, self.quant_blocks = self.quant_blocks, None
        self.out_features, self.in_features = self.weight.shape  # a tied head's are the embedding's
        if use_quantized_matmul is None:
            use_quantized_matmul = quantized_matmul_enabled()
        self.quant_method = create_linear_method(self.weight, self.bias, blocks, ops, use_quantized_matmul,
                                                 quantization)
        if owns_weight and not self.quant_method.keeps_float_weight:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    # What the method holds, for tests and tools that inspect a layer.
    @property
    def quant(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str] | None:
        return self.quant_method.quant

    @property
    def fused_linear(self) -> Any:
        return self.quant_method.fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)
