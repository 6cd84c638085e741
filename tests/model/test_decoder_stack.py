"""The C++ decoder stack (pagedserve/kernels/decoder_stack.cpp) computes exactly what the Python
layer loop over the same fused kernels computes, step by step, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import cpu_ops
from pagedserve.model.layers.linear import Linear
from tests.model.test_gguf import _write_gguf

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here")


def _run_both_paths(llm: LLM, prompts: list[dict], params: SamplingParams) -> list[tuple[str, bool]]:
    """Generate; every forward runs the Python loop first, then the stack, on the same inputs.
    Returns (step kind, outputs equal) per step."""
    model = llm.engine.model
    stack, forward = model.stack, model.forward
    assert stack is not None
    steps: list[tuple[str, bool]] = []

    def both(input_ids, positions, kv_caches, meta):
        model.stack = None
        reference = forward(input_ids, positions, kv_caches, meta).clone()
        model.stack = stack  # rewrites the same K/V into the same slots, then attends as the loop did
        out = forward(input_ids, positions, kv_caches, meta)
        kind = ("decode" if not meta.prefills else "prefill" if meta.num_decode_tokens == 0 else "mixed")
        steps.append((kind, torch.equal(reference, out)))
        return out

    model.forward = both
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        del model.forward
    return steps


@pytest.mark.parametrize("model_dir", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_stack_matches_the_python_loop_bit_for_bit(model_dir, request):
    """Llama with GQA and tied embeddings, Qwen2 with q/k/v bias: decode-only, prefill-only and mixed
    steps, prompts chunked by a small token budget, blocks of 4 so tables span many blocks."""
    llm = LLM(str(request.getfixturevalue(model_dir)), num_blocks=128, block_size=4, max_num_seqs=3,
              max_num_batched_tokens=24)
    prompts = [{"prompt_token_ids": list(range(7, 7 + n))} for n in (5, 40, 3, 17, 60)]
    steps = _run_both_paths(llm, prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert {kind for kind, _ in steps} == {"decode", "prefill", "mixed"}
    assert all(equal for _, equal in steps), [s for s in steps if not s[1]]


def test_stack_matches_on_a_quantized_gguf(tiny_llama_dir, smollm2_tokenizer, tmp_path, monkeypatch):
    """The quantized kernel inside the stack, as the default model runs it."""
    from safetensors.torch import load_file

    monkeypatch.setattr("pagedserve.engine.llm_engine.load_tokenizer", lambda path: smollm2_tokenizer)
    state = load_file(str(next(tiny_llama_dir.glob("*.safetensors"))))
    path = tmp_path / "tiny-q4_1.gguf"
    _write_gguf(path, state, heads=4, kv_heads=2, qtype=GGMLQuantizationType.Q4_1)
    llm = LLM(str(path), num_blocks=64, block_size=4, max_num_seqs=2)
    assert all(m.quant is not None for m in llm.engine.model.layers.modules() if isinstance(m, Linear))
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20, 7)]
    steps = _run_both_paths(llm, prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert steps and all(equal for _, equal in steps)


def test_stack_can_be_switched_off(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_DECODER_STACK", "0")
    assert LLM(str(tiny_llama_dir), num_blocks=16, block_size=4).engine.model.stack is None


def test_fused_linear_takes_every_float32_path():
    """Padded small batches and plain ones, with a bias: the same numbers as F.linear."""
    layer = Linear(96, 64, bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    weight = layer.weight.detach().clone()
    layer.prepare_cpu_paths(ops)
    assert layer.fused_linear is not None and layer.quant is None
    for rows in (1, 3, 4, 9, 12, 40, 300):
        x = torch.randn(rows, 96)
        assert torch.allclose(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5), rows
