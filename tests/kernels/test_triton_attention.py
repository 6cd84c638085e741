"""The Triton paged-attention kernels against the PyTorch reference backend: decode rows and prefill
segments (whole prompts and later chunks after a cached prefix) in one step, GQA, block sizes that are
and are not powers of two, head sizes that are and are not, 16-bit caches. Without a GPU they run on
CPU in Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are defined)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton_paged = pytest.importorskip("pagedserve.attention.backends.triton_paged")

from pagedserve.attention.backends.torch_ref import TorchPagedAttention  # noqa: E402
from pagedserve.attention.metadata import CommonAttentionMetadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _step(query_lens: list[int], seq_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator):
    """Random distinct block tables and the slots of each request's new tokens (at the end of its context)."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for q, n in zip(query_lens, seq_lens, strict=True):
        need = -(-n // block_size)
        table, perm = perm[:need], perm[need:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(n - q, n)]
    return tables, torch.tensor(slots, dtype=torch.long, device=DEVICE)


@pytest.mark.parametrize("long_decode", [True, False], ids=["split-k", "one-split"])
@pytest.mark.parametrize("block_size,head_dim,heads,kv_heads,cache_dtype", [
    (4, 64, 4, 2, torch.float32),
    (16, 64, 9, 3, torch.float32),  # SmolLM2's grouping (3 query heads per KV head)
    (6, 48, 4, 4, torch.float32),  # neither a power of two: padded lanes are masked
    (16, 64, 4, 1, torch.bfloat16),
    (8, 32, 2, 2, torch.float16),
])
def test_triton_matches_the_reference(block_size, head_dim, heads, kv_heads, cache_dtype, long_decode):
    gen = torch.Generator().manual_seed(block_size * 100 + head_dim)
    # decode rows (one long enough to be cut into splits), a whole prompt, a later chunk after a cached
    # prefix, a one-token prompt
    query_lens = [1, 1, 1, 1, 21, 7, 1]
    seq_lens = [5, 33, 17, 700 if long_decode else 9, 21, 40, 1]
    decodes = 4
    num_blocks = 256
    tables, slots = _step(query_lens, seq_lens, block_size, num_blocks, gen)
    common = CommonAttentionMetadata(slots, query_lens, seq_lens, tables, block_size, DEVICE)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    ref, tri = TorchPagedAttention(), triton_paged.TritonPagedAttention()
    splits = triton_paged.decode_splits(decodes * kv_heads, max(seq_lens[:decodes]))[0]
    assert (splits > 1) == long_decode  # both the merged and the direct decode path are exercised
    caches = {}
    for name, backend in (("ref", ref), ("tri", tri)):
        kc, vc = backend.allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim, cache_dtype, DEVICE)
        # the context before this step: the same random history in both caches
        history = torch.Generator().manual_seed(7)
        kc.copy_(torch.randn(kc.shape, generator=history).to(cache_dtype))
        vc.copy_(torch.randn(vc.shape, generator=history).to(cache_dtype))
        caches[name] = (kc, vc)
    scale = head_dim ** -0.5
    # The reference runs on CPU: on CUDA, torch's own fp32 attention may use TF32 (cuDNN) and be the
    # less exact of the two.
    cpu = torch.device("cpu")
    common_cpu = CommonAttentionMetadata(slots.cpu(), query_lens, seq_lens, tables, block_size, cpu)
    ref_caches = [c.cpu() for c in caches["ref"]]
    expected = ref(q.cpu(), k.cpu(), v.cpu(), *ref_caches, ref.build_metadata(common_cpu), scale)
    got = tri(q, k, v, *caches["tri"], tri.build_metadata(common), scale)
    assert torch.equal(ref_caches[0], caches["tri"][0].cpu()) and torch.equal(ref_caches[1], caches["tri"][1].cpu())
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=2e-5)
    assert tri.build_metadata(common).num_decode_tokens == decodes


def test_write_kv_rounds_to_the_cache_dtype():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(5, 2, 16, generator=gen).to(DEVICE)
    v = torch.randn(5, 2, 16, generator=gen).to(DEVICE)
    kc = torch.zeros(2, 4, 4, 16, dtype=torch.bfloat16, device=DEVICE)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([3, 9, 0, 15, 6], device=DEVICE)
    triton_paged.write_kv(kc, vc, k, v, slots)
    flat = kc.view(2, -1, 16)
    assert torch.equal(flat[:, slots], k.transpose(0, 1).to(torch.bfloat16))
    assert torch.equal(vc.view(2, -1, 16)[:, slots], v.transpose(0, 1).to(torch.bfloat16))
    untouched = [s for s in range(16) if s not in slots.tolist()]
    assert not flat[:, untouched].any()


def test_split_sizes_fill_the_gpu_and_cover_the_context():
    for programs, length in [(3, 4096), (192, 4096), (768, 512), (3, 10), (1, 100_000)]:
        splits, tokens = triton_paged.decode_splits(programs, length)
        assert splits * tokens >= length > (splits - 1) * tokens and tokens % triton_paged.DECODE_TOKENS == 0
    assert triton_paged.decode_splits(3, 4096)[0] >= 8 and triton_paged.decode_splits(768, 4096)[0] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("long_decode", [True, False], ids=["split-k", "one-split"])
def test_decode_dots_in_16_bits_match_the_reference(dtype, long_decode):
    """A 16-bit q with a cache of the same dtype takes the tensor-core decode (products in 16 bits,
    float32 accumulation): close to the float32 reference, as flash attention is."""
    assert triton_paged.uses_decode_dot(dtype, dtype)
    assert not triton_paged.uses_decode_dot(torch.float32, dtype)
    gen = torch.Generator().manual_seed(5)
    block_size, head_dim, heads, kv_heads, num_blocks = 16, 64, 9, 3, 128
    query_lens = [1, 1, 1]
    seq_lens = [5, 700 if long_decode else 40, 17]
    tables, slots = _step(query_lens, seq_lens, block_size, num_blocks, gen)
    common = CommonAttentionMetadata(slots, query_lens, seq_lens, tables, block_size, DEVICE)
    q = torch.randn(3, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(3, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(3, kv_heads, head_dim, generator=gen).to(dtype)
    ref, tri = TorchPagedAttention(), triton_paged.TritonPagedAttention()
    history = torch.Generator().manual_seed(7)
    cpu = torch.device("cpu")
    ref_caches = ref.allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim, dtype, cpu)
    kc0 = torch.randn(ref_caches[0].shape, generator=history).to(dtype)
    vc0 = torch.randn(kc0.shape, generator=history).to(dtype)
    ref_caches[0].copy_(kc0)
    ref_caches[1].copy_(vc0)
    common_cpu = CommonAttentionMetadata(slots.cpu(), query_lens, seq_lens, tables, block_size, cpu)
    expected = ref(q.float(), k.float(), v.float(), *ref_caches, ref.build_metadata(common_cpu), head_dim ** -0.5)
    tri_caches = (kc0.clone().to(DEVICE), vc0.clone().to(DEVICE))
    got = tri(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), *tri_caches, tri.build_metadata(common), head_dim ** -0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), expected, atol=3e-2, rtol=3e-2)
    # and the broadcast path (decode_dot off) is the float32-exact one
    plain = triton_paged.TritonPagedAttention(decode_dot=False)
    got_plain = plain(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), *tri_caches, plain.build_metadata(common),
                      head_dim ** -0.5)
    torch.testing.assert_close(got_plain.float().cpu(), expected, atol=1e-2, rtol=1e-2)
