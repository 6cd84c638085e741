"""Paged attention in Triton, for CUDA (and, under TRITON_INTERPRET=1, on CPU for the tests).

The same cache layout as the PyTorch reference, per layer [kv_heads, num_blocks, block_size, head_dim],
and the same batch order (one-query requests first). Three kernels:

- `write_kv`: each new token's K/V to its slot (block * block_size + offset), rounded to the cache dtype.
- decode: programs per (request, KV head, split of the context) hold that head's whole query group, so
  each K/V row is read once for all the query heads that share it (GQA), with an online softmax; a
  second kernel merges the splits (split-K, so that batch 1 at a long context still fills the GPU).
  With a 16-bit q and cache the products are tensor-core dots (the group padded to 16 rows).
- prefill: one program per (segment, tile of query rows, query head) reads its context through the
  block table (the new tokens included: they were written first), causal by position, so a later
  chunk after a cached prefix is the same kernel as a whole prompt.

Softmax and accumulation are float32 whatever the model or cache dtype (16-bit decode dots multiply in
the cache's dtype); the output is the model's dtype. Decode also runs inside captured CUDA graphs
(worker/cuda_graphs.py), over metadata whose shapes never change (`for_decode_graph`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.attention.backends.head_major import HeadMajorCache
from pagedserve.attention.metadata import CommonAttentionMetadata, split_decode_prefill

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels are defined, as Triton does
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
def _dot16(a, b, UPCAST: tl.constexpr):
    """a @ b for 16-bit a and b with float32 accumulation. UPCAST (Triton's interpreter with bfloat16,
    whose bfloat16 dot is wrong there): the same products in float32, where they are exact."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr,
                     stride_kt, stride_kh, stride_ch, stride_cb, stride_cs,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot < 0:  # a padding row of a captured decode graph: nothing to write
        return
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
                         TOK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DIRECT: tl.constexpr,
                         DOT: tl.constexpr, UPCAST: tl.constexpr):
    """One split of one request's context for one KV head and its query group (split-K): the partial
    softmax state (max, sum, weighted values) goes to the part buffers; _decode_reduce_kernel merges.
    DIRECT (one split): the program owns the whole context and writes the output itself.
    DOT (16-bit q and cache): both products are tensor-core dots in the cache's dtype with float32
    accumulation, the group padded to G_PAD >= 16 rows; otherwise float32 broadcast products."""
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
                mask=gm[:, None] & dm[None, :], other=0.0)  # [G, D]
    if not DOT:
        q = q.to(tl.float32)
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
        k = tl.load(kc_ptr + rows[:, None] + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
        v = tl.load(vc_ptr + rows[:, None] + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
        if DOT:
            scores = _dot16(q, tl.trans(k), UPCAST) * scale  # [G, TOK], float32 accumulation
        else:
            k = k.to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, TOK]
        scores = tl.where(tm[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, axis=1)
        if DOT:
            acc = acc * alpha[:, None] + _dot16(p.to(v.dtype), v, UPCAST)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new
    if DIRECT:
        # an empty context (a padding row of a captured graph) gives zeros, not 0 / 0
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
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
    norm = tl.sum(total * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(norm > 0, norm, 1.0)  # empty context: zeros
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


    @classmethod
    def for_decode_graph(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         max_len: int) -> TritonAttentionMetadata:
        """Metadata over a captured graph's persistent buffers: every row a decode row, and the split-K grid
        sized for `max_len` (the model's limit), since a replay cannot change it. Padding rows have slot
        -1 (nothing written) and context 0 (zeros out)."""
        return cls(slot_mapping, slot_mapping.shape[0], block_tables, context_lens, max_len, 0, None, None, None,
                   None, 0)


class TritonPagedAttention(HeadMajorCache):
    """The backend a model layer calls on CUDA; the reference's cache layout and batch order.

    `decode_dot`: decode products as tensor-core dots when q and the cache are both 16-bit (off: float32
    broadcast products everywhere, for A/B runs)."""

    name = "triton"
    supports_decode_graphs = True

    def __init__(self, decode_dot: bool = True) -> None:
        super().__init__()
        self.decode_dot = decode_dot

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        return TritonAttentionMetadata.build(common)

    def decode_graph_metadata(self, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                              context_lens: torch.Tensor, max_len: int) -> TritonAttentionMetadata:
        return TritonAttentionMetadata.for_decode_graph(slot_mapping, block_tables, context_lens, max_len)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: TritonAttentionMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, k_cache, v_cache, meta, scale, self.decode_dot)


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


def uses_decode_dot(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Tensor-core decode dots when q and the cache share a 16-bit dtype (a bfloat16 model on CUDA); a
    float32 q keeps float32 products, so float32 models stay token-identical with transformers."""
    return q_dtype == cache_dtype and q_dtype in (torch.bfloat16, torch.float16)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: TritonAttentionMetadata, scale: float,
                    decode_dot: bool = True) -> torch.Tensor:
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
        dot = decode_dot and uses_decode_dot(q.dtype, k_cache.dtype)
        g_pad = max(16 if dot else 2, triton.next_power_of_2(group))  # tl.dot takes 16 rows at least
        _decode_split_kernel[(batch, kv_heads, splits)](
            q, k_cache, v_cache, tables, meta.decode_context_lens, part_m, part_l, part_acc, out, scale, *strides,
            tables.stride(0), split_tokens, GROUP=group, G_PAD=g_pad,
            BLOCK_SIZE=block_size, TOK=DECODE_TOKENS, HEAD_DIM=head_dim, D_PAD=d_pad, DIRECT=direct, DOT=dot,
            UPCAST=dot and INTERPRETED and k_cache.dtype == torch.bfloat16)
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
