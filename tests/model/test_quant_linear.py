"""The packed-weight linear kernels: every GGUF type with a fast path decodes to gguf's own
dequantization bit for bit and the kernel multiplies by exactly those weights; int8 (W8A16) matches
its float reference; W8A8 equals its PyTorch reference bit for bit; and the engine uses the right
method for each checkpoint and option (the real SmolLM2 parity tests run the Q4_1/Q8_0 path)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu_ops
from pagedserve.model.layers.linear import Linear
from pagedserve.model.loader import iter_quantized_rows, iter_weights, load_config
from pagedserve.model.quantization import FAST_TYPES
from pagedserve.model.quantization.gguf_blocks import decode_rows
from pagedserve.model.quantization.int8 import quantize_per_channel
from pagedserve.model.quantization.w8a8 import quantize_rows, w8a8_reference
from tests.model.test_gguf import _write_gguf

ops = cpu_ops()
needs_ops = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here")
QT = gguf.GGMLQuantizationType
Q4_1 = QT.Q4_1
# Where each type keeps its fp16 scale fields (random bytes elsewhere are valid codes).
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
               "Q5_K": [0, 2], "Q6_K": [208], "Q8_1": [0, 2]}


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid raw GGUF rows [rows, bytes] of `qtype`: random codes and sub-scales, small fp16 scales
    (gguf has no K-quant quantizer in Python)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[QT[qtype]]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        scale = rng.uniform(0.5e-3, 2e-3, size=blocks.shape[0]).astype(np.float16)
        blocks[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def gguf_dequantized(qtype: str, raw: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    deq = np.asarray(gguf.quants.dequantize(raw, QT[qtype]), dtype=np.float32).reshape(rows, cols)
    return torch.from_numpy(deq.copy())


def _cols(qtype: str) -> int:
    return 512 if qtype.endswith("_K") else 96


@pytest.mark.parametrize("qtype", FAST_TYPES)
def test_decoded_blocks_are_ggufs_dequantization_bit_for_bit(qtype):
    cols = _cols(qtype)
    raw = random_blocks(qtype, 64, cols)
    blocks = decode_rows(qtype, raw, cols)
    assert blocks.codes.shape == (64, cols) and blocks.source == qtype
    assert torch.equal(blocks.dequantize(), gguf_dequantized(qtype, raw, 64, cols))


def _packed(qtype: str, rows: int, cols: int, seed: int = 0):
    raw = random_blocks(qtype, rows, cols, seed)
    blocks = decode_rows(qtype, raw, cols)
    mins = blocks.mins if blocks.mins is not None else torch.empty(0)
    return (*ops.pack_panels(blocks.codes, blocks.scales, mins, blocks.layout), blocks.layout), \
        gguf_dequantized(qtype, raw, rows, cols)


@needs_ops
@pytest.mark.parametrize("qtype", FAST_TYPES)
def test_kernel_weights_are_ggufs_dequantization_bit_for_bit(qtype):
    cols = _cols(qtype)
    packed, ref = _packed(qtype, 64, cols)
    # one-hot rows pick out single weights: 1 * w plus exact zeros, so any rounding would show
    eye = torch.eye(cols)
    for start, stop in ((0, 1), (0, 8), (5, 21), (0, 40)):  # the register path and the tiled one
        got = ops.quant_linear(eye[start:stop].contiguous(), *packed)
        assert torch.equal(got, ref[:, start:stop].t()), (start, stop)


@needs_ops
@pytest.mark.parametrize("qtype", FAST_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 15, 16, 17, 31, 100, 300])
def test_kernel_matches_float32_matmul(rows, qtype):
    cols = _cols(qtype)
    packed, ref = _packed(qtype, 160, cols, seed=rows)
    x = torch.randn(rows, cols)
    got = ops.quant_linear(x, *packed)
    expect = x @ ref.t()
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


@needs_ops
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 64, 300])
def test_a_rows_result_does_not_depend_on_the_batch(rows):
    packed, _ = _packed("Q4_K", 96, 512)
    x = torch.randn(rows, 512)
    alone = torch.cat([ops.quant_linear(x[i:i + 1], *packed) for i in range(rows)])
    assert torch.equal(ops.quant_linear(x, *packed), alone)


def test_quantize_per_channel_is_symmetric_per_row():
    w = torch.randn(40, 70)
    w[3] = 0
    codes, scale = quantize_per_channel(w)
    assert codes.dtype == torch.int8 and scale.shape == (40,)
    assert scale[3] == 0 and torch.all(codes[3] == 0)
    assert torch.all(codes.abs().amax(1)[scale > 0] == 127)
    assert torch.allclose(codes.float() * scale[:, None], w, atol=scale.max().item() / 2 + 1e-7)


@needs_ops
@pytest.mark.parametrize(("n", "k"), [(32, 32), (96, 576), (64, 1536)])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 48, 300])
def test_int8_kernel_matches_its_reference(n, k, rows):
    codes, scale = quantize_per_channel(torch.randn(n, k) * 0.05)
    packed = ops.pack_panels(codes, scale, torch.empty(0), "I8_ROW")
    x = torch.randn(rows, k)
    got = ops.quant_linear(x, *packed, "I8_ROW")
    expect = (x @ codes.float().t()) * scale
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    one = ops.quant_linear(x[:1].contiguous(), *packed, "I8_ROW")
    assert torch.equal(got[:1], one)  # the same sums at every row count


@needs_ops
@pytest.mark.parametrize("k", [32, 96, 576, 1536])
def test_activation_quantization_equals_the_reference(k):
    x = torch.randn(37, k) * torch.logspace(-3, 2, 37)[:, None]
    x[5] = 0
    codes, scale = ops.quantize_rows_int8(x)
    ref_codes, ref_scale = quantize_rows(x)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


@needs_ops
@pytest.mark.parametrize(("n", "k"), [(32, 32), (96, 96), (192, 576), (64, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 16, 17, 64, 300])
def test_w8a8_kernel_equals_its_reference_bit_for_bit(n, k, rows):
    codes, scale = quantize_per_channel(torch.randn(n, k) * 0.05)
    x = torch.randn(rows, k)
    got = ops.w8a8_linear(x, *ops.w8a8_pack(codes, scale))
    assert torch.equal(got, w8a8_reference(x, codes, scale))


@needs_ops
def test_w8a8_is_close_to_float32():
    w = torch.randn(256, 576) * 0.05
    codes, scale = quantize_per_channel(w)
    x = torch.randn(8, 576)
    got = ops.w8a8_linear(x, *ops.w8a8_pack(codes, scale))
    expect = x @ w.t()
    assert (got - expect).norm() / expect.norm() < 0.02


@needs_ops
def test_kernel_refuses_unknown_layouts_and_shapes():
    blocks = decode_rows("Q4_1", random_blocks("Q4_1", 64, 64), 64)
    with pytest.raises(RuntimeError, match="U4_32M, U8_32M, I8_32, I8_16, I8_ROW or F32"):
        ops.pack_panels(blocks.codes, blocks.scales, blocks.mins, "Q5_K")
    with pytest.raises(RuntimeError, match="divisible by 32"):
        ops.pack_panels(blocks.codes[:40], blocks.scales[:40], blocks.mins[:40], "U4_32M")
    packed = ops.pack_panels(blocks.codes, blocks.scales, blocks.mins, "U4_32M")
    with pytest.raises(RuntimeError, match="inputs"):
        ops.quant_linear(torch.randn(2, 96), *packed, "U4_32M")
    with pytest.raises(ValueError, match="whole 32-weight blocks"):
        decode_rows("Q4_1", random_blocks("Q4_1", 64, 64), 96)


@needs_ops
@pytest.mark.parametrize("quantization", [None, "int8", "w8a8"])
def test_linear_takes_its_method_and_releases_the_float_weight(quantization):
    w = torch.randn(64, 128) * 0.05
    layer = Linear(128, 64, bias=True)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.normal_()
    bias = layer.bias.detach().clone()
    layer.prepare_cpu_paths(ops, True, quantization)
    assert layer.weight.numel() == 0  # the kernel holds the weights (as float32 panels, or int8)
    x = torch.randn(17, 128)
    tol = {None: 1e-5, "int8": 2e-2, "w8a8": 5e-2}[quantization]
    assert torch.allclose(layer(x), F.linear(x, w, bias), rtol=tol, atol=tol)


def test_linear_without_kernels_runs_the_same_int8_model():
    w = torch.randn(64, 128) * 0.05
    fused, plain = Linear(128, 64, bias=False), Linear(128, 64, bias=False)
    for layer in (fused, plain):
        with torch.no_grad():
            layer.weight.copy_(w)
    plain.prepare_cpu_paths(None, True, "w8a8")
    x = torch.randn(5, 128)
    codes, scale = quantize_per_channel(w)
    assert torch.equal(plain(x), w8a8_reference(x, codes, scale))
    if ops is not None:
        fused.prepare_cpu_paths(ops, True, "w8a8")
        assert torch.equal(fused(x), plain(x))


def test_linear_without_the_kernel_keeps_the_float32_path(monkeypatch):
    raw = random_blocks("Q4_1", 64, 128)
    ref = gguf_dequantized("Q4_1", raw, 64, 128)
    monkeypatch.setenv("PAGEDSERVE_QUANT_MATMUL", "0")
    layer = Linear(128, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(ref)
    layer.quant_blocks = decode_rows("Q4_1", raw, 128)
    layer.prepare_cpu_paths(ops)
    assert layer.quant is None or layer.quant[3] == "F32"
    assert layer.quant_blocks is None  # the decoded copy is not kept around
    x = torch.randn(16, 128)
    assert torch.allclose(layer(x), F.linear(x, ref), rtol=1e-5, atol=1e-5)


def test_raw_rows_are_unpermuted_like_the_float_weights(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(next(tiny_llama_dir.glob("*.safetensors"))))
    path = tmp_path / "tiny-q4_1.gguf"
    _write_gguf(path, state, heads=4, kv_heads=2, qtype=Q4_1)
    cfg = load_config(path)
    floats = dict(iter_weights(path, cfg))
    blocks = dict(iter_quantized_rows(path, cfg))
    assert "model.layers.0.self_attn.q_proj.weight" in blocks and "model.embed_tokens.weight" in blocks
    for name, b in blocks.items():
        assert b.source == "Q4_1" and b.layout == "U4_32M"
        assert torch.equal(b.dequantize(), floats[name]), name


@needs_ops
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
    assert len(layers) == 8 and all(m.quant[3] == "U4_32M" for m in layers)
    assert model.output_projection.quant[3] == "U4_32M"  # the tied embedding, read as the output projection
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20, 7)]
    quant = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setenv("PAGEDSERVE_QUANT_MATMUL", "0")
    plain = LLM(str(path), num_blocks=64, block_size=4)
    assert all(m.quant is None or m.quant[3] == "F32" for m in plain.engine.model.modules() if isinstance(m, Linear))
    assert quant == [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]


@needs_ops
def test_default_smollm2_reads_its_gguf_blocks(smollm2_llm):
    """The parity tests on the real model run this path: every layer matrix from its Q4_1 blocks,
    the output projection from the Q8_0 embedding."""
    model = smollm2_llm.engine.model
    methods = [m.quant_method for m in model.layers.modules() if isinstance(m, Linear)]
    assert [m.source for m in methods] == ["Q4_1"] * (4 * model.config.num_hidden_layers)
    assert model.output_projection.quant_method.source == "Q8_0"
    assert model.output_projection.quant[3] == "I8_32"
