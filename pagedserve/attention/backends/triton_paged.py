"""Paged attention in Triton, for CUDA (and, under TRITON_INTERPRET=1, on CPU for the tests).

The same cache layout as the PyTorch reference, per layer [kv_heads, num_blocks, block_size, head_dim],
and the same batch order (one-query requests first). Three kernels:

- `write_kv`: each new token's K/V to its slot (block * block_size + offset), rounded to the cache dtype.
- decode: programs per (request, KV head, split of the context) hold that head's whole query group, so
  each K/V row is read once for all the query heads that share it (GQA), with an online softmax; a
  second kernel merges the splits (split-K, so that batch 1 at a long context still fills the GPU).
- prefill: one program per (segment, tile of query rows, query head) reads its context through the
  block table (the new tokens included: they were written first), causal by position, so a later
  chunk after a cached prefix is the same kernel as a whole prompt.

Arithmetic is float32 whatever the model or cache dtype; the output is the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.attention.backends.head_major import HeadMajorCache
from pagedserve.attention.metadata import CommonAttentionMetadata, split_decode_prefill

PREFILL_TILE = 16  # query rows per prefill program
PREFILL_TOKENS = 32  # keys per inner step of a prefill program
DECODE_TOKENS = 64  # keys per inner step of a decode program
# Split-K: enough programs to fill a large GPU (132 SMs on an H100/H200) even at batch 1, and no split
# shorter than a few inner steps.
TARGET_PROGRAMS = 512
MIN_SPLIT_TOKENS = 256


def decode_splits(programs: int, max_len: int) -> tuple[int, int]:
    """(splits per request, tokens per split) for `programs` (request, KV head) pairs of contexts up to
    `max_len` tokens: contexts are cut so that the grid has about TARGET_PROGRAMS programs."""
    want = max(1, min(-(-TARGET_PROGRAMS // programs), -(-max_len // MIN_SPLIT_TOKENS)))
    tokens = -(-max_len // want)
    tokens = -(-tokens // DECODE_TOKENS) * DECODE_TOKENS  # whole inner steps
    return -(-max_len // tokens), tokens


@triton.jit
def _to_cache(x, dtype: tl.constexpr):
    """x in the cache's dtype, rounded to nearest even as torch's .to() rounds (the CPU backends write
    the same bits). bfloat16 is rounded by hand: Triton's interpreter truncates it."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr,
                     stride_kt, stride_kh, stride_ch, stride_cb, stride_cs,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_DIM
    src = t * stride_kt + h * stride_kh + d
    dst = h * stride_ch + block * stride_cb + offset * stride_cs + d
    k = tl.load(k_ptr + src, mask=dm)
    v = tl.load(v_ptr + src, mask=dm)
    tl.store(kc_ptr + dst, _to_cache(k, kc_ptr.dtype.element_ty), mask=dm)
    tl.store(vc_ptr + dst, _to_cache(v, vc_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, tables_ptr, lens_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr,
                         scale, stride_qt, stride_qh, stride_ch, stride_cb, stride_cs, stride_tb, split_tokens,
                         GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         TOK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DIRECT: tl.constexpr):
    """One split of one request's context for one KV head and its query group (split-K): the partial
    softmax state (max, sum, weighted values) goes to the part buffers; _decode_reduce_kernel merges.
    DIRECT (one split): the program owns the whole context and writes the output itself."""
    b = tl.program_id(0)
    h = tl.program_id(1)  # the KV head; its query heads are h * GROUP + [0, GROUP)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    ctx = tl.load(lens_ptr + b)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gm = g < GROUP
    dm = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qt + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=gm[:, None] & dm[None, :], other=0.0).to(tl.float32)  # [G, D]
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    lo = split * split_tokens
    hi = tl.minimum(ctx, lo + split_tokens)
    for t0 in range(lo, hi, TOK):
        tok = t0 + tl.arange(0, TOK)  # token positions of this tile, read through the block table
        tm = tok < hi
        block = tl.load(tables_ptr + b * stride_tb + tok // BLOCK_SIZE, mask=tm, other=0)
        rows = h * stride_ch + block * stride_cb + (tok % BLOCK_SIZE) * stride_cs
        k = tl.load(kc_ptr + rows[:, None] + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        v = tl.load(vc_ptr + rows[:, None] + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, TOK]
        scores = tl.where(tm[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    if DIRECT:
        out = acc / total[:, None]
        tl.store(out_ptr + b * stride_qt + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])
        return
    # part buffers: [B, heads, num_splits] (+ [D]) in float32; an empty split leaves max -inf, sum 0
    at = (b * (tl.num_programs(1) * GROUP) + h * GROUP + g) * num_splits + split
    tl.store(part_m_ptr + at, m, mask=gm)
    tl.store(part_l_ptr + at, total, mask=gm)
    tl.store(part_acc_ptr + at[:, None] * D_PAD + d[None, :], acc, mask=gm[:, None])


@triton.jit
def _decode_reduce_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, stride_qt, stride_qh, num_splits,
                          S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, S_PAD)
    spm = sp < num_splits
    d = tl.arange(0, D_PAD)
    at = (b * tl.num_programs(1) + head) * num_splits + sp
    m = tl.load(part_m_ptr + at, mask=spm, other=float("-inf"))
    total = tl.load(part_l_ptr + at, mask=spm, other=0.0)
    acc = tl.load(part_acc_ptr + at[:, None] * D_PAD + d[None, :], mask=spm[:, None], other=0.0)
    top = tl.max(m, axis=0)
    w = tl.where(spm & (m > float("-inf")), tl.exp(m - top), 0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(total * w, axis=0)
    tl.store(out_ptr + b * stride_qt + head * stride_qh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, tables_ptr, starts_ptr, qlens_ptr, ctxs_ptr, scale,
                    stride_qt, stride_qh, stride_ch, stride_cb, stride_cs, stride_tb,
                    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, TOK: tl.constexpr,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    qlen = tl.load(qlens_ptr + seg)
    if tile * TILE >= qlen:
        return
    start = tl.load(starts_ptr + seg)
    ctx = tl.load(ctxs_ptr + seg)
    r = tile * TILE + tl.arange(0, TILE)  # query rows of this tile, within the segment
    rm = r < qlen
    pos = ctx - qlen + r  # their positions in the sequence
    d = tl.arange(0, D_PAD)
    dm = d < HEAD_DIM
    q = tl.load(q_ptr + (start + r)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=rm[:, None] & dm[None, :], other=0.0).to(tl.float32)  # [T, D]
    m = tl.full([TILE], float("-inf"), tl.float32)
    total = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, D_PAD], tl.float32)
    last = tl.minimum(ctx, ctx - qlen + tile * TILE + TILE)  # keys past the tile's last row are never seen
    for t0 in range(0, last, TOK):
        tok = t0 + tl.arange(0, TOK)
        tm = tok < last
        block = tl.load(tables_ptr + seg * stride_tb + tok // BLOCK_SIZE, mask=tm, other=0)
        rows = kv_head * stride_ch + block * stride_cb + (tok % BLOCK_SIZE) * stride_cs
        k = tl.load(kc_ptr + rows[:, None] + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        v = tl.load(vc_ptr + rows[:, None] + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        # explicit ieee dots: written as broadcast-multiply-sum, Triton turned these [16, 32, D] products
        # into TF32 tensor-core dots on the H200 (errors ~1e-3)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [T, TOK]
        scores = tl.where(tm[None, :] & (tok[None, :] <= pos[:, None]), scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + (start + r)[:, None] * stride_qt + head * stride_qh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rm[:, None] & dm[None, :])


@dataclass
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int32
    decode_context_lens: torch.Tensor | None  # [B] int32
    max_decode_len: int  # the longest decode context: it sizes the split-K grid
    num_prefills: int
    prefill_starts: torch.Tensor | None  # [S] int32: offset of each segment in the flat batch
    prefill_query_lens: torch.Tensor | None  # [S] int32
    prefill_context_lens: torch.Tensor | None  # [S] int32: tokens in the cache after this step
    prefill_block_tables: torch.Tensor | None  # [S, max_blocks] int32
    max_prefill_len: int

    @classmethod
    def build(cls, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        split = split_decode_prefill(common)
        dev = common.device
        tables = lens = None
        if split.num_decode_tokens:
            tables = split.decode_block_tables.to(torch.int32)
            lens = split.decode_context_lens.to(torch.int32)
        segs = split.prefills
        starts = qlens = ctxs = seg_tables = None
        if segs:
            width = max(len(s.block_table) for s in segs)
            padded = torch.zeros((len(segs), width), dtype=torch.int32, device=dev)
            for i, s in enumerate(segs):
                padded[i, :len(s.block_table)] = s.block_table
            seg_tables = padded
            starts = torch.tensor([s.start for s in segs], dtype=torch.int32, device=dev)
            qlens = torch.tensor([s.length for s in segs], dtype=torch.int32, device=dev)
            ctxs = torch.tensor([s.context_len for s in segs], dtype=torch.int32, device=dev)
        max_decode = max(common.seq_lens[:split.num_decode_tokens], default=0)
        return cls(split.slot_mapping, split.num_decode_tokens, tables, lens, max_decode, len(segs), starts, qlens,
                   ctxs, seg_tables, max((s.length for s in segs), default=0))


class TritonPagedAttention(HeadMajorCache):
    """The backend a model layer calls on CUDA; the reference's cache layout and batch order."""

    name = "triton"

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        return TritonAttentionMetadata.build(common)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: TritonAttentionMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, k_cache, v_cache, meta, scale)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] → their slots in every head's cache."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = k.contiguous(), v.contiguous()
    _write_kv_kernel[(num_tokens, kv_heads)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: TritonAttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] (this step's tokens) → [T, heads, head_dim]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    q = q.contiguous()
    out = torch.empty_like(q)
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads, block_size = k_cache.shape[0], k_cache.shape[2]
    group = heads // kv_heads
    d_pad = triton.next_power_of_2(head_dim)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    if meta.num_decode_tokens:
        batch = meta.num_decode_tokens
        splits, split_tokens = decode_splits(batch * kv_heads, meta.max_decode_len)
        direct = splits == 1  # no merge kernel and no part buffers
        shape = (1,) if direct else (batch, heads, splits)
        part_m = torch.empty(shape, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(shape if direct else (*shape, d_pad), dtype=torch.float32, device=q.device)
        tables = meta.decode_block_tables
        _decode_split_kernel[(batch, kv_heads, splits)](
            q, k_cache, v_cache, tables, meta.decode_context_lens, part_m, part_l, part_acc, out, scale, *strides,
            tables.stride(0), split_tokens, GROUP=group, G_PAD=max(2, triton.next_power_of_2(group)),
            BLOCK_SIZE=block_size, TOK=DECODE_TOKENS, HEAD_DIM=head_dim, D_PAD=d_pad, DIRECT=direct)
        if not direct:
            _decode_reduce_kernel[(batch, heads)](
                part_m, part_l, part_acc, out, q.stride(0), q.stride(1), splits,
                S_PAD=max(2, triton.next_power_of_2(splits)), HEAD_DIM=head_dim, D_PAD=d_pad)
    if meta.num_prefills:
        tables = meta.prefill_block_tables
        grid = (meta.num_prefills, triton.cdiv(meta.max_prefill_len, PREFILL_TILE), heads)
        _prefill_kernel[grid](
            q, k_cache, v_cache, out, tables, meta.prefill_starts, meta.prefill_query_lens,
            meta.prefill_context_lens, scale, *strides, tables.stride(0),
            GROUP=group, BLOCK_SIZE=block_size, TILE=PREFILL_TILE, TOK=PREFILL_TOKENS, HEAD_DIM=head_dim,
            D_PAD=d_pad)
    return out
