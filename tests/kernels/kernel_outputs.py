"""The fused kernels' results on fixed inputs, for comparing builds for different CPU targets
(test_portable_builds.py runs this module in a subprocess built with $PAGEDSERVE_CPU_ARCH).

    python -m tests.kernels.kernel_outputs OUT.pt [TINY_MODEL_DIR]
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from pagedserve.model.quantization import FAST_TYPES
from pagedserve.model.quantization.gguf_blocks import decode_rows
from pagedserve.model.quantization.int8 import quantize_per_channel
from pagedserve.model.quantization.w8a8 import w8a8_reference
from tests.model.test_quant_linear import gguf_dequantized, random_blocks

ROWS = (1, 5, 16, 17, 300)


def compute(ops: ModuleType) -> dict[str, torch.Tensor]:
    """Every linear layout at several row counts, checked here against the PyTorch result."""
    out: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)
    for qtype in FAST_TYPES:
        cols = 512 if qtype.endswith("_K") else 96
        raw = random_blocks(qtype, 64, cols)
        blocks = decode_rows(qtype, raw, cols)
        mins = blocks.mins if blocks.mins is not None else torch.empty(0)
        packed = ops.pack_panels(blocks.codes, blocks.scales, mins, blocks.layout)
        ref = gguf_dequantized(qtype, raw, 64, cols)
        for rows in ROWS:
            x = torch.randn(rows, cols, generator=gen)
            got = out[f"{qtype}/{rows}"] = ops.quant_linear(x, *packed, blocks.layout)
            torch.testing.assert_close(got, x @ ref.t(), rtol=1e-4, atol=1e-4)
    w = torch.randn(96, 576, generator=gen) * 0.05
    codes, scale = quantize_per_channel(w)
    int8 = ops.pack_panels(codes, scale, torch.empty(0), "I8_ROW")
    w8a8 = ops.w8a8_pack(codes, scale)
    f32 = ops.f32_pack(w)
    for rows in ROWS:
        x = torch.randn(rows, 576, generator=gen)
        out[f"int8/{rows}"] = ops.quant_linear(x, *int8, "I8_ROW")
        torch.testing.assert_close(out[f"int8/{rows}"], (x @ codes.float().t()) * scale, rtol=1e-4, atol=1e-4)
        out[f"w8a8/{rows}"] = ops.w8a8_linear(x, *w8a8)
        assert torch.equal(out[f"w8a8/{rows}"], w8a8_reference(x, codes, scale))
        out[f"f32/{rows}"] = ops.quant_linear(x, f32, torch.empty(0), torch.empty(0), "F32")
        torch.testing.assert_close(out[f"f32/{rows}"], x @ w.t(), rtol=1e-4, atol=1e-4)
    out.update(_kv_cache_writes(ops, gen))
    return out


def _kv_cache_writes(ops: ModuleType, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """K/V written into 16-bit caches (the F16C / AVX-512 / scalar conversions): torch's rounding."""
    from pagedserve.attention.backends.cpu_fused import CpuPagedAttention

    out = {}
    k, v = (torch.randn(40, 2, 24, generator=gen) * torch.logspace(-6, 5, 40).view(40, 1, 1) for _ in range(2))
    slots = torch.randperm(9 * 16, generator=gen)[:40]
    exact = CpuPagedAttention(ops).allocate_kv_cache(9, 16, 2, 24, torch.float32, torch.device("cpu"))
    ops.write_kv(*exact, k, v, slots)
    for dtype in (torch.float16, torch.bfloat16):
        cache = CpuPagedAttention(ops).allocate_kv_cache(9, 16, 2, 24, dtype, torch.device("cpu"))
        ops.write_kv(*cache, k, v, slots)
        for half, full in zip(cache, exact, strict=True):
            assert torch.equal(half.view(torch.int16), full.to(dtype).view(torch.int16))
        out[f"kv/{dtype}"] = torch.cat([c.flatten().view(torch.int16) for c in cache])
    return out


def greedy_tokens(model_dir: str) -> torch.Tensor:
    """The whole engine (decoder stack, attention, norms) on a tiny model: greedy tokens."""
    from pagedserve import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20, 7)]
    tokens = []
    for kv_cache_dtype in ("auto", "float16", "bfloat16"):  # attention over each cache element type
        llm = LLM(model_dir, num_blocks=64, block_size=4, kv_cache_dtype=kv_cache_dtype)
        tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    return torch.tensor(tokens)


def main() -> None:
    from pagedserve.kernels import cpu_ops

    ops = cpu_ops()
    assert ops is not None, "the kernels did not build for this target"
    results = compute(ops)
    results["levels"] = f"{ops.simd_level()}/{ops.int_dot_level()}"
    if len(sys.argv) > 2:
        results["tokens"] = greedy_tokens(sys.argv[2])
    torch.save(results, sys.argv[1])


if __name__ == "__main__":
    main()
