"""Paged attention in plain PyTorch: any dtype, any device (the reference backend).

The cache may hold another dtype than the model's (kv_cache_dtype): K/V are rounded to it as they are
written, and the attention reads them back converted to the model's dtype, so its arithmetic is the
model's whatever the cache holds (the fused CPU kernels do the same).

Cache layout per layer: [kv_heads, num_blocks, block_size, head_dim]. Gathering a batch's blocks
through its block tables (`cache[:, tables]`) then yields [kv_heads, B, L, head_dim] contiguous, which
feeds batched matmuls directly (no transpose copies). New K/V are written at their slots first, so
every read below sees this step's tokens too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedserve.attention.backends.head_major import HeadMajorCache
from pagedserve.attention.metadata import (
    CommonAttentionMetadata,
    DecodePrefillMetadata,
    split_decode_prefill,
)


@dataclass
class TorchAttentionMetadata(DecodePrefillMetadata):
    # [kv_heads * B * max_blocks]: row (head, block) of the cache viewed as [kv_heads * num_blocks, ...]
    decode_gather_index: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None  # [1, B, 1, max_blocks * block_size]; True = padding, masked out

    @classmethod
    def build(cls, common: CommonAttentionMetadata, kv_heads: int, num_blocks: int) -> TorchAttentionMetadata:
        """Once per step: the split, then the decode gather index and padding mask from the block tables."""
        meta = cls(**vars(split_decode_prefill(common)))
        if meta.num_decode_tokens:
            tables, lens = meta.decode_block_tables, meta.decode_context_lens
            span = torch.arange(tables.shape[1] * common.block_size, device=tables.device)
            meta.decode_mask = (span.unsqueeze(0) >= lens.unsqueeze(1)).view(1, len(lens), 1, -1)
            heads = torch.arange(kv_heads, device=tables.device).view(-1, 1) * num_blocks
            meta.decode_gather_index = (heads + tables.view(1, -1)).view(-1)
        return meta


class TorchPagedAttention(HeadMajorCache):
    """The backend object a model layer calls; it also owns the cache layout and builds the per-step
    metadata only it needs."""

    name = "torch"

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        assert self._cache_shape is not None, "allocate_kv_cache first"
        kv_heads, num_blocks = self._cache_shape[:2]
        return TorchAttentionMetadata.build(common, kv_heads, num_blocks)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: TorchAttentionMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, k_cache, v_cache, meta, scale)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k: [T, kv_heads, head_dim] → the slots (block * block_size + offset) of every head."""
    kv_heads, head_dim = k_cache.shape[0], k_cache.shape[-1]
    k_cache.view(kv_heads, -1, head_dim).index_copy_(1, slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.view(kv_heads, -1, head_dim).index_copy_(1, slot_mapping, v.transpose(0, 1).to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[kv_heads, length, head_dim] of one request, read through its block table (in the cache's dtype)."""
    return cache[:, block_table].flatten(1, 2)[:, :length]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: TorchAttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] (this step's new tokens) → [T, heads, head_dim]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    if meta.num_decode_tokens:
        decode_attention(out, q, k_cache, v_cache, meta, scale)
    prefill_attention(out, q, k, v, k_cache, v_cache, meta, scale)
    return out


def decode_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: TorchAttentionMetadata, scale: float) -> None:
    """The first num_decode_tokens rows: one query per request against its whole cached context."""
    nd, num_heads, head_dim = meta.num_decode_tokens, q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[0]
    group = num_heads // kv_heads
    # index_select on the (head, block) axis is the fastest contiguous gather in plain torch.
    shape = (kv_heads, nd, -1, head_dim)
    keys = k_cache.flatten(0, 1).index_select(0, meta.decode_gather_index).view(shape).to(q.dtype)  # [kvh, B, L, d]
    values = v_cache.flatten(0, 1).index_select(0, meta.decode_gather_index).view(shape).to(q.dtype)
    # Query heads are grouped by the KV head they share (as HF's repeat_kv orders them).
    queries = q[:nd].view(nd, kv_heads, group, head_dim).transpose(0, 1)  # [kvh, B, group, d]
    scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale)  # [kvh, B, group, L]
    scores.masked_fill_(meta.decode_mask, float("-inf"))  # slots past each context length
    probs = torch.softmax(scores, dim=-1)
    out[:nd] = torch.matmul(probs, values).transpose(0, 1).reshape(nd, num_heads, head_dim)


def prefill_attention(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, meta: TorchAttentionMetadata, scale: float) -> None:
    """Each prefill segment: causal attention over its new tokens and, for a later chunk, the cached prefix."""
    group = q.shape[1] // k.shape[1]
    for seg in meta.prefills:
        sl = slice(seg.start, seg.start + seg.length)
        qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, heads, Lq, d]
        if seg.context_len == seg.length:  # whole prompt in this step: keys are the new tokens, as cached
            ks, vs = k[sl].transpose(0, 1), v[sl].transpose(0, 1)
            if k_cache.dtype != q.dtype:  # the cache's rounding, so a prompt sees what later chunks will
                ks, vs = ks.to(k_cache.dtype).to(q.dtype), vs.to(v_cache.dtype).to(q.dtype)
            mask, causal = None, True
        else:  # a later chunk: attend to the cached prefix plus this chunk, causally
            ks = gather_context(k_cache, seg.block_table, seg.context_len).to(q.dtype)
            vs = gather_context(v_cache, seg.block_table, seg.context_len).to(q.dtype)
            rows = torch.arange(seg.length, device=q.device).unsqueeze(1) + (seg.context_len - seg.length)
            mask, causal = torch.arange(seg.context_len, device=q.device).unsqueeze(0) <= rows, False
        ks, vs = ks.unsqueeze(0), vs.unsqueeze(0)
        if group > 1:
            ks = ks.repeat_interleave(group, dim=1)
            vs = vs.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale)
        out[sl] = o.squeeze(0).transpose(0, 1)
