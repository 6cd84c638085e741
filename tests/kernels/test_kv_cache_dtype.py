"""16-bit KV caches (kv_cache_dtype): the fused kernels hold the same bits as torch's rounding and attend
like the plain-PyTorch backend; the engine option sizes, allocates and validates the cache."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.attention.backends.cpu_fused import CpuPagedAttention
from pagedserve.attention.backends.torch_ref import TorchPagedAttention
from pagedserve.attention.backends.torch_ref import write_kv as torch_write_kv
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.config import CacheConfig, EngineConfig
from pagedserve.kernels import cpu_ops

ops = cpu_ops()
needs_ops = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here")
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 differs from 0.0 and NaNs compare."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _awkward_values(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """[n, d] floats: random ones of several magnitudes plus ties, signed zeros, float16 overflow and
    subnormals, infinities."""
    x = torch.randn(n, d, generator=g) * torch.logspace(-6, 5, n).unsqueeze(1)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65520.0, 1e-7, -3e-6, 1 + 2**-11, 1 + 3 * 2**-11,
                            70000.0])
    bf16_ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000 - 2**32], dtype=torch.int32).view(torch.float32)
    flat = x.flatten()
    extra = torch.cat([special, bf16_ties])
    flat[: len(extra)] = extra
    return flat.view(n, d)


@needs_ops
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("d", [64, 24])  # 24: a scalar tail after the 16-wide conversion
def test_write_kv_holds_torch_rounding_bit_for_bit(dtype, d):
    g = torch.Generator().manual_seed(10)
    kv_heads, num_blocks, bs, n = 3, 9, 16, 40
    k, v = (_awkward_values(n * kv_heads, d, g).view(n, kv_heads, d) for _ in range(2))
    slots = torch.randperm(num_blocks * bs, generator=g)[:n]
    fused = CpuPagedAttention(ops).allocate_kv_cache(num_blocks, bs, kv_heads, d, dtype, torch.device("cpu"))
    f32 = CpuPagedAttention(ops).allocate_kv_cache(num_blocks, bs, kv_heads, d, torch.float32, torch.device("cpu"))
    ops.write_kv(*fused, k, v, slots)
    ops.write_kv(*f32, k, v, slots)  # an exact copy: the slots and layout, in float32
    for half, full in zip(fused, f32, strict=True):
        assert half.dtype == dtype
        assert torch.equal(_bits(half), _bits(full.to(dtype)))
    ref = TorchPagedAttention().allocate_kv_cache(num_blocks, bs, kv_heads, d, dtype, torch.device("cpu"))
    torch_write_kv(*ref, k, v, slots)
    assert torch.equal(_bits(fused[0].transpose(2, 3)), _bits(ref[0]))  # the fused K is block-transposed
    assert torch.equal(_bits(fused[1]), _bits(ref[1]))


def _step_inputs(steps, tables, kv_heads, group, d, bs, g):
    """Per step: the common metadata and random q, k, v for its tokens (decodes first, as both backends
    order them). A step lists (request, new tokens)."""
    done = [0] * len(tables)
    out = []
    for step in steps:
        step = sorted(step, key=lambda s: s[1] != 1)
        slots, query_lens, seq_lens = [], [], []
        for r, n in step:
            slots += [tables[r][p // bs] * bs + p % bs for p in range(done[r], done[r] + n)]
            done[r] += n
            query_lens.append(n)
            seq_lens.append(done[r])
        common = CommonAttentionMetadata(torch.tensor(slots), query_lens, seq_lens, [tables[r] for r, _ in step], bs,
                                         torch.device("cpu"))
        t = len(slots)
        qkv = (torch.randn(t, kv_heads * group, d, generator=g), torch.randn(t, kv_heads, d, generator=g),
               torch.randn(t, kv_heads, d, generator=g))
        out.append((common, qkv))
    return out


@needs_ops
@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32])
# head_dim 64, block 16: the compiled fast paths for every group size; then the generic loops.
@pytest.mark.parametrize(("group", "d", "bs"), [*((gr, 64, 16) for gr in range(1, 9)), (3, 24, 4), (2, 16, 4)])
def test_fused_backend_attends_like_the_torch_backend(dtype, group, d, bs):
    """Whole prompts of odd lengths, then a chunk after a cached prefix beside decode tokens, then
    decode only: the same outputs from both backends on caches of `dtype`, and the same cache bits."""
    g = torch.Generator().manual_seed(20 + group)
    kv_heads, num_blocks = 2, 64
    prompts = [1, 17, 33, 61, 5]
    need = [-(-(n + 20) // bs) for n in prompts]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [perm[sum(need[:i]):sum(need[:i + 1])] for i in range(len(prompts))]
    steps = [list(enumerate(prompts)), [(0, 1), (1, 1), (2, 1), (3, 1), (4, 13)], [(r, 1) for r in range(5)]]
    inputs = _step_inputs(steps, tables, kv_heads, group, d, bs, g)
    dev = torch.device("cpu")
    fused, ref = CpuPagedAttention(ops), TorchPagedAttention()
    fused_cache = fused.allocate_kv_cache(num_blocks, bs, kv_heads, d, dtype, dev)
    ref_cache = ref.allocate_kv_cache(num_blocks, bs, kv_heads, d, dtype, dev)
    scale = d ** -0.5
    for common, (q, k, v) in inputs:
        got = fused(q, k, v, *fused_cache, fused.build_metadata(common), scale)
        want = ref(q, k, v, *ref_cache, ref.build_metadata(common), scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fused_cache[0].dtype == dtype
    assert torch.equal(_bits(fused_cache[0].transpose(2, 3)), _bits(ref_cache[0]))
    assert torch.equal(_bits(fused_cache[1]), _bits(ref_cache[1]))


@needs_ops
def test_kernels_refuse_mixed_or_unsupported_caches():
    q = torch.randn(1, 2, 64)
    k16 = torch.zeros(1, 4, 64, 16, dtype=torch.float16)
    v32 = torch.zeros(1, 4, 16, 64)
    args = (torch.zeros(1, 4, dtype=torch.long), torch.tensor([3]), 0.125)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.paged_decode_attention(torch.empty_like(q), q, k16, v32, *args)
    k64, v64 = k16.double(), v32.double()
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.paged_decode_attention(torch.empty_like(q), q, k64, v64, *args)


# --- the engine option ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["int8", "float32 ", "half", ""])
def test_bad_kv_cache_dtype_names_the_field_and_the_choices(bad):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'float16', 'bfloat16'\)"):
        CacheConfig(kv_cache_dtype=bad)


@pytest.mark.parametrize("fp8", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_cache_is_refused_as_unsupported(fp8):
    with pytest.raises(ValueError, match="kv_cache_dtype.*fp8 is not supported by this engine's CPU backends"):
        EngineConfig.from_kwargs("smollm2-135m", kv_cache_dtype=fp8)


def test_auto_is_the_model_dtype():
    assert EngineConfig().kv_cache_torch_dtype == torch.float32
    assert EngineConfig(dtype="bfloat16").kv_cache_torch_dtype == torch.bfloat16
    assert EngineConfig.from_kwargs(dtype="bfloat16", kv_cache_dtype="float16").kv_cache_torch_dtype == torch.float16


def test_cli_flag_comes_from_the_field():
    import argparse

    from pagedserve.entrypoints.cli import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args(["--kv-cache-dtype", "bfloat16"]))["kv_cache_dtype"] == "bfloat16"
    assert "kv_cache_dtype" not in engine_kwargs(p.parse_args([]))
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-cache-dtype", "fp8"])


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_16_bit_kv_doubles_the_blocks_of_a_memory_budget(tiny_llama_dir, cpu_kernels):
    blocks = {}
    for kv in ("auto", "float16", "bfloat16"):
        engine = LLM(str(tiny_llama_dir), kv_cache_memory_gb=0.002, block_size=16, kv_cache_dtype=kv,
                     cpu_kernels=cpu_kernels).engine
        k_cache, v_cache = engine.runner.kv_caches[0]
        assert k_cache.dtype == v_cache.dtype == (torch.float32 if kv == "auto" else getattr(torch, kv))
        blocks[kv] = engine.kv.pool.num_blocks
        assert k_cache.shape[1] == blocks[kv]
        want = CpuPagedAttention if cpu_kernels and ops is not None else TorchPagedAttention
        assert isinstance(engine.model.attention_backend, want)  # the model's backend, whatever the cache
    assert blocks["float16"] == blocks["bfloat16"] == 2 * blocks["auto"]


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Hello, my name is", "List three fruits:",
           "Explain in simple terms how a transformer neural network processes a sentence, step by step."]


def _greedy(model_dir, **options) -> list[list[int]]:
    llm = LLM(str(model_dir), block_size=16, **options)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where both greedy outputs have the same token."""
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    return same / sum(len(r) for r in a)


@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_16_bit_kv_greedy_output_mostly_agrees_with_float32_kv(tiny_llama_dir, kv, cpu_kernels):
    full = _greedy(tiny_llama_dir, cpu_kernels=cpu_kernels)
    half = _greedy(tiny_llama_dir, cpu_kernels=cpu_kernels, kv_cache_dtype=kv)
    assert _agreement(full, half) >= 0.8


def test_a_draft_models_cache_follows_the_option(tiny_llama_dir):
    spec = {"method": "draft_model", "model": str(tiny_llama_dir), "num_speculative_tokens": 3,
            "disable_by_batch_size": 10_000}
    llm = LLM(str(tiny_llama_dir), kv_cache_dtype="bfloat16", speculative_config=spec)
    proposer = llm.engine.runner.speculator.proposer
    assert all(k.dtype == v.dtype == torch.bfloat16 for k, v in proposer.kv_caches)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0
