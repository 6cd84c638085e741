"""Quantization as a user meets it: the `quantization` option (int8, w8a8, gguf) on the engine, the
checkpoints each can take (refused with one clear error before any weight is read otherwise), a
K-quant GGUF (the mix a Q4_K_M file has) loading and generating, and the quality of int8 and w8a8
on the real SmolLM2 weights against float32."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.kernels import cpu_ops
from pagedserve.model.layers.linear import Linear
from tests.conftest import PARITY_PROMPTS
from tests.model.test_gguf import _write_gguf

QT = gguf.GGMLQuantizationType
ops = cpu_ops()
needs_ops = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here")
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
TOKEN_PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20, 7)]


def _tokens(llm: LLM, prompts=TOKEN_PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _linears(llm: LLM) -> list[Linear]:
    model = llm.engine.model
    return [m for m in model.layers.modules() if isinstance(m, Linear)] + [model.output_projection]


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match=r"quantization must be None or one of \('int8', 'w8a8', 'gguf'\)"):
        EngineConfig(quantization="fp8")
    with pytest.raises(ValueError, match="quantization must be used with device 'cpu' and dtype 'float32'"):
        EngineConfig(quantization="int8", dtype="bfloat16")


def test_int8_on_an_already_quantized_gguf_is_refused_before_loading(smollm2_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("weights were read before the check")

    monkeypatch.setattr("pagedserve.engine.core.iter_weights", never)
    for method in ("int8", "w8a8"):
        with pytest.raises(ValueError, match=r"already stores its matrices as \['Q4_1', 'Q8_0'\]"):
            LLM(str(smollm2_path), quantization=method)


def test_gguf_quantization_needs_a_gguf_file(tiny_llama_dir):
    with pytest.raises(ValueError, match="quantization='gguf' reads a GGUF file's blocks"):
        LLM(str(tiny_llama_dir), quantization="gguf")


def test_an_unreadable_gguf_type_is_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(next(tiny_llama_dir.glob("*.safetensors"))))
    path = tmp_path / "tiny-q8_1.gguf"
    _write_gguf(path, state, heads=4, kv_heads=2, qtype=lambda name: QT.Q8_1 if "ffn_down" in name else QT.F32)
    with pytest.raises(ValueError, match=r"stores tensors as \['Q8_1'\], which this engine cannot read; supported"):
        LLM(str(path))


@needs_ops
@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_int8_methods_quantize_every_linear_layer(tiny_llama_dir, method):
    llm = LLM(str(tiny_llama_dir), num_blocks=64, block_size=4, quantization=method)
    layout = {"int8": "I8_ROW", "w8a8": "W8A8"}[method]
    assert all(m.quant is not None and m.quant[3] == layout for m in _linears(llm))
    assert all(m.weight.numel() == 0 for m in llm.engine.model.layers.modules() if isinstance(m, Linear))
    assert llm.engine.model.embed_tokens.weight.numel() > 0  # the tied embedding stays for lookups
    quant = _tokens(llm)
    plain = LLM(str(tiny_llama_dir), num_blocks=64, block_size=4, quantization=method, cpu_kernels=False)
    assert _tokens(plain) == quant if method == "w8a8" else len(_tokens(plain)) == len(quant)


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny model whose matrices are K-quants as in a Q4_K_M file: Q4_K q/k/gate/up, Q6_K v/down and
    the embedding, Q5_K the attention output (K-quants need in_features divisible by 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=512)
    state = {k: v for k, v in LlamaForCausalLM(cfg).state_dict().items() if "rotary" not in k}
    kinds = {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "ffn_gate": QT.Q4_K, "ffn_up": QT.Q4_K, "attn_v": QT.Q6_K,
             "ffn_down": QT.Q6_K, "attn_output": QT.Q5_K, "token_embd": QT.Q6_K}
    path = tmp_path_factory.mktemp("kquant") / "tiny-q4_k_m.gguf"
    _write_gguf(path, state, heads=4, kv_heads=2,
                qtype=lambda name: next(q for key, q in kinds.items() if key in name))
    return path


@needs_ops
def test_a_k_quant_gguf_loads_and_generates_on_the_kernel(kquant_gguf, smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr("pagedserve.engine.llm_engine.load_tokenizer", lambda path: smollm2_tokenizer)
    llm = LLM(str(kquant_gguf), num_blocks=64, block_size=4)
    layer = llm.engine.model.layers[0]
    sources = {name: getattr(getattr(layer, part), name).quant_method for part, name in
               (("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))}
    assert {n: m.source for n, m in sources.items()} == {"o_proj": "Q5_K", "gate_up_proj": "Q4_K",
                                                         "down_proj": "Q6_K"}
    assert layer.self_attn.qkv_proj.quant is None  # Q4_K q/k and Q6_K v share no layout: float panels
    assert llm.engine.model.output_projection.quant_method.source == "Q6_K"
    quant = _tokens(llm)
    assert all(len(t) == 16 for t in quant)
    monkeypatch.setenv("PAGEDSERVE_QUANT_MATMUL", "0")  # gguf's dequantization on the float path
    assert _tokens(LLM(str(kquant_gguf), num_blocks=64, block_size=4)) == quant


# --- the real model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_hf_dir(tmp_path_factory, hf_smollm2, smollm2_tokenizer) -> Path:
    """The default GGUF's weights as a float32 HF folder (what a user with an HF checkpoint has)."""
    import copy

    folder = tmp_path_factory.mktemp("smollm2-hf")
    config = copy.deepcopy(hf_smollm2.config)  # transformers will not save a model it read from GGUF
    del config.quantization_config
    model = type(hf_smollm2)(config).to(torch.float32)
    model.load_state_dict(hf_smollm2.state_dict())
    model.save_pretrained(str(folder), safe_serialization=True)
    smollm2_tokenizer.save_pretrained(str(folder))
    return folder


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two greedy runs agree, each prompt counted up to its first difference
    and as disagreeing after it (a divergence changes everything after)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += len(x)
        same += next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
    return same / total


def _perplexity(llm: LLM, text_ids: list[int]) -> float:
    out = llm.generate([{"prompt_token_ids": text_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    lps = [d[tok].logprob for d, tok in zip(out.prompt_logprobs[1:], text_ids[1:], strict=True)]
    return math.exp(-sum(lps) / len(lps))


@pytest.mark.slow
@needs_ops
def test_int8_and_w8a8_quality_on_smollm2(smollm2_hf_dir, smollm2_tokenizer):
    import pydoc_data.topics

    text = pydoc_data.topics.topics["assert"] + pydoc_data.topics.topics["if"]
    text_ids = smollm2_tokenizer(text)["input_ids"][:512]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompts = [smollm2_tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in PARITY_PROMPTS]
    runs, ppl = {}, {}
    for method in (None, "int8", "w8a8"):
        llm = LLM(str(smollm2_hf_dir), quantization=method)
        runs[method] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        ppl[method] = _perplexity(llm, text_ids)
        del llm
    assert _agreement(runs[None], runs["int8"]) >= 0.3  # measured 0.39: a 135M model has many near-ties
    assert _agreement(runs[None], runs["w8a8"]) >= 0.2  # measured 0.29
    assert abs(ppl["int8"] / ppl[None] - 1) < 0.0075  # measured +0.47%
    assert abs(ppl["w8a8"] / ppl[None] - 1) < 0.02  # measured +0.97%
