"""Paged attention with the fused CPU kernels (float32 on CPU; see pagedserve/kernels).

The cache may be float32, float16 or bfloat16 (kv_cache_dtype): the kernels round K/V to it as they
write them and widen them back to float32 as they read them; everything else stays float32.

K/V writes and attention read the cache in place through each request's block table, so no padded
copy of the batch's context is gathered per layer. The K cache keeps each block transposed,
[head_dim, block_size], so one block's scores are head_dim SIMD multiply-adds across its slots.
Decode tokens and prefill segments (whole prompts, or chunks after a cached prefix) each take one
kernel call per layer; the segments' positions and block tables are packed once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from pagedserve.attention.backends.block_copy import copy_blocks_along
from pagedserve.attention.metadata import (
    CommonAttentionMetadata,
    DecodePrefillMetadata,
    decodes_first,
    split_decode_prefill,
)


@dataclass
class CpuAttentionMetadata(DecodePrefillMetadata):
    prefill_info: torch.Tensor | None = None  # [S, 3] int64: (start, length, context_len) per segment
    prefill_tables: torch.Tensor | None = None  # [S, max_blocks] int64, padded with block 0

    @classmethod
    def build(cls, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        """The split, with the prefill segments packed for the kernel once per step (not per layer)."""
        meta = cls(**vars(split_decode_prefill(common)))
        if meta.prefills:
            width = max(len(seg.block_table) for seg in meta.prefills)
            meta.prefill_info = torch.tensor([(seg.start, seg.length, seg.context_len) for seg in meta.prefills],
                                             dtype=torch.long)
            meta.prefill_tables = torch.stack([F.pad(seg.block_table, (0, width - len(seg.block_table)))
                                               for seg in meta.prefills])
        return meta

    def stack_args(self) -> tuple:
        """The attention operands of the C++ decoder stack (decoder_stack.cpp), in its order."""
        return (self.slot_mapping, self.num_decode_tokens, self.decode_block_tables, self.decode_context_lens,
                self.prefill_info, self.prefill_tables)


class CpuPagedAttention:
    name = "cpu_fused"

    def __init__(self, ops: ModuleType) -> None:
        self.ops = ops

    def reorder_batch(self, query_lens: list[int]) -> list[int]:
        return decodes_first(query_lens)

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        return CpuAttentionMetadata.build(common)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                          dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.empty((kv_heads, num_blocks, head_dim, block_size), dtype=dtype, device=device)
        v = torch.empty((kv_heads, num_blocks, block_size, head_dim), dtype=dtype, device=device)
        for cache in (k, v):  # advise before the first touch (zero_) so the pages start out huge
            self.ops.advise_huge_pages(cache)
            cache.zero_()
        return k, v

    def copy_blocks(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]]) -> None:
        copy_blocks_along(kv_caches, copies, block_dim=1)  # blocks are dim 1 of both caches

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: CpuAttentionMetadata, scale: float) -> torch.Tensor:
        self.ops.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = meta.num_decode_tokens
        if nd:
            self.ops.paged_decode_attention(out, q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                            meta.decode_context_lens, scale)
        if meta.prefills:
            self.ops.paged_prefill_attention(out, q, k_cache, v_cache, meta.prefill_info, meta.prefill_tables,
                                             scale)
        return out
