"""Paged attention in plain PyTorch (the CPU reference backend).

New K/V are written into the block pool at their slots; each request's context is read back
through its block table. Decodes are batched into one masked matmul; prefill segments use SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.attention.metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache: [num_blocks, block_size, kv_heads, head_dim]; k: [T, kv_heads, head_dim]."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, kv_heads, head_dim] of one request, read through its block table."""
    return cache[block_table].flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] (this step's new tokens)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    out = torch.empty_like(q)

    nd = meta.num_decode_tokens
    if nd:
        batch = nd
        # [B, max_blocks, block_size, kvh, d] → [B, kvh, L, d]; the mask hides padding slots.
        keys = k_cache[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
        values = v_cache[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
        queries = q[:nd].view(batch, kv_heads, group, head_dim)  # heads grouped by their KV head
        scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale)  # [B, kvh, group, L]
        scores.masked_fill_(meta.decode_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:nd] = torch.matmul(probs, values).view(batch, num_heads, head_dim)

    for seg in meta.prefills:
        sl = slice(seg.start, seg.start + seg.length)
        qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, heads, Lq, d]
        if seg.context_len == seg.length:  # whole prompt in this step: keys are the new tokens
            ks, vs, mask, causal = k[sl], v[sl], None, True
        else:  # a later chunk: attend to the cached prefix plus this chunk, causally
            ks = gather_context(k_cache, seg.block_table, seg.context_len)
            vs = gather_context(v_cache, seg.block_table, seg.context_len)
            offset = seg.context_len - seg.length
            rows = torch.arange(seg.length).unsqueeze(1) + offset
            mask, causal = torch.arange(seg.context_len).unsqueeze(0) <= rows, False
            mask = mask.to(q.device)
        ks = ks.transpose(0, 1).unsqueeze(0)
        vs = vs.transpose(0, 1).unsqueeze(0)
        if group > 1:
            ks = ks.repeat_interleave(group, dim=1)
            vs = vs.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale)
        out[sl] = o.squeeze(0).transpose(0, 1)
    return out
