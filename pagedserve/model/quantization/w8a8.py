"""quantization="w8a8": int8 weights (one symmetric scale per output feature, as "int8") times int8
activations (one symmetric scale per block of 32 inputs, computed on the fly, as llama.cpp's Q8_0
activations), in integer arithmetic. A scale per token, the coarser choice, cost SmolLM2 several
percent of perplexity: a few large activations set every block's step (docs/quantization.md).

This is how llama.cpp gets its CPU speed: a VNNI instruction multiplies and adds 64 byte pairs where
a float32 FMA does 16. The integer sums are exact, so the kernel and `w8a8_reference` (the PyTorch
path, and the tests' oracle) give the same bits. Greedy output is close to float32's, not equal to
it: quantizing the activations rounds them, so it is opt-in.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pagedserve.model.quantization.int8 import PerChannelInt8Method

ACT_BLOCK = 32  # inputs per activation scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, K] -> (int8 codes [M, K], float32 scales [M, K / 32]) with the kernel's float
    operations, per block of 32 inputs: codes = round-to-nearest-even(x * (127 / max|x|)),
    scale = max|x| / 127."""
    m, k = x.shape
    blocks = x.reshape(m, k // ACT_BLOCK, ACT_BLOCK)
    amax = blocks.abs().amax(dim=2)
    # a true division (`127.0 / t` is 127 * (1 / t) in torch: another rounding, another code at ties)
    inv = torch.full_like(amax, 127.0).div(torch.where(amax > 0, amax, torch.ones_like(amax)))
    inv = torch.where(amax > 0, inv, torch.zeros_like(amax))
    return torch.round(blocks * inv.unsqueeze(2)).to(torch.int8).reshape(m, k), amax / 127.0


def w8a8_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The W8A8 product in PyTorch, the kernel's arithmetic: per block of 32 inputs the exact integer
    dot products (float64 holds them exactly), as float32 times the row's block scale, added block by
    block (multiply, then add), then times the feature's scale."""
    xq, sx = quantize_rows(x.float())
    m, k = xq.shape
    nb = k // ACT_BLOCK
    sums = torch.einsum("mbk,nbk->bmn", xq.double().view(m, nb, ACT_BLOCK),
                        codes.double().view(-1, nb, ACT_BLOCK)).float()
    acc = torch.zeros(m, codes.shape[0])
    for b in range(nb):
        acc = acc + sums[b] * sx[:, b:b + 1]
    return acc * scale.unsqueeze(0)


class W8A8LinearMethod(PerChannelInt8Method):
    in_multiple = ACT_BLOCK

    @classmethod
    def pack(cls, ops: ModuleType, codes: torch.Tensor, scale: torch.Tensor) -> tuple:
        packed, scales = ops.w8a8_pack(codes, scale)
        return (packed, scales, torch.empty(0), "W8A8")

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        out = w8a8_reference(x, self.codes, self.scale).to(x.dtype)
        return out if layer.bias is None else out + layer.bias
