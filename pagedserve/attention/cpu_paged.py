"""Paged attention with the fused CPU kernels (float32 on CPU; see pagedserve/kernels).

K/V writes and attention read the cache in place through each request's block table, so no padded
copy of the batch's context is gathered per layer. The K cache keeps each block transposed,
[head_dim, block_size], so one block's scores are head_dim SIMD multiply-adds across its slots.
Decode tokens and prefill segments (whole prompts, or chunks after a cached prefix) each take one
kernel call per layer; the segments' positions and block tables are packed once per step.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from pagedserve.attention.metadata import AttentionMetadata


class CpuPagedAttention:
    def __init__(self, ops: ModuleType) -> None:
        self.ops = ops

    def prepare_step(self, meta: AttentionMetadata, k_cache: torch.Tensor) -> None:
        """Pack the prefill segments for the kernel: (start, length, context length) and block tables."""
        if not meta.prefills:
            return
        width = max(len(seg.block_table) for seg in meta.prefills)
        meta.prefill_info = torch.tensor([(seg.start, seg.length, seg.context_len) for seg in meta.prefills],
                                         dtype=torch.long)
        meta.prefill_tables = torch.stack([F.pad(seg.block_table, (0, width - len(seg.block_table)))
                                           for seg in meta.prefills])

    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                          dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.empty((kv_heads, num_blocks, head_dim, block_size), dtype=dtype, device=device)
        v = torch.empty((kv_heads, num_blocks, block_size, head_dim), dtype=dtype, device=device)
        for cache in (k, v):  # advise before the first touch (zero_) so the pages start out huge
            self.ops.advise_huge_pages(cache)
            cache.zero_()
        return k, v

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
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
