"""The quantized linear kernel (Q4_1, Q8_0): its weights are gguf's dequantization bit for bit, its
products match float32 matmul, and the engine uses it for quantized GGUF checkpoints (the real
SmolLM2 parity tests run it: Q4_1 layers, a Q8_0 tied embedding)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu_ops
from pagedserve.model.layers.linear import Linear
from pagedserve.model.loader import iter_quantized_rows, iter_weights, load_config
from tests.model.test_gguf import _write_gguf

ops = cpu_ops()
needs_simd = pytest.mark.skipif(ops is None or not ops.quant_linear_simd(), reason="no AVX-512 kernel here")
QT = gguf.GGMLQuantizationType
Q4_1 = QT.Q4_1
FORMATS = [QT.Q4_1, QT.Q8_0]


def _quantized(out_features: int, in_features: int, qtype=Q4_1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rows from gguf's own quantizer, and gguf's float32 dequantization of them."""
    w = np.random.default_rng(seed).standard_normal((out_features, in_features)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(w, qtype)
    ref = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(out_features, in_features)
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(ref.copy())


@needs_simd
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
@pytest.mark.parametrize(("n", "k"), [(32, 32), (128, 64), (960, 576), (64, 1536)])
def test_kernel_weights_are_ggufs_dequantization_bit_for_bit(n, k, qtype):
    raw, ref = _quantized(n, k, qtype)
    packed = ops.quant_pack(raw, k, qtype.name)
    # one-hot rows pick out single weights: 1 * w plus exact zeros, so any rounding would show
    eye = torch.eye(k)
    for start, stop in ((0, 16), (0, min(k, 40))):  # the register path (<= 16 rows) and the tiled one
        got = ops.quant_linear(eye[start:stop].contiguous(), *packed, qtype.name)
        assert torch.equal(got, ref[:, start:stop].t())


@needs_simd
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 3, 8, 15, 16, 17, 31, 48, 100])
def test_kernel_matches_float32_matmul(rows, qtype):
    raw, ref = _quantized(192, 576, qtype, seed=rows)
    x = torch.randn(rows, 576)
    got = ops.quant_linear(x, *ops.quant_pack(raw, 576, qtype.name), qtype.name)
    expect = x @ ref.t()
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


def test_kernel_refuses_unknown_formats_and_shapes():
    if ops is None:
        pytest.skip("CPU kernels could not be built here")
    raw, _ = _quantized(64, 64)
    with pytest.raises(RuntimeError, match="Q4_1, Q8_0 or F32"):
        ops.quant_pack(raw, 64, "Q5_K")
    with pytest.raises(RuntimeError, match="bytes"):
        ops.quant_pack(raw, 64, "Q8_0")  # Q4_1 rows are 40 bytes, Q8_0 rows of 64 inputs are 68


@needs_simd
def test_linear_uses_the_kernel_for_every_batch_with_bias():
    raw, ref = _quantized(64, 128)
    layer = Linear(128, 64, bias=True)
    with torch.no_grad():
        layer.weight.copy_(ref)
        layer.bias.normal_()
    layer.quant_raw = ("Q4_1", raw)
    layer.prepare_cpu_paths(ops)
    assert layer.quant is not None and layer.quant_raw is None
    for rows in (1, 17, 256, 600):  # the direct path, then the tiled one
        x = torch.randn(rows, 128)
        assert torch.allclose(layer(x), F.linear(x, ref, layer.bias), rtol=1e-5, atol=1e-5)


def test_linear_without_the_kernel_keeps_the_float32_path(monkeypatch):
    raw, ref = _quantized(64, 128)
    monkeypatch.setenv("PAGEDSERVE_QUANT_MATMUL", "0")
    layer = Linear(128, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(ref)
    layer.quant_raw = ("Q4_1", raw)
    layer.prepare_cpu_paths(ops)
    assert layer.quant is None and layer.quant_raw is None  # the raw copy is not kept around
    x = torch.randn(16, 128)
    assert torch.allclose(layer(x), F.linear(x, ref), rtol=1e-5, atol=1e-5)


def test_raw_rows_are_unpermuted_like_the_float_weights(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(next(tiny_llama_dir.glob("*.safetensors"))))
    path = tmp_path / "tiny-q4_1.gguf"
    _write_gguf(path, state, heads=4, kv_heads=2, qtype=Q4_1)
    cfg = load_config(path)
    floats = dict(iter_weights(path, cfg))
    raw = {name: (fmt, rows) for name, fmt, rows in iter_quantized_rows(path, cfg)}
    assert "model.layers.0.self_attn.q_proj.weight" in raw and "model.embed_tokens.weight" in raw
    for name, (fmt, rows) in raw.items():
        assert fmt == "Q4_1"
        deq = np.asarray(gguf.quants.dequantize(rows.numpy(), Q4_1), dtype=np.float32)
        assert torch.equal(torch.from_numpy(deq.reshape(floats[name].shape)), floats[name]), name


@needs_simd
def test_engine_on_a_q4_1_gguf_runs_the_kernel(tiny_llama_dir, smollm2_tokenizer, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from pagedserve import LLM, SamplingParams

    # the tiny GGUF carries no tokenizer; the tiny model was built on SmolLM2's vocabulary
    monkeypatch.setattr("pagedserve.engine.llm_engine.load_tokenizer", lambda path: smollm2_tokenizer)
    state = load_file(str(next(tiny_llama_dir.glob("*.safetensors"))))
    path = tmp_path / "tiny-q4_1.gguf"
    _write_gguf(path, state, heads=4, kv_heads=2, qtype=Q4_1)
    llm = LLM(str(path), num_blocks=64, block_size=4)
    model = llm.engine.model
    layers = [m for m in model.layers.modules() if isinstance(m, Linear)]
    assert len(layers) == 8 and all(m.quant is not None for m in layers)
    assert model.output_projection.quant is not None  # the tied embedding, read as the output projection
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20, 7)]
    quant = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setenv("PAGEDSERVE_QUANT_MATMUL", "0")
    plain = LLM(str(path), num_blocks=64, block_size=4)
    assert all(m.quant is None for m in plain.engine.model.modules() if isinstance(m, Linear))
    assert quant == [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]



@needs_simd
def test_default_smollm2_reads_its_gguf_blocks(smollm2_llm):
    """The parity tests on the real model run this path: every layer matrix from its Q4_1 blocks,
    the output projection from the Q8_0 embedding."""
    model = smollm2_llm.engine.model
    formats = [m.quant[3] for m in model.layers.modules() if isinstance(m, Linear) and m.quant is not None]
    assert formats == ["Q4_1"] * (4 * model.config.num_hidden_layers)
    assert model.output_projection.quant[3] == "Q8_0"
