"""The fused CPU kernels agree with the plain-PyTorch reference they replace."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu_ops

ops = cpu_ops()
needs_ops = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here")


@pytest.mark.skipif(not (sys.platform == "linux" and shutil.which("c++")), reason="no C++ compiler")
def test_kernels_build_where_a_compiler_exists():
    """A broken build would silently fall back to the slower path; where it can build, it must."""
    assert ops is not None


@needs_ops
def test_float32_cpu_engine_uses_the_fused_path(tiny_llama_dir):
    from pagedserve import LLM
    from pagedserve.attention.backends.cpu_fused import CpuPagedAttention

    engine = LLM(str(tiny_llama_dir), num_blocks=8, block_size=4).engine
    assert isinstance(engine.model.attention_backend, CpuPagedAttention)
    k_cache, v_cache = engine.runner.kv_caches[0]
    head_dim = engine.model_config.head_dim
    assert k_cache.shape[2:] == (head_dim, 4) and v_cache.shape[2:] == (4, head_dim)  # K block-transposed


def _rotate_half_reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@needs_ops
def test_rotary_matches_reference_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 6, 2, 32
    qkv = torch.randn(5, (heads + 2 * kv_heads) * d, generator=g)
    table_cos, table_sin = torch.randn(40, d, generator=g), torch.randn(40, d, generator=g)
    positions = torch.tensor([0, 7, 3, 39, 12])
    qk = qkv[:, : (heads + kv_heads) * d].reshape(5, heads + kv_heads, d)
    want = _rotate_half_reference(qk, table_cos[positions].unsqueeze(1), table_sin[positions].unsqueeze(1))
    v_before = qkv[:, (heads + kv_heads) * d:].clone()
    ops.rotary_inplace(qkv, positions, table_cos, table_sin, heads + kv_heads, d)
    assert torch.equal(qkv[:, : (heads + kv_heads) * d].view(5, -1, d), want)
    assert torch.equal(qkv[:, (heads + kv_heads) * d:], v_before)  # v is never rotated


@needs_ops
def test_norms_and_activation_match_reference():
    g = torch.Generator().manual_seed(1)
    x, residual, w = torch.randn(7, 96, generator=g), torch.randn(7, 96, generator=g), torch.randn(96, generator=g)
    ref = F.rms_norm(x, (96,), w, 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)
    x2, r2 = x.clone(), residual.clone()
    ops.fused_add_rms_norm(x2, r2, w, 1e-5)
    assert torch.equal(r2, residual + x)  # the residual stream is an exact add
    torch.testing.assert_close(x2, F.rms_norm(residual + x, (96,), w, 1e-5), rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(3, 2 * 50, generator=g)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), F.silu(gate_up[:, :50]) * gate_up[:, 50:])


def _filled_cache(kv_heads, num_blocks, d, bs, lens, tables, g):
    """A K/V cache in the kernels' layout (K transposed inside each block) holding one random context
    per request, written through the slot path the engine uses; also returns the contexts."""
    k_cache = torch.zeros(kv_heads, num_blocks, d, bs)
    v_cache = torch.zeros(kv_heads, num_blocks, bs, d)
    contexts = []
    for n, table in zip(lens, tables, strict=True):
        k, v = torch.randn(n, kv_heads, d, generator=g), torch.randn(n, kv_heads, d, generator=g)
        ops.write_kv(k_cache, v_cache, k, v, torch.tensor([table[p // bs] * bs + p % bs for p in range(n)]))
        contexts.append((k, v))
    return k_cache, v_cache, contexts


@needs_ops
# Generic loops (head_dim 16, block 4) and the compiled-shape fast paths (block 16, head_dim 64/128).
@pytest.mark.parametrize(("group", "d", "bs"), [(1, 16, 4), (3, 16, 4), (3, 64, 16), (4, 128, 16)])
def test_paged_decode_attention_matches_dense_attention(group, d, bs):
    g = torch.Generator().manual_seed(2)
    kv_heads, num_blocks = 2, 20
    heads = kv_heads * group
    lens = [1, bs + 2, 3 * bs + 1]  # one slot, a partly filled second block, four blocks
    tables = [[3], [5, 9], [0, 17, 2, 11]]
    k_cache, v_cache, contexts = _filled_cache(kv_heads, num_blocks, d, bs, lens, tables, g)
    q = torch.randn(3, heads, d, generator=g)
    block_tables = torch.tensor([t + [0] * (4 - len(t)) for t in tables])
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, k_cache, v_cache, block_tables, torch.tensor(lens), d ** -0.5)
    for b, (k, v) in enumerate(contexts):
        keys = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, n, d]
        values = v.transpose(0, 1).repeat_interleave(group, dim=0)
        want = F.scaled_dot_product_attention(q[b].unsqueeze(1), keys, values).squeeze(1)
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-6)


@needs_ops
def test_argmax_rows_matches_torch_argmax_with_ties_and_nan():
    g = torch.Generator().manual_seed(3)
    cases = [torch.randn(64, 49152, generator=g), torch.randn(3, 5, generator=g), torch.randn(2, 17, generator=g),
             torch.randn(7, 1, generator=g), torch.randint(0, 3, (8, 999), generator=g).float()]  # many ties
    special = torch.randn(5, 1000, generator=g)
    special[0, 10] = special[0, 500] = float("nan")  # the first NaN wins
    special[1, :] = float("-inf")
    special[2, 3] = special[2, 900] = float("inf")
    special[3, :] = 0.0
    special[3, 5] = -0.0
    special[4, 999] = float("nan")  # a NaN in the scalar tail
    for logits in [*cases, special]:
        assert torch.equal(ops.argmax_rows(logits), logits.argmax(dim=-1))
    with pytest.raises(RuntimeError, match="logits must be"):
        ops.argmax_rows(torch.randn(4))


@needs_ops
# Generic loops (head_dim 16, block 4), and the tiled fast paths (block 16, head_dim 64/128; groups
# whose tiles hold 4, 3 and 12 query tokens).
@pytest.mark.parametrize(("group", "d", "bs"), [(3, 16, 4), (3, 64, 16), (4, 128, 16), (1, 64, 16)])
def test_paged_prefill_attention_matches_causal_attention(group, d, bs):
    g = torch.Generator().manual_seed(5)
    kv_heads, num_blocks = 2, 40
    heads = kv_heads * group
    # (tokens already cached, query tokens this step): a whole prompt, a chunk after a cached prefix,
    # a one-token segment, and lengths that leave a partial tile and a partial block.
    shapes = [(0, 7), (2 * bs + 3, 13), (5, 1), (0, 3 * bs + 2)]
    tables = [[3, 8], [0, 17, 2, 11, 30, 31], [21, 22], [4, 5, 6, 7]]
    k_cache, v_cache, contexts = _filled_cache(kv_heads, num_blocks, d, bs, [c + n for c, n in shapes], tables, g)
    total = sum(n for _, n in shapes)
    q = torch.randn(total + 2, heads, d, generator=g)  # two leading rows stand for decode tokens
    out = torch.full_like(q, float("nan"))
    info, start = [], 2
    for cached, n in shapes:
        info.append((start, n, cached + n))
        start += n
    width = max(len(t) for t in tables)
    seg_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    ops.paged_prefill_attention(out, q, k_cache, v_cache, torch.tensor(info), seg_tables, d ** -0.5)
    assert out[:2].isnan().all()  # rows outside the segments are left alone
    for (start, n, ctx), (k, v) in zip(info, contexts, strict=True):
        keys = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, ctx, d]
        values = v.transpose(0, 1).repeat_interleave(group, dim=0)
        rows = torch.arange(n).unsqueeze(1) + (ctx - n)
        mask = torch.arange(ctx).unsqueeze(0) <= rows  # each query sees its prefix and itself
        want = F.scaled_dot_product_attention(q[start:start + n].transpose(0, 1), keys, values, attn_mask=mask)
        torch.testing.assert_close(out[start:start + n], want.transpose(0, 1), rtol=1e-5, atol=1e-6)
