"""Batch invariance of the linear layers: a row's output has the same bits whatever number of rows the
call carries. Prefix-cache hits, chunked prefill and batch composition change only how many rows a
step multiplies, so this is what keeps logits (not only tokens) identical across them."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import cpu_ops
from pagedserve.model.layers.linear import Linear
from pagedserve.model.quantization import row_invariant_linear
from pagedserve.model.quantization.gguf_blocks import decode_rows
from tests.model.test_quant_linear import gguf_dequantized, random_blocks

ops = cpu_ops()
ROW_COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 16, 17, 31, 64, 100, 129, 257, 300]


SHAPES = [(64, 64), (128, 64), (960, 576), (576, 1536)]


def _mkl_is_row_invariant() -> bool:
    """Whether this CPU's MKL gives a row the same bits at M = 4, 8 and every M >= 12 (true on some
    Xeons, false on others: docs/machine.md)."""
    torch.manual_seed(0)
    weight, x = torch.randn(576, 1536), torch.randn(300, 1536)
    full = torch.nn.functional.linear(x, weight)
    return all(torch.equal(torch.nn.functional.linear(x[:m], weight), full[:m]) for m in (4, 8, 12, 13, 64, 100))


@pytest.mark.skipif(not _mkl_is_row_invariant(), reason="this CPU's MKL sums some row counts in another order; "
                    "the fused panel kernel (tested below) is what keeps rows invariant here")
@pytest.mark.parametrize("shape", SHAPES)
def test_float_linear_rows_do_not_depend_on_the_row_count(shape):
    """The PyTorch path's rule (no compiler): MKL with small row counts padded."""
    out_features, in_features = shape
    torch.manual_seed(0)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    x = torch.randn(max(ROW_COUNTS), in_features)
    full = row_invariant_linear(x, weight, bias)
    for rows in ROW_COUNTS:
        assert torch.equal(row_invariant_linear(x[:rows], weight, bias), full[:rows]), rows
        assert torch.equal(row_invariant_linear(x[-rows:], weight, bias), full[-rows:]), rows


@pytest.mark.skipif(ops is None or ops.simd_level() == "generic", reason="no SIMD panel kernel in this build")
@pytest.mark.parametrize("shape", SHAPES)
def test_float_panel_kernel_rows_do_not_depend_on_the_row_count(shape):
    out_features, in_features = shape
    torch.manual_seed(0)
    layer = Linear(in_features, out_features, bias=True)
    weight = layer.weight.detach().clone()
    layer.prepare_cpu_paths(ops)
    x = torch.randn(max(ROW_COUNTS), in_features)
    with torch.no_grad():
        full = layer(x)
        torch.testing.assert_close(full, torch.nn.functional.linear(x, weight, layer.bias), rtol=1e-4, atol=1e-4)
        for rows in ROW_COUNTS:
            assert torch.equal(layer(x[:rows]), full[:rows]), rows
            assert torch.equal(layer(x[-rows:]), full[-rows:]), rows


@pytest.mark.skipif(ops is None, reason="no compiler for the fused kernels")
@pytest.mark.parametrize("method", ["float32", "q4_1", "q6_k", "int8", "w8a8"])
def test_fused_linear_rows_do_not_depend_on_the_row_count(method):
    qtype = {"q4_1": "Q4_1", "q6_k": "Q6_K"}.get(method)
    cols = 256 if qtype == "Q6_K" else 128
    layer = Linear(cols, 64, bias=True)
    with torch.no_grad():
        if qtype:
            raw = random_blocks(qtype, 64, cols)
            layer.weight.copy_(gguf_dequantized(qtype, raw, 64, cols))
            layer.quant_blocks = decode_rows(qtype, raw, cols)
        layer.bias.normal_()
    layer.prepare_cpu_paths(ops, True, method if method in ("int8", "w8a8") else None)
    assert (layer.quant is not None) == (method != "float32")
    x = torch.randn(max(ROW_COUNTS), cols)
    with torch.no_grad():
        full = layer(x)
        for rows in ROW_COUNTS:
            assert torch.equal(layer(x[:rows]), full[:rows]), rows
            assert torch.equal(layer(x[-rows:]), full[-rows:]), rows
