"""Shared fixtures: tiny random-weight HF models (built here, saved as folders) and the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

# The parity tests run the engine here (default cpu); PAGEDSERVE_TEST_DEVICE=cuda runs them on a GPU
# against the same CPU float32 transformers reference.
ENGINE_DEVICE = os.environ.get("PAGEDSERVE_TEST_DEVICE", "cpu")
# float32 by default: the reference is float32 transformers, and token identity needs the same dtype
# (on CUDA the engine's own default is bfloat16).
ENGINE_DTYPE = os.environ.get("PAGEDSERVE_TEST_DTYPE", "float32")

# Prompts of varied length for the parity tests (short questions to a long paragraph).
PARITY_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Hello, my name is",
    "Explain in simple terms how a transformer neural network processes a sentence, step by step, "
    "starting from tokenization and ending with the prediction of the next word.",
    "List three fruits:",
    "In 1969, the Apollo 11 mission landed on the Moon. The astronauts Neil Armstrong and Buzz Aldrin "
    "walked on the surface while Michael Collins orbited above. Describe what they might have seen, "
    "what they carried back to Earth, and why the mission mattered for science and for the world.",
    "Q: What is 12 times 7?\nA:",
]


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from pagedserve.model.loader import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(request):
    """SmolLM2's tokenizer from the GGUF, or from $PAGEDSERVE_TEST_TOKENIZER (a save_pretrained folder:
    on a lent GPU machine, where the GGUF does not travel, the tiny-model tests still run)."""
    folder = os.environ.get("PAGEDSERVE_TEST_TOKENIZER")
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from pagedserve.model.loader import load_tokenizer

    return load_tokenizer(request.getfixturevalue("smollm2_path"))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own model from the same GGUF: the reference for greedy parity."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                 dtype=torch.float32)
    return model.eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """transformers greedy decoding of one prompt (no padding), trimmed at EOS as our engine stops."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id or 0)
    return out[0, len(prompt_ids):].tolist()


def _save_tiny(kind: str, folder: Path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1234)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.1,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if kind == "llama":  # grouped-query attention, tied embeddings
        cfg = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          rope_theta=10000.0, **common)
        model = LlamaForCausalLM(cfg)
    else:  # Qwen2: q/k/v bias, untied output projection
        cfg = Qwen2Config(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                          rope_theta=1000000.0, **common)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # make the biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return _save_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    from pagedserve import LLM

    return LLM(str(tiny_llama_dir), num_blocks=64, block_size=4, max_num_seqs=8)


@pytest.fixture(scope="session")
def smollm2_llm():
    from pagedserve import LLM

    return LLM("smollm2-135m", device=ENGINE_DEVICE, dtype=ENGINE_DTYPE)


# A Hermes/Qwen-style chat template with tools: <tools> in the system turn, calls as <tool_call> JSON,
# tool results as <tool_response> (what --tool-call-parser hermes reads).
TOOL_CHAT_TEMPLATE = """{%- if tools %}<|im_start|>system
You can call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response id="{{ message.tool_call_id }}">
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="session")
def tiny_tool_llama_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama with a chat template that shows tools."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-tool-llama") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return folder
