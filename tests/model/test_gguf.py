"""GGUF loading: every supported tensor type dequantizes, llama.cpp's Q/K permutation is undone, and the
config comes from the metadata — checked against a tiny HF model written out as GGUF here."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pagedserve.model.loader import ModelNotFoundError, iter_weights, load_config, resolve_model_path

QT = gguf.GGMLQuantizationType


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert script does to q_proj/k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, state: dict[str, torch.Tensor], heads: int, kv_heads: int, qtype) -> None:
    """A llama GGUF of the HF state; `qtype`: every matrix's type, or a function of the GGUF tensor name.
    K-quant matrices get random valid blocks (gguf-py cannot quantize to them)."""
    layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}
    w = gguf.GGUFWriter(str(path), "llama")
    hidden = state["model.embed_tokens.weight"].shape[1]
    w.add_block_count(2)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(state["model.layers.0.mlp.up_proj.weight"].shape[0])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(state["model.embed_tokens.weight"].shape[0])
    for name, t in state.items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            continue  # tied
        else:
            parts = name.split(".")  # model.layers.N.<module>.<sub>.weight
            module = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{layer_names[module]}.weight"
            if module == "self_attn.q_proj":
                a = _permute(a, heads)
            elif module == "self_attn.k_proj":
                a = _permute(a, kv_heads)
        kind = (qtype(gname) if callable(qtype) else qtype) if a.ndim == 2 else QT.F32
        if kind.name.endswith("_K") or kind.name == "Q8_1":  # no quantizer for these in gguf-py
            from tests.model.test_quant_linear import random_blocks

            data = random_blocks(kind.name, *a.shape, seed=len(gname))
        else:
            data = a if kind == QT.F32 else gguf.quants.quantize(a, kind)
        w.add_tensor(gname, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_gguf_weights_match_the_hf_folder(tiny_llama_dir, tmp_path, qtype):
    from safetensors.torch import load_file

    state = load_file(str(next(tiny_llama_dir.glob("*.safetensors"))))
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    _write_gguf(path, state, heads=4, kv_heads=2, qtype=qtype)

    cfg = load_config(resolve_model_path(str(path)))
    assert (cfg.architecture, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (
        "LlamaForCausalLM", 4, 2, 2)
    assert cfg.tie_word_embeddings
    loaded = dict(iter_weights(path, cfg))
    # Lossy formats stay within their quantization error; F32 is exact (so the unpermute is exact).
    tol = {QT.F32: 0.0, QT.F16: 1e-3, QT.Q8_0: 0.01, QT.Q4_0: 0.15, QT.Q4_1: 0.15}[qtype]
    for name, ref in state.items():
        if name == "lm_head.weight":
            continue
        err = (loaded[name] - ref.float()).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= tol * scale + 1e-7, (name, err)


def test_unreadable_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelNotFoundError, match="cannot read GGUF"):
        load_config(resolve_model_path(str(bad)))
