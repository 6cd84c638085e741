"""A GGUF checkpoint's quantized blocks, read directly by the fused CPU kernel.

Decode steps multiply a handful of rows by every weight matrix, which leaves a float32 GEMM far
below memory bandwidth. When the checkpoint stored a matrix in one of FAST_TYPES, the loader keeps
its blocks as codes and per-block scales (and minimums), and the kernel expands them in registers as
it multiplies (pagedserve/kernels/quant_linear.cpp) to the same float32 values gguf's dequantization
gives: the products are transformers' on the same weights. Each GGUF type maps onto one of the
kernel's layouts by the form of its dequantization:

    scale * q + min, 4-bit q, 32 per scale   U4_32M   Q4_1, Q4_K (min = -(dmin * m))
    scale * q + min, 5-bit q, 32 per scale   U8_32M   Q5_1, Q5_K
    scale * q, signed q, 32 per scale        I8_32    Q8_0, Q4_0 (q - 8), Q5_0 (q - 16)
    scale * q, signed q, 16 per scale        I8_16    Q6_K (q - 32)

A K-quant's sub-block scale is gguf's own float32 product d * sc, so no value changes. Every other
type gguf can dequantize (Q2_K, Q3_K, IQ*, ...) loads as float32 weights on the float path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from pagedserve.model.quantization.unquantized import tensor_bytes

QK_K = 256
FAST_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class BlockCodes:
    """One matrix's blocks as the kernel's layout takes them: a code per weight, scales per block."""

    source: str  # the GGUF type(s) it came from, e.g. "Q4_K"
    layout: str  # a quant_linear.cpp layout
    codes: torch.Tensor  # [N, K] uint8 or int8
    scales: torch.Tensor  # [N, K / block] float32
    mins: torch.Tensor | None  # [N, K / block] float32, for the layouts with a minimum

    def dequantize(self) -> torch.Tensor:
        """The float32 weights [N, K], with the kernel's (and gguf's) operations: scale * q (+ min)."""
        n, k = self.codes.shape
        block = k // self.scales.shape[1]
        w = self.codes.float().view(n, -1, block) * self.scales.unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.unsqueeze(-1)
        return w.view(n, k)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Bytes [n, c * width] -> codes [n, 2c, width]: each group's low nibbles, then its high ones."""
    q = qs.reshape(qs.shape[0], -1, 1, width) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(qs.shape[0], -1, width)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 12 packed bytes of 6-bit scales and minimums -> 8 of each (gguf's order)."""
    s = scales.reshape(scales.shape[0], 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _five_bit_high(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: the 32 high bits of a block (one uint32) -> [n, 32] uint8."""
    bits = qh.view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
    return (bits & np.uint32(1)).astype(np.uint8)


def _decode(qtype: str, b: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
    """Blocks [n, block bytes] -> (layout, codes [n, elems], scales [n, elems / sub], mins | None)."""
    n = b.shape[0]
    if qtype == "Q8_0":
        return "I8_32", b[:, 2:].view(np.int8), _f16(b[:, :2]), None
    if qtype == "Q4_0":
        return "I8_32", _nibbles(b[:, 2:], 16).reshape(n, 32).astype(np.int8) - np.int8(8), _f16(b[:, :2]), None
    if qtype == "Q4_1":
        return "U4_32M", _nibbles(b[:, 4:], 16).reshape(n, 32), _f16(b[:, :2]), _f16(b[:, 2:4])
    if qtype in ("Q5_0", "Q5_1"):
        first = 2 if qtype == "Q5_0" else 4
        q = _nibbles(b[:, first + 4:], 16).reshape(n, 32) | (_five_bit_high(b[:, first:first + 4].copy()) << 4)
        if qtype == "Q5_0":
            return "I8_32", q.astype(np.int8) - np.int8(16), _f16(b[:, :2]), None
        return "U8_32M", q, _f16(b[:, :2]), _f16(b[:, 2:4])
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        scales = d * sc.astype(np.float32)  # gguf's float32 products, then d * q - dm
        mins = -(dmin * mn.astype(np.float32))
        if qtype == "Q4_K":
            return "U4_32M", _nibbles(b[:, 16:], 32).reshape(n, QK_K), scales, mins
        high = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = _nibbles(b[:, 48:], 32) | ((high & np.uint8(1)) << np.uint8(4))
        return "U8_32M", q.reshape(n, QK_K), scales, mins
    if qtype == "Q6_K":
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
        low = _nibbles(ql, 64).reshape(n, -1, 32)
        high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        q = (low | (high.reshape(n, -1, 32) << np.uint8(4))).astype(np.int8) - np.int8(32)
        return "I8_16", q.reshape(n, QK_K), d * sc.astype(np.float32), None
    raise ValueError(f"GGUF type {qtype} has no fast path; fast types: {FAST_TYPES}")


def decode_rows(qtype: str, rows: np.ndarray, in_features: int) -> BlockCodes:
    """Raw GGUF rows [N, bytes] (uint8, llama.cpp's block layout) -> the kernel's codes and scales."""
    import gguf

    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    out_features = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1, block_bytes)
    if in_features % block_elems or blocks.shape[0] != out_features * in_features // block_elems:
        raise ValueError(f"GGUF {qtype} rows of {in_features} inputs do not fill whole {block_elems}-weight blocks")
    layout, codes, scales, mins = _decode(qtype, blocks)

    def tensor(a: np.ndarray, cols: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).reshape(out_features, cols))

    sub = codes.shape[1] // scales.shape[1]
    return BlockCodes(qtype, layout, tensor(codes, in_features), tensor(scales, in_features // sub),
                      None if mins is None else tensor(mins, in_features // sub))


def concat_blocks(parts: Sequence[BlockCodes]) -> BlockCodes | None:
    """Fused projections (q/k/v, gate/up) stack their parts' rows; parts in different layouts have no
    common one (the fused matrix then takes the float path)."""
    first = parts[0]
    if any(p.layout != first.layout or p.scales.shape[1] != first.scales.shape[1] for p in parts):
        return None
    return BlockCodes("+".join(dict.fromkeys(p.source for p in parts)), first.layout,
                      torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                      None if first.mins is None else torch.cat([p.mins for p in parts]))


class BlockEmbedding(nn.Module):
    """Token lookups from an embedding's GGUF blocks (a tied output projection's): each looked-up row
    is dequantized with gguf's operations, so the rows equal the full float32 table's."""

    def __init__(self, blocks: BlockCodes) -> None:
        super().__init__()
        self.source, self.layout = blocks.source, blocks.layout
        self.register_buffer("codes", blocks.codes, persistent=False)
        self.register_buffer("scales", blocks.scales, persistent=False)
        self.register_buffer("mins", blocks.mins, persistent=False)
        self.embedding_dim = blocks.codes.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = BlockCodes(self.source, self.layout, self.codes[ids], self.scales[ids],
                          None if self.mins is None else self.mins[ids])
        return rows.dequantize()


class GGUFBlockLinearMethod:
    keeps_float_weight = False

    def __init__(self, quant: tuple[torch.Tensor, torch.Tensor, torch.Tensor, str], fused: Any, source: str) -> None:
        self.quant = quant  # (codes, scales, minimums, layout) in the kernel's packed layout
        self.fused = fused
        self.source = source  # the GGUF type(s)

    @classmethod
    def create(cls, bias: torch.Tensor | None, blocks: BlockCodes, ops: ModuleType) -> GGUFBlockLinearMethod:
        mins = blocks.mins if blocks.mins is not None else torch.empty(0)
        codes, scale, minimum = ops.pack_panels(blocks.codes, blocks.scales, mins, blocks.layout)
        quant = (codes, scale, minimum, blocks.layout)
        fused = ops.FusedLinear(torch.empty(0), None if bias is None else bias.detach(), quant)
        return cls(quant, fused, blocks.source)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(*self.quant[:3])

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)
